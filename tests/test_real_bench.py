"""`causvid bench real` and its GPU script run the real-scale streaming loop at a tiny size on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from causvid.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _check(record: dict, frames: int) -> None:
    assert record["bench"] == "real" and record["preset"] == "tiny" and record["device"] == "cpu"
    result = record["variants"]["sdpa"]
    assert result["frames"] == frames and result["fps"] > 0 and 0 < result["first_frame_s"]
    assert set(result["per_block_s"]) == {"denoise_s", "decode_s", "jpeg_s", "commit_s"}
    assert all(value > 0 for value in result["per_block_s"].values())


def test_bench_real_streams_blocks_and_reports_a_breakdown(tmp_path, capsys):
    out = tmp_path / "real.json"
    assert main(["bench", "real", "--preset", "tiny", "--blocks", "2", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record == json.loads(out.read_text())
    _check(record, frames=9 + 12)  # the first block decodes 1 + 4 + 4 frames, later ones 4 + 4 + 4


def test_the_gpu_script_installs_from_wheels_and_runs(tmp_path):
    """With everything installed already, pip takes nothing from the (empty) wheel folder."""
    wheels, out = tmp_path / "wheels", tmp_path / "real.json"
    wheels.mkdir()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "real_bench.sh"), str(wheels), str(out), "--preset", "tiny",
                             "--blocks", "1", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _check(json.loads(out.read_text()), frames=9)
