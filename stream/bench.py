"""`causvid bench stream`: end-to-end streaming numbers as one JSON record.

Everything runs in one process: the server (model thread + event loop) and websocket clients
over loopback, so times include denoising, decoding, JPEG and the websocket, as a user sees
them. Then the student and the teacher make the same clips, the denoiser's FLOPs are counted
and compared with this machine's matmul throughput measured in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from causvid.errors import UserError
from causvid.eval.cost import flop_counter, rss_mb
from causvid.models.autoencoder import num_latent_frames
from causvid.pipeline import CausVidPipeline, load_pipeline
from causvid.samplers import guided_velocity
from stream.client import Frame, StreamClient, percentiles, record_async
from stream.server import ServerConfig, StreamServer


DEFAULT_PROMPTS = ("a red circle moving right on a black background", "a blue square bouncing on gray")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


async def _stream(url: str, prompt: str, seed: int, seconds: float, min_blocks: int = 0) -> tuple[float, list[Frame], dict]:
    """One fast-paced client for `seconds` (and at least `min_blocks`): start time, frames, last status."""
    async with await StreamClient.connect(url, max_queue=64) as client:
        t_start = time.time()
        await client.start(prompt, seed=seed, pacing="fast")
        frames: list[Frame] = []
        status: dict = {}
        while time.time() - t_start < seconds or status.get("blocks", 0) < min_blocks:
            message = await client.recv(60.0)
            if isinstance(message, Frame):
                # Headers and times only: kept JPEGs grew the measured RSS by 65 MB in a 10-minute run.
                frames.append(dataclasses.replace(message, jpeg=b""))
            elif message["type"] == "status":
                status = message
        return t_start, frames, status


def _single(t_start: float, frames: list[Frame], status: dict, first_block: int) -> dict:
    """Time to first frame, steady FPS, latency and per-frame time early vs late in the stream."""
    received = np.array([f.received for f in frames])
    steady = received[first_block:]
    intervals = np.diff(steady) * 1000
    quarter = max(1, len(intervals) // 4)
    start_ms, end_ms = float(intervals[:quarter].mean()), float(intervals[-quarter:].mean())
    indices = [f.header.index for f in frames]
    return {
        "frames": len(frames),
        "time_to_first_frame_ms": (received[0] - t_start) * 1000,
        "steady_fps": (len(steady) - 1) / (steady[-1] - steady[0]),
        "latency_ms": percentiles([(f.received - f.header.t_origin) * 1000 for f in frames]),
        "frame_ms_start": start_ms,
        "frame_ms_end": end_ms,
        "flat": end_ms < 1.25 * start_ms,
        "blocks": status.get("blocks"),
        "cached_frames": status.get("cached_frames"),
        "dropped": frames[-1].header.dropped,
        "in_order": indices == sorted(indices),
    }


async def _aggregate_fps(url: str, clients: int, seconds: float, prompts: tuple[str, ...]) -> float:
    """Frames per second over all clients, counted while every one of them is streaming."""
    runs = await asyncio.gather(*(_stream(url, prompts[i % len(prompts)], i, seconds, min_blocks=2) for i in range(clients)))
    start = max(frames[0].received for _, frames, _ in runs)  # the slowest client's first frame
    end = min(frames[-1].received for _, frames, _ in runs)  # the first client to stop
    counted = sum(start < f.received <= end for _, frames, _ in runs for f in frames)
    return counted / (end - start) if end > start else 0.0


async def _serve_and_measure(pipe: CausVidPipeline, seconds: float, single_seconds: float, clients: tuple[int, ...],
                             prompts: tuple[str, ...], server_threads: int | None) -> dict:
    config = ServerConfig(port=0, max_sessions=max(clients) + 1, max_queue_frames=1024, model_threads=server_threads)
    k = pipe.config.block_frames
    # Long enough for the rolling cache to fill and evict.
    min_blocks = (pipe.config.sink_frames + pipe.config.window_frames) // k + 3
    async with StreamServer(pipe, config) as server:
        threads = torch.get_num_threads()
        await _stream(server.ws_url, prompts[0], 0, 0.0, min_blocks=1)  # warm-up: first-call costs are not streaming
        await server.engine.call(lambda: None)  # the warm-up's block still in flight finishes first
        rss_start = rss_mb()
        single = _single(*await _stream(server.ws_url, prompts[0], 0, single_seconds, min_blocks), first_block=1 + 4 * (k - 1))
        memory = {"rss_start_mb": rss_start, "rss_end_mb": rss_mb()}
        # Video to video, fed like a camera at the model's fps: latency from input to output frame.
        video = np.random.default_rng(0).integers(0, 256, (1 + 8 * k, pipe.config.height, pipe.config.width, 3), np.uint8)
        v2v = await record_async(server.ws_url, prompts[0], video=video)
        v2v_record = {"frames": v2v.frames, "input_fps": pipe.config.fps, "latency_ms": v2v.latency_ms}
        concurrency = {}
        for n in clients:
            row = {}
            for batching in (True, False):
                server.engine.batching = batching
                row["batched_fps" if batching else "unbatched_fps"] = await _aggregate_fps(server.ws_url, n, seconds, prompts)
            row["batching_speedup"] = row["batched_fps"] / row["unbatched_fps"] if row["unbatched_fps"] else None
            concurrency[str(n)] = row
    return {"server_threads": threads, "single": single, "v2v": v2v_record, "memory": memory, "concurrency": concurrency}


def _student_vs_teacher(pipe: CausVidPipeline, prompts: tuple[str, ...], frames: int) -> dict:
    """The same clips from the 4-step causal student and the 50-step CFG teacher."""
    if pipe.teacher is None:
        return {"skipped": "checkpoint has no teacher/"}
    student_s = teacher_s = student_first = 0.0
    for seed, prompt in enumerate(prompts):
        start = time.perf_counter()
        for i, _ in enumerate(pipe.stream(prompt, seed, frames)):
            if i == 0:
                student_first += time.perf_counter() - start
        student_s += time.perf_counter() - start
        start = time.perf_counter()
        pipe.generate(prompt, frames, seed, mode="teacher")
        teacher_s += time.perf_counter() - start  # the teacher's first frame exists only with its last
    clips = len(prompts)
    return {
        "clips": clips,
        "frames": frames,
        "teacher_steps": pipe.config.teacher_steps,
        "guidance_scale": pipe.config.guidance_scale,
        "student_fps": clips * frames / student_s,
        "teacher_fps": clips * frames / teacher_s,
        "throughput_ratio": teacher_s / student_s,
        "student_first_frame_ms": 1000 * student_first / clips,
        "teacher_first_frame_ms": 1000 * teacher_s / clips,
        "first_frame_latency_ratio": teacher_s / student_first,
    }


def _matmul_flops_per_s(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """This machine's dense matmul throughput in the denoiser's dtype: the roofline to compare with."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up; .item() waits for the device
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        runs += 1
    c.sum().item()
    return runs * 2 * n**3 / (time.perf_counter() - start)


