"""The shipped model loads and generates, from a checkout and from a wheel installed elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from causvid.pipeline import DEFAULT_CHECKPOINT, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_checkpoint_generates_frames():
    assert DEFAULT_CHECKPOINT == ROOT / "checkpoints" / "shapes"
    pipe = load_pipeline(device="cpu", with_teacher=False)
    frames = pipe.generate("a red circle moving right on a black background", num_frames=33)
    assert frames.shape == (33, pipe.config.height, pipe.config.width, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # an object on a background, not a flat frame (it may enter after a few frames)
    assert pipe.teacher is None


def test_a_wheel_install_finds_the_default_model(tmp_path):
    """`pip install` of a wheel, in an environment with no source tree: the model comes from <prefix>/share."""
    # Built from a copy: setuptools builds in the source tree, and the checkout stays as it was.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "runs", "build", "dist", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("causvid-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # The dependencies (torch, diffusers, ...) come from this environment; causvid itself only from the wheel.
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    code = ("import causvid.pipeline as p; pipe = p.load_pipeline(device='cpu');"
            "print(p.__file__); print(p.DEFAULT_CHECKPOINT); print(pipe.generate('a red circle', num_frames=5).shape)")
    result = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-2000:]
    module, checkpoint, shape = result.stdout.strip().splitlines()[-3:]
    assert module.startswith(str(site)) and checkpoint == str(env_dir / "share" / "causvid" / "checkpoints" / "shapes")
    assert shape == "(5, 64, 64, 3)"
