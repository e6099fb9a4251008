"""`causvid client`, `causvid serve` and `causvid bench stream` on the tiny pipeline."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from causvid.cli import main
from causvid.video_io import read_video, write_video
from stream.server import ServerConfig, ServerThread


@pytest.fixture
def server(tiny_pipeline):
    with ServerThread(tiny_pipeline, ServerConfig(port=0)) as running:
        yield running.server


def test_client_records_an_mp4_and_switches_prompt(server, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["client", server.ws_url, "--prompt", "a red circle", "-o", str(out), "--frames", "12",
                 "--switch-at", "5", "a blue square", "--pacing", "fast"]) == 0
    printed = capsys.readouterr().out
    assert read_video(out).shape == (12, 32, 32, 3)
    assert re.search(r"12 frames, [\d.]+ fps, first frame after \d+ ms, latency p50 \d+ ms", printed)


def test_client_switch_mode_reaches_the_prompt_message(server, tmp_path, monkeypatch):
    from stream.client import StreamClient

    sent = []
    original = StreamClient.switch_prompt

    async def recording(self, prompt, interpolate_blocks=None, recache=None, cut=None):
        sent.append((prompt, recache, cut))
        await original(self, prompt, interpolate_blocks, recache, cut)

    monkeypatch.setattr(StreamClient, "switch_prompt", recording)
    for mode, expected in ((None, (None, None)), ("cut", (False, True)), ("recache", (True, False))):
        extra = [] if mode is None else ["--switch-mode", mode]
        assert main(["client", server.ws_url, "--prompt", "a red circle", "--frames", "12", "--no-output",
                     "--switch-at", "5", "a blue square", "--pacing", "fast", *extra]) == 0
        assert sent.pop() == ("a blue square", *expected)


def test_client_video_to_video_keeps_the_frame_count(server, tmp_path, capsys):
    source, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(source, np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), fps=16)
    assert main(["client", server.ws_url, "--prompt", "a red circle", "--video", str(source), "-o", str(out),
                 "--strength", "0.6"]) == 0
    assert read_video(out).shape[0] == 10
    assert "10 frames" in capsys.readouterr().out


def test_client_errors_are_one_line(server, tmp_path, capsys):
    assert main(["client", server.ws_url, "--prompt", "x", "--image", str(tmp_path / "missing.png"), "--no-output"]) == 2
    assert "missing.png: file not found" in capsys.readouterr().err
    assert main(["client", server.ws_url, "--prompt", "x", "-o", str(tmp_path / "out.avi")]) == 2


def test_serve_answers_healthz_and_stops_on_sigterm(tiny_checkpoint):
    process = subprocess.Popen(
        [sys.executable, "-m", "causvid.cli", "serve", "--port", "0", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + process.stderr.read() if process.poll() is not None else line
        with urllib.request.urlopen(match.group(1) + "/healthz", timeout=10) as response:
            assert json.load(response)["status"] == "ok"
        with connect(match.group(1).replace("http", "ws") + "/ws", open_timeout=20) as ws:
            assert json.loads(ws.recv(timeout=20))["type"] == "hello"
            ws.send(json.dumps({"type": "start", "prompt": "a red circle", "pacing": "fast"}))
            while not isinstance(ws.recv(timeout=30), bytes):  # wait for a frame
                pass
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1001  # going away
        assert process.wait(timeout=30) == 0
        assert "shutting down" in process.stdout.read()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_bench_stream_prints_one_json_record(tiny_checkpoint, capsys):
    assert main(["bench", "stream", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--seconds", "1",
                 "--single-seconds", "1.5", "--clients", "2", "--teacher-frames", "5", "--server-threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (record["seconds"], record["single_seconds"], record["server_threads"]) == (1.0, 1.5, 1)
    single = record["single"]
    assert single["frames"] >= 5 + 4 * 8 and single["in_order"] and single["steady_fps"] > 0  # >= 5 blocks
    assert 0 < single["time_to_first_frame_ms"] < 60_000
    assert single["latency_ms"]["p50"] <= single["latency_ms"]["p95"] <= single["latency_ms"]["max"]
    assert single["cached_frames"] == 5  # the rolling cache filled and stayed at sink + window
    assert record["v2v"]["frames"] == 17 and record["v2v"]["latency_ms"]["p50"] > 0  # 1 + 8 * block_frames
    assert set(record["concurrency"]) == {"2"}
    assert all(row["batched_fps"] > 0 and row["unbatched_fps"] > 0 for row in record["concurrency"].values())
    versus = record["student_vs_teacher"]
    assert versus["frames"] == 5 and versus["throughput_ratio"] > 0 and versus["first_frame_latency_ratio"] > 0
    flops = record["flops"]
    assert flops["denoiser_flops_per_frame"] > 0 and flops["matmul_flops_per_s"] > 0
    assert 0 < flops["fraction_of_matmul"] < 10
    # 50 guided steps over the clip against 4 steps + a commit per block: the teacher costs more per frame
    assert flops["teacher_denoiser_flops_per_frame"] > flops["denoiser_flops_per_frame"]
    assert flops["teacher_to_student_flops_ratio"] == pytest.approx(
        flops["teacher_denoiser_flops_per_frame"] / flops["denoiser_flops_per_frame"])
    assert record["memory"]["peak_rss_mb"] > 0
    assert main(["bench", "stream", "--checkpoint", str(tiny_checkpoint), "--threads", "0"]) == 2
