"""Every stage on a folder of one's own captioned videos, through the recipe command and the CLI:
autoencoder -> teacher -> ODE pairs -> ODE init -> DMD -> generate, at the tiny size."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import yaml

from causvid.cli import main
from causvid.data.prompts import TrainingPrompts, read_prompt_file

SIZES = [(48, 64), (64, 48), (40, 72), (96, 96)]
RATES = [12, 24, 30]


def _write_clip(path, height: int, width: int, fps: int, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    background, colour = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            image = np.empty((height, width, 3), np.uint8)
            image[:] = background
            x = (4 * t) % (width - 12)
            image[height // 3 : height // 3 + 12, x : x + 12] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """14 readable clips of several sizes and frame rates, a corrupt file, a too-short clip and a missing one."""
    root = tmp_path_factory.mktemp("my_videos")
    captions = []
    for i in range(14):
        height, width = SIZES[i % len(SIZES)]
        fps = RATES[i % len(RATES)]
        _write_clip(root / f"clip{i:02d}.mp4", height, width, fps, round(1.5 * fps), seed=i)
        captions.append({"file": f"clip{i:02d}.mp4", "caption": f"a square of colour {i} crossing the frame"})
    (root / "broken.mp4").write_bytes(b"not a video" * 100)
    _write_clip(root / "short.mp4", 48, 64, 24, 4, seed=99)
    captions += [{"file": "broken.mp4", "caption": "broken"}, {"file": "short.mp4", "caption": "short"},
                 {"file": "gone.mp4", "caption": "gone"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    return root


def test_prompt_files_of_every_kind(tmp_path, folder):
    (tmp_path / "p.txt").write_text("a red ball\n\n  a blue cube \n")
    (tmp_path / "p.csv").write_text('caption,other\n"a red ball, rolling",x\n')
    assert read_prompt_file(tmp_path / "p.txt") == ["a red ball", "a blue cube"]
    assert read_prompt_file(tmp_path / "p.csv") == ["a red ball, rolling"]
    assert len(read_prompt_file(folder / "captions.jsonl")) == 17
    prompts = TrainingPrompts(seed=1, file=tmp_path / "p.txt")
    item = prompts[5]
    assert item == prompts[5] and item["caption"] != item["switch_caption"] and "scene" not in item
    assert not prompts.has_scenes and TrainingPrompts(seed=1).has_scenes


def _config(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_whole_chain_on_a_folder_of_videos(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    clips = {"type": "folder", "root": str(folder), "num_frames": 13, "height": 32, "width": 32, "fps": 12}
    loop = {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "sample_every": 1000,
            "checkpoint_every": 2}
    prompts = str(folder / "captions.jsonl")
    _config(tmp_path / "configs/1_autoencoder.yaml", loop | {
        "objective": "autoencoder", "out_dir": "runs/autoencoder", "lr": {"autoencoder": 1e-4}, "data": clips,
        "objective_args": {"preset_name": "tiny", "stats_clips": 2, "context_frames": [0], "target_frames": 12}})
    _config(tmp_path / "configs/2_teacher.yaml", loop | {
        "objective": "teacher", "out_dir": "runs/teacher", "lr": {"teacher": 1e-4}, "data": clips,
        "objective_args": {"autoencoder": "runs/autoencoder/export", "preset_name": "tiny", "bank_size": 64,
                           "object_weight": 10.0}})
    _config(tmp_path / "configs/3_ode_pairs.yaml", {
        "objective": "ode_pairs", "teacher": "runs/teacher/export", "out": "runs/ode_pairs", "num": 4, "batch": 2,
        "shard_size": 2, "num_frames": 13, "steps": 4, "prompts": prompts})
    _config(tmp_path / "configs/4_ode_init.yaml", loop | {
        "objective": "ode_init", "out_dir": "runs/ode_init", "lr": {"student": 1e-4},
        "data": {"type": "ode_pairs", "root": "runs/ode_pairs"}, "objective_args": {"teacher": "runs/teacher/export"}})
    _config(tmp_path / "configs/5_dmd.yaml", loop | {
        "objective": "dmd", "out_dir": "runs/dmd", "lr": {"student": 1e-4, "critic": 1e-4}, "betas": [0.0, 0.999],
        "data": {"type": "prompts", "file": prompts},
        "objective_args": {"teacher": "runs/teacher/export", "student_init": "runs/ode_init/export",
                           "student_input": "self_forcing", "num_frames": 13, "student_every": 1,
                           "switch_probability": 0.5, "rollout_blocks": 3}})
    assert main(["recipe", "configs/5_dmd.yaml", "--threads", "1"]) == 0

    bank = json.loads((tmp_path / "runs/teacher/latent_bank/manifest.json").read_text())
    assert bank["counts"] == [14] and not bank["object_masks"]  # 14 readable of 16 present, no masks on footage
    pairs = json.loads((tmp_path / "runs/ode_pairs/shard-00000.json").read_text())
    assert set(pairs["prompts"]) <= set(read_prompt_file(folder / "captions.jsonl"))
    capsys.readouterr()
    assert main(["eval", "--autoencoder", "runs/autoencoder/export", "--folder", str(folder), "--frames", "13",
                 "--height", "32", "--width", "32", "--fps", "12"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["clips"] == 14 and record["psnr_db"] > 0
    out = tmp_path / "out.npy"
    assert main(["generate", "a square of colour 3 crossing the frame", "-o", str(out), "--frames", "13",
                 "--checkpoint", "runs/dmd/export", "--device", "cpu"]) == 0
    assert np.load(out).shape == (13, 32, 32, 3)
