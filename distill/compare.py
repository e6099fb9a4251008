"""Ablations and drift on shapes-bench (causvid.eval.shapes_bench).

`bench` scores one pipeline (student, or its teacher) on a prompt set; `compare` runs it for
several checkpoints and `ablation_table` turns the reports into the markdown table of
docs/distillation.md. `drift` scores consecutive segments of long streams (the rolling KV
cache of `CausVidPipeline.stream`), which shows whether quality decays with time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from causvid.errors import UserError
from causvid.eval.shapes_bench import METRICS, BenchCase, run_bench
from causvid.pipeline import CausVidPipeline


def bench(
    pipe: CausVidPipeline,
    cases: Sequence[BenchCase],
    seeds: Sequence[int] = (0, 1, 2, 3),
    num_frames: int = 33,
    teacher: bool = False,
    steps: int | None = None,
    on_video: Callable[[BenchCase, int, np.ndarray], None] | None = None,
) -> dict:
    """shapes-bench report of the pipeline's student (or its teacher, 50-step CFG) on `cases`."""

    def generate(prompt: str, seed: int, frames: int) -> np.ndarray:
        return pipe.generate(prompt, frames, seed, steps=steps, mode="teacher" if teacher else "student")

    return run_bench(generate, cases, num_frames, seeds, pipe.config.height, pipe.config.width, on_video)


def compare(
    checkpoints: dict[str, Path],
    cases: Sequence[BenchCase],
    seeds: Sequence[int],
    num_frames: int,
    device: str | None = None,
    teacher_of: Path | None = None,
    ground_truth: bool = False,
    teacher_steps: Sequence[int | None] = (None,),
) -> dict[str, dict]:
    """Label -> shapes-bench report, for each checkpoint's student (plus the teacher and the ceiling).

    `teacher_steps` gives one teacher row per step count (None: the pipeline's, 50), e.g. (None, 4)
    adds the few-step teacher without distillation. Pipelines are loaded one at a time.
    """
    from causvid.pipeline import load_pipeline

    reports, size = {}, None
    if teacher_of is not None:
        pipe = load_pipeline(teacher_of, device)
        size = (pipe.config.height, pipe.config.width)
        for steps in teacher_steps:
            label = "teacher (CFG)" if steps is None else f"teacher, {steps} steps (CFG)"
            reports[label] = bench(pipe, cases, seeds, num_frames, teacher=True, steps=steps)
    for label, path in checkpoints.items():
        pipe = load_pipeline(path, device)
        size = (pipe.config.height, pipe.config.width)
        reports[label] = bench(pipe, cases, seeds, num_frames)
    if ground_truth and size is not None:
        reports = {"ground truth": run_bench(None, cases, num_frames, seeds, *size)} | reports
    return reports


def summary(report: dict, split: str = "all") -> dict[str, float | None]:
    """The split's metric means of a shapes-bench report (what the ablation table shows).

    A metric that a record made before it existed lacks is None, as one that could not be measured.
    """
    return {name: report["splits"][split].get(name) for name in METRICS}


def ablation_table(reports: dict[str, dict], split: str = "all") -> str:
    """Markdown table: one row per labelled report, one column per shapes-bench metric."""
    arrows = {name: "↑" if higher else "↓" for name, higher in METRICS.items()}
    lines = [
        "| run | " + " | ".join(f"{name} {arrows[name]}" for name in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for label, report in reports.items():
        cells = ["-" if v is None else f"{v:.3f}" for v in summary(report, split).values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drift(
    pipe: CausVidPipeline,
    cases: Sequence[BenchCase],
    seeds: Sequence[int] = (0,),
    total_frames: int = 2048,
    segment_frames: int = 32,
    steps: int | None = None,
) -> dict:
    """shapes-bench of consecutive `segment_frames`-frame segments of one long stream per case and seed.

    Each (prompt, seed) stream is generated once, lazily: segment j of every stream is scored
    before segment j + 1 is generated, so memory stays at one rolling KV cache per stream.
    """
    if segment_frames < 2:
        raise UserError(f"segment_frames must be >= 2 (motion needs two frames), got {segment_frames}")
    cases = list({case.prompt: case for case in cases}.values())  # one stream per (prompt, seed)
    streams = {}

    def next_segment(prompt: str, seed: int, frames: int) -> np.ndarray:
        if (prompt, seed) not in streams:
            streams[prompt, seed] = pipe.stream(prompt, seed, steps=steps)  # unbounded
        return np.stack(list(itertools.islice(streams[prompt, seed], frames)))

    segments = []
    for index in range(math.ceil(total_frames / segment_frames)):
        report = run_bench(next_segment, cases, segment_frames, seeds, pipe.config.height, pipe.config.width)
        segments.append({"start_frame": index * segment_frames, "splits": report["splits"], "timing": report["timing"]})
    return {"total_frames": len(segments) * segment_frames, "segment_frames": segment_frames,
            "seeds": list(seeds), "prompts": [case.prompt for case in cases], "segments": segments}


def drift_table(report: dict, split: str = "all") -> str:
    """Markdown table: one row per segment (its first frame), one column per metric."""
    rows = {f"frames {s['start_frame']}+": {"splits": s["splits"]} for s in report["segments"]}
    return ablation_table(rows, split)
