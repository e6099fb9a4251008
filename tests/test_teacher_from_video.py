"""The teacher started from a video noised part way (SDEdit), and the eval that uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from causvid.cli import main
from causvid.eval.shapes_bench import default_prompt_set
from causvid.frames import to_uint8


def _video(frames: int = 9) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(frames, 32, 32, 3), dtype=np.uint8)


def test_full_noise_ignores_the_video_and_low_noise_keeps_it(tiny_pipeline):
    video = _video()
    plain = tiny_pipeline.generate("a red circle", 9, seed=3, mode="teacher", steps=4)
    full = tiny_pipeline.generate("a red circle", 9, seed=3, mode="teacher", steps=4, video=video, noise_level=1.0)
    assert np.array_equal(plain, full)
    kept = tiny_pipeline.generate("a red circle", 9, seed=3, mode="teacher", steps=4, video=video, noise_level=1e-4)
    autoencoder = tiny_pipeline.autoencoder
    round_trip = to_uint8(autoencoder.decode(tiny_pipeline._encode_video(video, 9)))
    assert np.abs(kept.astype(int) - round_trip.astype(int)).max() <= 2
    assert np.abs(kept.astype(int) - plain.astype(int)).max() > 10


def test_bad_start_videos_are_refused(tiny_pipeline):
    with pytest.raises(ValueError, match=r"uint8 \[9, 32, 32, 3\]"):
        tiny_pipeline.generate("x", 9, mode="teacher", steps=2, video=_video()[:, :16], noise_level=0.5)
    with pytest.raises(ValueError, match="for the teacher"):
        tiny_pipeline.generate("x", 9, video=_video(), noise_level=0.5)
    with pytest.raises(ValueError, match="start noise level"):
        tiny_pipeline.generate("x", 9, mode="teacher", steps=2, video=_video(), noise_level=0.0)


def test_eval_from_a_noise_level_scores_partly_denoised_ground_truth(tiny_checkpoint, tmp_path):
    out = tmp_path / "partial.json"
    args = ["eval", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--seeds", "0", "--num-seen", "2",
            "--frames", "9", "--steps", "2", "--from-noise-level", "0.5"]
    assert main([*args, "--teacher", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["source"] == "ground truth partly denoised" and report["model"]["from_noise_level"] == 0.5
    assert len(report["cases"]) == len(default_prompt_set(num_seen=2))
    assert 0.0 <= report["splits"]["all"]["colour"] <= 1.0
    assert main(args) == 2  # the student has no such mode