@torch.inference_mode()
def _denoiser_flops(pipe: CausVidPipeline, prompt: str) -> dict:
    """FLOPs of one block (few-step sampling + the cache-writing pass) with a full cache, per pixel frame."""
    cfg = pipe.config
    rollout, text = pipe.new_rollout(0), pipe.encode_prompt(prompt)
    while rollout.cache.cached_frames < cfg.sink_frames + cfg.window_frames:
        rollout.next_block(text)
    with flop_counter() as counter:
        rollout.next_block(text)
    start = time.perf_counter()
    rollout.next_block(text)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    block_s = time.perf_counter() - start
    per_frame = counter.get_total_flops() / (4 * cfg.block_frames)  # each latent frame -> 4 pixel frames
    return {"denoiser_flops_per_frame": per_frame, "denoiser_only_flops_per_s": counter.get_total_flops() / block_s}


@torch.inference_mode()
def _teacher_flops_per_frame(pipe: CausVidPipeline, prompt: str, frames: int) -> float:
    """The 50-step CFG teacher's denoiser FLOPs per pixel frame of a `frames`-frame clip.

    With the student's FLOPs per frame this gives the throughput ratio that perfectly efficient
    denoising would reach, before decoding (which both pay per frame) is added.
    """
    channels, height, width = pipe.latent_shape
    x = torch.randn(1, channels, num_latent_frames(frames), height, width, device=pipe.device)
    velocity = guided_velocity(pipe.teacher, pipe.encode_prompt(prompt), pipe.encode_prompt(pipe.config.negative_prompt),
                               pipe.config.guidance_scale)
    with flop_counter() as counter:
        velocity(x, torch.ones(1, device=pipe.device))
    return counter.get_total_flops() * pipe.config.teacher_steps / frames


