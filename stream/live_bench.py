"""`causvid bench live`: does a live stream hold up for minutes, and follow every prompt switch?

Everything goes through the real server over loopback, as a user's stream does, and every
frame is judged against the shapes-world scene its prompt names (causvid.eval.shapes_bench):

- **long streams**: one prompt for minutes, scored per segment (10 s by default): colour,
  shape, direction (a wrap-around counts as motion the named way) and background;
- **artefacts**: frames whose named background covers under half the picture, or with over
  8% of pixels near no palette colour (`frame_checks`);
- **a switch chain**: one stream whose prompt changes background, colour, shape and motion in
  turn; per switch, how many frames pass from the block the switch applies to until the new
  scene holds (90% of the rest of its segment passes the per-frame test), and the segment's
  scores after that, against a fresh stream of the same prompt over the same frames;
- **image-to-video**: streams started from a rendered shapes-world frame, per segment.

The record is one JSON object; a contact sheet shows a frame every few seconds of each stream.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from causvid.data.shapes import ObjectSpec, SceneSpec, canonical_caption, render_clip
from causvid.errors import UserError
from causvid.eval.shapes_bench import analyze_video, contact_sheet, frame_checks
from causvid.pipeline import CausVidPipeline, load_pipeline
from stream.client import SWITCH_MODES, Frame, StreamClient, StreamError
from stream.server import ServerConfig, StreamServer


SCORES = ("colour", "shape", "direction", "background_consistency")
LONG_SCENES = (
    SceneSpec("black", (ObjectSpec("circle", "red", "large", "right"),)),
    SceneSpec("gray", (ObjectSpec("square", "yellow", "small", "bouncing"),)),
    SceneSpec("white", (ObjectSpec("triangle", "green", "large", "down"),)),
    SceneSpec("black", (ObjectSpec("square", "cyan", "large", "left"),)),
)
# Background, colour, shape and motion in turn, twice: every switch changes one thing.
SWITCH_CHAIN = (("background", "white"), ("colour", "blue"), ("shape", "square"), ("motion", "down"),
                ("background", "gray"), ("colour", "yellow"), ("shape", "triangle"), ("motion", "bouncing"))
I2V_SCENES = (
    SceneSpec("white", (ObjectSpec("square", "green", "large", "right"),)),
    SceneSpec("black", (ObjectSpec("circle", "orange", "large", "up"),)),
)
HOLD_SHARE = 0.9  # a new scene holds from the first passing frame after which this share of its segment passes


def switch_chain(start: SceneSpec, changes: Sequence[tuple[str, str]] = SWITCH_CHAIN) -> list[SceneSpec]:
    """The scenes of a switch chain: `start`, then each (attribute, value) change applied in turn."""
    scenes = [start]
    for attribute, value in changes:
        scene = scenes[-1]
        if attribute == "background":
            scenes.append(SceneSpec(value, scene.objects))
        else:
            first = dataclasses.replace(scene.objects[0], **{attribute: value})
            scenes.append(SceneSpec(scene.background, (first, *scene.objects[1:])))
    return scenes


def segment_scores(frames: np.ndarray, scene: SceneSpec, segment_frames: int) -> list[dict]:
    """shapes-bench scores and artefact frames of each whole `segment_frames` segment."""
    segments = []
    for start in range(0, len(frames) - segment_frames + 1, segment_frames):
        part = frames[start : start + segment_frames]
        metrics = analyze_video(part, scene)
        segments.append({"start_frame": start, **{name: metrics[name] for name in SCORES},
                         "artefact_frames": metrics["artefact_frames"]})
    return segments


def hold_frame(frames: np.ndarray, scene: SceneSpec) -> int | None:
    """The first frame from which the scene holds: it and `HOLD_SHARE` of the frames from there on
    show the scene's objects' colours and its background, without artefacts. None if it never does."""
    checks = frame_checks(frames, scene)
    good = checks["objects"] & ~checks["artefact"] & (checks["background"] >= 0.5)
    # Share of good frames in each suffix, longest first.
    suffix_share = np.cumsum(good[::-1])[::-1] / np.arange(len(good), 0, -1)
    holding = np.flatnonzero(good & (suffix_share >= HOLD_SHARE))
    return int(holding[0]) if len(holding) else None


async def _record(url: str, prompt: str, frames: int, seed: int, switches: Sequence[str] = (),
                  image: np.ndarray | None = None,
                  switch: str | None = None) -> tuple[np.ndarray, list[int], list[int], int]:
    """One fast-paced stream: uint8 [T, H, W, 3], the block each switch applied to and its first
    frame, and the frames the server dropped. Each prompt (the first, then each of `switches`) runs
    at least `frames` frames: a switch is sent once that many frames have arrived since the last
    one applied. `switch` is how the server treats the KV cache at each (None: the model's way)."""
    images, frame_blocks, blocks, pending = [], [], [], list(switches)
    async with await StreamClient.connect(url, max_queue=None) as client:
        await client.start(prompt, "i2v" if image is not None else "t2v", image=image, seed=seed, pacing="fast")
        dropped = 0

        def first_frame(block: int) -> int:  # a cut's first block is shorter: read blocks off the stream
            return bisect.bisect_left(frame_blocks, block)

        def since_last_switch() -> int:
            return len(images) - (first_frame(blocks[-1]) if blocks else 0)

        while pending or len(blocks) < len(switches) or since_last_switch() < frames:
            message = await client.recv(120.0)
            if isinstance(message, Frame):
                images.append(message.image())
                frame_blocks.append(message.header.block)
                dropped = message.header.dropped
                if pending and since_last_switch() >= frames and len(blocks) == len(switches) - len(pending):
                    await client.switch_prompt(pending.pop(0), **SWITCH_MODES.get(switch, {}))
            elif message["type"] == "prompt":
                blocks.append(int(message["block"]))
            elif message["type"] == "error":
                raise StreamError(message)
    return np.stack(images), blocks, [first_frame(block) for block in blocks], dropped


async def _run(pipe: CausVidPipeline, seconds: float, switch_seconds: float, i2v_seconds: float,
               segment_seconds: float, long_scenes: Sequence[SceneSpec], seed: int, switch: str | None,
               sheet: Path | None) -> dict:
    fps, k = pipe.config.fps, pipe.config.block_frames
    segment = round(segment_seconds * fps)
    rows, labels = [], []

    def keep(frames: np.ndarray, label: str, every: int) -> None:  # frames for the contact sheet
        rows.append(frames[every - 1 :: every][:12])
        labels.append(label)

    config = ServerConfig(port=0, max_sessions=2, max_queue_frames=4096)
    async with StreamServer(pipe, config) as server:
        url = server.ws_url
        long = []
        for scene in long_scenes:
            prompt = canonical_caption(scene)
            frames, _, _, dropped = await _record(url, prompt, round(seconds * fps), seed)
            long.append({"prompt": prompt, "frames": len(frames), "dropped": dropped,
                         "segments": segment_scores(frames, scene, segment)})
            keep(frames, f"{seconds:g} s, a frame every {len(frames) // 12 / fps:g} s: {prompt}", len(frames) // 12)

        scenes = switch_chain(LONG_SCENES[0])
        prompts = [canonical_caption(scene) for scene in scenes]
        per_prompt = round(switch_seconds * fps)
        allowance = 2 * 4 * k  # two blocks of pixel frames: the time a switch may take to hold
        frames, blocks, firsts, dropped = await _record(url, prompts[0], per_prompt, seed, prompts[1:], switch=switch)
        keep(frames, "switch chain, a frame every half prompt", per_prompt // 2)
        firsts = firsts + [len(frames)]
        chain = []
        for i, (scene, first, end) in enumerate(zip(scenes[1:], firsts, firsts[1:]), start=1):
            block = blocks[i - 1]
            held = hold_frame(frames[first:end], scene)
            fresh, _, _, _ = await _record(url, prompts[i], end - first, seed)
            scored = slice(allowance, end - first)
            after, alone = analyze_video(frames[first:end][scored], scene), analyze_video(fresh[scored], scene)
            chain.append({"prompt": prompts[i], "block": block, "first_frame": first,
                          "frames_to_hold": held, "blocks_to_hold": None if held is None else -(-held // (4 * k)),
                          **{name: after[name] for name in SCORES},
                          "fresh": {name: alone[name] for name in SCORES}})

        i2v = []
        for scene in I2V_SCENES:
            prompt = canonical_caption(scene)
            image = render_clip(scene, 1, pipe.config.height, pipe.config.width, np.random.default_rng(seed))[0]
            frames, _, _, dropped = await _record(url, prompt, round(i2v_seconds * fps), seed, image=image)
            i2v.append({"prompt": prompt, "dropped": dropped, "segments": segment_scores(frames, scene, segment)})
            keep(frames, f"i2v, a frame every {len(frames) // 12 / fps:g} s: {prompt}", len(frames) // 12)
    if sheet is not None:
        contact_sheet(rows, labels, sheet, frames_per_video=12)
    return {"long": long, "switch_chain": {"dropped": dropped, "switches": chain}, "i2v": i2v}


def summarise(record: dict) -> dict:
    """The worst segment of each kind and the chain's worst switch, against the targets' terms."""
    def worst(streams: list[dict]) -> dict:
        segments = [s for stream in streams for s in stream["segments"]]
        if not segments:
            return {}
        out = {name: min(s[name] for s in segments) for name in SCORES}
        out["artefact_frames"] = sum(s["artefact_frames"] for s in segments)
        out["within_90pct_of_first"] = all(
            s[name] >= 0.9 * stream["segments"][0][name] for stream in streams for s in stream["segments"] for name in SCORES
        )
        return out

    switches = record["switch_chain"]["switches"]
    return {
        "long": worst(record["long"]),
        "i2v": worst(record["i2v"]),
        "switch_chain": {
            "max_blocks_to_hold": max((s["blocks_to_hold"] for s in switches if s["blocks_to_hold"] is not None),
                                      default=None),
            "never_held": sum(s["frames_to_hold"] is None for s in switches),
            "min_score_vs_fresh": min(
                (s[name] / s["fresh"][name] if s["fresh"][name] else 1.0) for s in switches for name in SCORES
            ) if switches else None,
            # Over all switched segments: the switch's scores and fresh streams' of the same prompts.
            "mean": {name: sum(s[name] for s in switches) / len(switches) for name in SCORES} if switches else None,
            "mean_fresh": {name: sum(s["fresh"][name] for s in switches) / len(switches) for name in SCORES}
            if switches else None,
        },
    }


def run_live_bench(checkpoint: str | Path | None = None, device: str | None = None, seconds: float = 600.0,
                   switch_seconds: float = 6.0, i2v_seconds: float = 20.0, segment_seconds: float = 10.0,
                   num_long: int = 2, seed: int = 0, switch: str | None = None, sheet: Path | None = None) -> dict:
    """Load a checkpoint (default: the shipped one) and run the live bench; one JSON-ready record.

    `switch` ("keep", "recache" or "cut") sets how the chain's switches treat the KV cache (None:
    the model's default).
    """
    if switch is not None and switch not in SWITCH_MODES:
        raise UserError(f"unknown switch {switch!r}; use one of {', '.join(SWITCH_MODES)}")
    if min(seconds, switch_seconds, i2v_seconds, segment_seconds) <= 0 or not 1 <= num_long <= len(LONG_SCENES):
        raise UserError(f"durations must be positive and num_long in 1..{len(LONG_SCENES)}")
    if segment_seconds > min(seconds, i2v_seconds):
        raise UserError(f"segment_seconds ({segment_seconds}) must fit in the streams ({min(seconds, i2v_seconds)} s)")
    pipe = load_pipeline(checkpoint, device, with_teacher=False)
    fps, k = pipe.config.fps, pipe.config.block_frames
    if round(switch_seconds * fps) < 2 * 4 * k + fps:
        raise UserError(f"switch_seconds must give each prompt two blocks and a second more "
                         f"({(2 * 4 * k + fps) / fps:g} s), got {switch_seconds}")
    record = {
        "bench": "live",
        "checkpoint": str(checkpoint or "shipped"),
        "config": {k: getattr(pipe.config, k) for k in ("fps", "block_frames", "sink_frames", "window_frames",
                                                        "switch_recache", "switch_cut")},
        "seconds": seconds, "switch_seconds": switch_seconds, "i2v_seconds": i2v_seconds,
        "segment_seconds": segment_seconds, "seed": seed,
        "switch": switch or ("cut" if pipe.config.switch_cut else "recache" if pipe.config.switch_recache else "keep"),
    }
    record.update(asyncio.run(_run(pipe, seconds, switch_seconds, i2v_seconds, segment_seconds,
                                   LONG_SCENES[:num_long], seed, switch, sheet)))
    record["summary"] = summarise(record)
    return record
