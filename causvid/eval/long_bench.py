"""`causvid bench long`: long videos made four ways, judged on the same measures.

Methods, each at videos of C chunks (C * chunk_frames + context_frames latent frames):
    teacher   the bidirectional teacher with full attention over the whole video (where it fits)
    parallel  the teacher on chunks denoised at once, meeting only in blended overlaps
              (FreeNoise- or Gen-L-Video-like, no training)
    vin       the same chunks guided by the Video Interface Network's global tokens
    student   the causal student streaming the same length
and, on request, an ablation:
    vin-dit   the DiT trained with the VIN, on the same chunks without the VIN's tokens

Figures: FLOPs of one video (torch's counter), wall time, peak memory, shapes-bench adherence and
consistency, MAWE, and cuts at chunk borders.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from causvid.data import BACKGROUNDS, COLOURS
from causvid.eval.cost import PeakMemory, flop_counter
from causvid.models.autoencoder import num_pixel_frames
from causvid.eval.shapes_bench import (
    REFERENCE_SIZE,
    BenchCase,
    classify_pixels,
    contact_sheet,
    object_blobs,
    palette_index,
    run_bench,
    track_steps,
)
from causvid.parallel import ChunkLayout
from causvid.pipeline import CausVidPipeline

METHODS = ("teacher", "parallel", "vin", "student")
ABLATIONS = ("vin-dit",)
# A border is a cut when an object's step across it is this many times its median step inside
# chunks, plus a floor (pixels at 64 px; a fraction of its area) so still objects' jitter is no cut.
CUT_FACTOR = 3.0
CUT_FLOOR_PX = 1.5
CUT_FLOOR_AREA = 0.15


def border_frames(layout: ChunkLayout) -> list[int]:
    """The first pixel frame of each chunk after the first (what it owns, past its context).

    Latent frame k > 0 decodes to pixel frames 4k - 3 .. 4k: its first is the count of pixel frames
    that latent frames 0 .. k - 1 decode to.
    """
    return [num_pixel_frames(start + layout.context_frames) for start in layout.starts[1:]]


def border_cuts(frames: np.ndarray, case: BenchCase, borders: Sequence[int]) -> int:
    """How many of `borders` cut: some object of the scene jumps in position or size, appears or
    vanishes, between the frame before the border and the border frame, more than it changes
    between frames inside chunks (`CUT_FACTOR` x its median step, plus a floor)."""
    scale = min(frames.shape[1:3]) / REFERENCE_SIZE
    labels = classify_pixels(frames, palette_index(BACKGROUNDS[case.scene.background]))
    frame_size = (frames.shape[2], frames.shape[1])
    cut = np.zeros(len(borders), dtype=bool)
    pairs = np.asarray(borders) - 1  # step t -> t + 1 crosses a border when t + 1 is one
    for obj in case.scene.objects:
        blobs = object_blobs(labels, palette_index(COLOURS[obj.colour]))
        present = np.array([blob is not None for blob in blobs])
        centroids = np.array([blob.centroid if blob else (np.nan, np.nan) for blob in blobs])
        areas = np.array([blob.area if blob else np.nan for blob in blobs], dtype=np.float64)
        moves = np.linalg.norm(track_steps(centroids, frame_size), axis=1)
        resizes = np.abs(np.diff(areas)) / np.nanmean(areas) if present.any() else np.full(len(areas) - 1, np.nan)
        inside = np.ones(len(moves), dtype=bool)
        inside[pairs] = False
        typical_move = np.nanmedian(moves[inside]) if np.isfinite(moves[inside]).any() else 0.0
        typical_resize = np.nanmedian(resizes[inside]) if np.isfinite(resizes[inside]).any() else 0.0
        jumped = moves[pairs] > CUT_FACTOR * typical_move + CUT_FLOOR_PX * scale
        resized = resizes[pairs] > CUT_FACTOR * typical_resize + CUT_FLOOR_AREA
        flipped = present[pairs] != present[pairs + 1]
        cut |= jumped | resized | flipped  # comparisons with NaN (an object missing) are False
    return int(cut.sum())


def _sampler(pipe: CausVidPipeline, method: str, steps: int | None) -> Callable[[str, int, int], np.ndarray]:
    """generate(prompt, seed, num_frames) for one method."""
    if method == "student":
        return lambda prompt, seed, frames: pipe.generate(prompt, frames, seed)
    if method == "teacher":
        return lambda prompt, seed, frames: pipe.generate(prompt, frames, seed, steps=steps, mode="teacher")
    model = {"parallel": "teacher", "vin": "vin", "vin-dit": "vin-dit"}[method]
    return lambda prompt, seed, frames: pipe.generate_parallel(prompt, frames, seed, steps, model=model)


def _flops(pipe: CausVidPipeline, method: str, prompt: str, frames: int, steps: int) -> float:
    """FLOPs of one video. A bidirectional method's cost is linear in its steps, so it is counted
    at 1 and 2 steps and extrapolated, not run for all of them under the (slow) counter."""
    counts = []
    for counted_steps in ((None,) if method == "student" else (1, 2)):
        with flop_counter() as counter:
            _sampler(pipe, method, counted_steps)(prompt, 0, frames)
        counts.append(counter.get_total_flops())
    if method == "student":
        return float(counts[0])
    return float(counts[0] + (steps - 1) * (counts[1] - counts[0]))


# The paper's VIN at Wan2.1-1.3B's width: 512 global tokens, 4 process blocks (arXiv 2503.17539).
PAPER_VIN = dict(num_tokens=512, process_layers=4)


def wan_flops_per_step(chunk_counts: Sequence[int], chunk_frames: int, context_frames: int) -> dict:
    """FLOPs of one denoiser evaluation at Wan2.1-T2V-1.3B's size (480 x 832), counted on the meta
    device (no memory, no weights): full attention over the whole video, the chunks alone, and the
    chunks with the paper-sized VIN (its own cost included). Where attention dominates, as at this
    size and unlike the 64 x 64 world, chunking saves what the paper reports."""
    from diffusers import WanTransformer3DModel

    from causvid.models.attention import GlobalTokens
    from causvid.models.denoiser import WanDenoiser
    from causvid.models.vin import VideoInterfaceNetwork
    from causvid.presets import UMT5_TOKENS, WAN_1_3B_TRANSFORMER, WAN_SIZE

    config = WAN_1_3B_TRANSFORMER
    dim, layers = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    with torch.device("meta"):
        denoiser = WanDenoiser(WanTransformer3DModel(**config))
        vin = VideoInterfaceNetwork(in_channels=config["in_channels"], dim=dim, text_dim=config["text_dim"],
                                    num_heads=config["num_attention_heads"], dit_layers=layers, **PAPER_VIN)

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    def count(run: Callable[[], object]) -> int:
        with flop_counter() as counter:
            run()
        return counter.get_total_flops()

    height, width = WAN_SIZE[0] // 8, WAN_SIZE[1] // 8  # Wan's VAE is 8x spatially
    record = {}
    for chunks in chunk_counts:
        layout = ChunkLayout(chunks, chunk_frames, context_frames)
        video = meta(1, config["in_channels"], layout.total_frames, height, width)
        text, windows = meta(1, UMT5_TOKENS, config["text_dim"]), layout.windows(video)
        chunk_text = meta(chunks, UMT5_TOKENS, config["text_dim"])
        tokens = GlobalTokens(meta(chunks, PAPER_VIN["num_tokens"], dim), meta(layers))
        full = count(lambda: denoiser(video, meta(1), text))
        parallel = count(lambda: denoiser(windows, meta(chunks), chunk_text))
        guided = count(lambda: denoiser(windows, meta(chunks), chunk_text, global_tokens=tokens))
        interface = count(lambda: vin(video, meta(1), text, torch.tensor(layout.starts)))
        record[str(chunks)] = {"latent_frames": layout.total_frames, "teacher": full, "parallel": parallel,
                               "vin": guided + interface, "vin_vs_teacher": (guided + interface) / full}
    return record


def run_long_bench(
    pipe: CausVidPipeline,
    cases: Sequence[BenchCase],
    chunk_counts: Sequence[int] = (4, 8, 16),
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] = METHODS,
    teacher_max_chunks: int = 16,
    steps: int | None = None,
    sheet: str | None = None,
) -> dict:
    """One JSON-serialisable record: per chunk count, per method, cost and quality figures."""
    config = pipe.config
    steps = steps or config.teacher_steps
    results: dict[str, dict] = {}
    sheet_videos, sheet_labels = [], []
    for chunks in chunk_counts:
        layout = ChunkLayout(chunks, config.chunk_frames, config.context_frames)
        num_frames = num_pixel_frames(layout.total_frames)
        borders = border_frames(layout)
        row: dict[str, dict] = {}
        for method in methods:
            if method == "teacher" and chunks > teacher_max_chunks:
                row[method] = {"skipped": f"full attention over {chunks} chunks is past --teacher-max-chunks"}
                continue
            cuts = []
            first_video = []

            def judge(case: BenchCase, seed: int, frames: np.ndarray) -> None:
                cuts.append(border_cuts(frames, case, borders))
                if not first_video:
                    first_video.append(frames)

            generate = _sampler(pipe, method, steps)
            with PeakMemory(pipe.device) as memory:
                started = time.perf_counter()
                report = run_bench(generate, cases, num_frames, seeds, config.height, config.width, on_video=judge)
                seconds = time.perf_counter() - started
            means = report["splits"]["all"]
            row[method] = {
                "flops": _flops(pipe, method, cases[0].prompt, num_frames, steps),
                "seconds_per_video": report["timing"]["generate_s"] / report["timing"]["videos"],
                "bench_seconds": seconds,
                "peak_memory_mb": memory.peak_mb,
                **{name: means[name] for name in ("colour", "shape", "direction", "subject_consistency",
                                                  "background_consistency", "mawe", "jerk")},
                "cut_rate": sum(cuts) / max(len(borders) * len(cuts), 1),
                "cuts": cuts,
            }
            if sheet is not None and chunks == max(chunk_counts):
                sheet_videos.append(first_video[0])
                sheet_labels.append(f"{method}, {chunks} chunks: {cases[0].prompt}")
        teacher_flops = row.get("teacher", {}).get("flops")
        for figures in row.values():
            if teacher_flops and "flops" in figures:
                figures["flops_vs_teacher"] = figures["flops"] / teacher_flops
        results[str(chunks)] = {"latent_frames": layout.total_frames, "frames": num_frames, "borders": len(borders),
                                "methods": row}
    if sheet_videos:
        contact_sheet(sheet_videos, sheet_labels, sheet, frames_per_video=16)
    return {
        "bench": "long",
        "chunk_frames": config.chunk_frames,
        "context_frames": config.context_frames,
        "blend_cutoff": config.blend_cutoff,
        "steps": steps,
        "guidance_scale": config.guidance_scale,
        "prompts": [case.prompt for case in cases],
        "seeds": list(seeds),
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "chunks": results,
        "wan_1_3b_flops_per_step": wan_flops_per_step(chunk_counts, config.chunk_frames, config.context_frames),
    }


def format_table(record: dict) -> str:
    """A markdown table of a `run_long_bench` record, one row per chunk count and method."""
    columns = ("flops_vs_teacher", "seconds_per_video", "peak_memory_mb", "colour", "shape", "direction",
               "subject_consistency", "background_consistency", "mawe", "cut_rate")
    lines = ["| chunks (frames) | method | GFLOPs | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 3) + "|"]
    for chunks, entry in record["chunks"].items():
        for method, figures in entry["methods"].items():
            if "skipped" in figures:
                lines.append(f"| {chunks} ({entry['frames']}) | {method} | skipped |" + " |" * len(columns))
                continue
            cells = [_cell(figures.get(name)) for name in columns]
            lines.append(f"| {chunks} ({entry['frames']}) | {method} | {figures['flops'] / 1e9:.0f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "At Wan2.1-T2V-1.3B's size (480 x 832), TFLOPs of one denoiser evaluation:", "",
              "| chunks (latent frames) | teacher | parallel | vin | vin / teacher |", "|---|---|---|---|---|"]
    for chunks, entry in record["wan_1_3b_flops_per_step"].items():
        lines.append(f"| {chunks} ({entry['latent_frames']}) | {entry['teacher'] / 1e12:.0f} | "
                     f"{entry['parallel'] / 1e12:.0f} | {entry['vin'] / 1e12:.0f} | {entry['vin_vs_teacher']:.2f} |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
