"""The `causvid` command line on a tiny random-weight pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from causvid.cli import main
from causvid.video_io import read_video


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "causvid.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_mp4_with_right_frames_and_size(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.mp4"
    result = _run("generate", "a red circle moving left", "-o", str(out), "--frames", "13",
                  "--checkpoint", str(tiny_checkpoint), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    video = read_video(out)
    assert video.shape == (13, 32, 32, 3)
    assert "13 frames" in result.stdout


def test_generate_npy_and_gif_and_teacher(tiny_checkpoint, tmp_path):
    assert main(["generate", "a blue square", "-o", str(tmp_path / "a.npy"), "--frames", "5",
                 "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--teacher", "--steps", "3"]) == 0
    frames = np.load(tmp_path / "a.npy")
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert main(["generate", "a blue square", "-o", str(tmp_path / "a.gif"), "--frames", "5",
                 "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "a.gif").n_frames == 5


def test_info_reports_config_and_parameters(tiny_checkpoint, capsys):
    assert main(["info", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device"] == "cpu"
    assert record["config"]["block_frames"] == 2
    assert record["parameters"]["transformer"] > 0 and record["parameters"]["vae"] > 0


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_checkpoint):
    result = _run("generate", "x", "-o", str(tmp_path / "o.mp4"), "--checkpoint", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "checkpoint directory not found" in result.stderr
    result = _run("generate", "x", "-o", str(tmp_path / "o.avi"), "--checkpoint", str(tiny_checkpoint))
    assert result.returncode == 2 and "o.avi" in result.stderr and "Traceback" not in result.stderr