def bench_pipeline(pipe: CausVidPipeline, seconds: float = 10.0, clients: tuple[int, ...] = (1, 2, 4),
                   teacher_frames: int = 81, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
                   single_seconds: float | None = None, server_threads: int | None = None) -> dict:
    """The whole benchmark on a loaded pipeline.

    `seconds` is each concurrency stream's length; `single_seconds` (default: `seconds`) that of the
    one-client stream behind time to first frame, latency and flatness, e.g. 600 for 10 minutes.
    `server_threads` is the server's `model_threads` (default: all cores but one, as `causvid serve`).
    """
    single_seconds = seconds if single_seconds is None else single_seconds
    if min(seconds, single_seconds) <= 0 or not clients or min(clients) < 1 or teacher_frames < 1:
        raise UserError("seconds, clients and teacher frames must be positive")
    num_latent_frames(teacher_frames)  # 1 + 4k, checked before the long part of the run
    record = {
        "bench": "stream",
        "device": str(pipe.device),
        "dtype": str(pipe.denoiser.transformer.dtype),
        "config": {k: getattr(pipe.config, k) for k in ("height", "width", "fps", "block_frames", "sink_frames", "window_frames")},
        "seconds": seconds,
        "single_seconds": single_seconds,
    }
    record.update(asyncio.run(_serve_and_measure(pipe, seconds, single_seconds, tuple(clients), prompts, server_threads)))
    record["student_vs_teacher"] = _student_vs_teacher(pipe, prompts, teacher_frames)
    flops = _denoiser_flops(pipe, prompts[0])
    flops["matmul_flops_per_s"] = _matmul_flops_per_s(pipe.denoiser.transformer.dtype, pipe.device)
    flops["achieved_flops_per_s"] = flops["denoiser_flops_per_frame"] * record["single"]["steady_fps"]
    flops["fraction_of_matmul"] = flops["achieved_flops_per_s"] / flops["matmul_flops_per_s"]
    if pipe.teacher is not None:
        flops["teacher_denoiser_flops_per_frame"] = _teacher_flops_per_frame(pipe, prompts[0], teacher_frames)
        flops["teacher_to_student_flops_ratio"] = flops["teacher_denoiser_flops_per_frame"] / flops["denoiser_flops_per_frame"]
    flops["denoiser_only_fraction_of_matmul"] = flops["denoiser_only_flops_per_s"] / flops["matmul_flops_per_s"]
    record["flops"] = flops
    record["memory"]["peak_rss_mb"] = _peak_rss_mb()
    if pipe.device.type == "cuda":
        record["memory"]["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def run_stream_bench(checkpoint: str | Path | None, device: str | None, **kwargs) -> dict:
    """Load a checkpoint (default: the shipped one) and benchmark it."""
    if kwargs.get("prompts") is None:
        kwargs.pop("prompts", None)
    pipe = load_pipeline(checkpoint, device)
    return {"checkpoint": str(checkpoint or "shipped"), **bench_pipeline(pipe, **kwargs)}
