"""Distillation stages 1-2: teacher ODE pairs (shards, exact endpoints, resume) and ODE initialisation."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from causvid.checkpoint import load_tensors, read_json
from causvid.cli import main
from causvid.pipeline import load_pipeline
from causvid.samplers import guided_velocity, sample_euler
from causvid.schedule import student_sigmas, teacher_sigmas
from distill.ode_init import ode_regression_loss
from causvid.data.prompts import shapes_prompt
from distill.ode_pairs import OdePairs, ode_grid, pair_noise

FRAMES = 13  # 4 latent frames: two causal blocks of the tiny preset (block_frames 2)


def _make_pairs(out, checkpoint, *extra) -> int:
    return main(["distill", "ode-pairs", "--teacher", str(checkpoint), "--out", str(out), "--num", "6",
                 "--batch", "2", "--frames", str(FRAMES), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def pairs(tiny_checkpoint, tmp_path_factory):
    config = tmp_path_factory.mktemp("cfg") / "pairs.yaml"
    config.write_text(yaml.safe_dump({"shard_size": 4, "seed": 3}))  # flags override the config
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    assert _make_pairs(out, tiny_checkpoint, "--config", str(config)) == 0
    return out


def test_shards_hold_trajectories_at_the_student_levels(pairs, tiny_pipeline):
    manifest = read_json(pairs / "manifest.json")
    assert manifest["sigmas"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    first, second = (load_tensors(pairs / f"shard-0000{i}.safetensors")["trajectory"] for i in (0, 1))
    assert first.shape == (4, 5, 4, 4, 8, 8) and second.shape == (2, 5, 4, 4, 8, 8)
    assert first.dtype == torch.bfloat16
    info = read_json(pairs / "shard-00001.json")
    assert info["indices"] == [4, 5]
    assert info["prompts"] == [shapes_prompt(3, i)["caption"] for i in (4, 5)]
    # The first stored level (sigma 1) is the starting noise of that index.
    assert torch.equal(second[1, 0], pair_noise(3, 5, (4, 4, 8, 8)).bfloat16())


def test_endpoint_equals_running_the_teacher_sampler(pairs, tiny_pipeline):
    pipe = tiny_pipeline
    stored = load_tensors(pairs / "shard-00001.safetensors")["trajectory"][0]  # index 4
    text = pipe.encode_prompt(shapes_prompt(3, 4)["caption"])
    velocity = guided_velocity(pipe.teacher, text, pipe.encode_prompt(""), pipe.config.guidance_scale)
    noise = pair_noise(3, 4, (4, 4, 8, 8))[None]
    with torch.no_grad():
        endpoint = sample_euler(velocity, noise, teacher_sigmas(4))
        halfway = sample_euler(velocity, noise, teacher_sigmas(4)[:3])  # 1 -> 0.75 -> 0.5
    torch.testing.assert_close(stored[-1].float(), endpoint[0], atol=2e-2, rtol=1e-2)  # bf16 storage
    torch.testing.assert_close(stored[2].float(), halfway[0], atol=2e-2, rtol=1e-2)
    assert not torch.allclose(stored[-1].float(), stored[0].float(), atol=0.1)


def test_resume_skips_complete_shards_and_refuses_to_overwrite(pairs, tiny_checkpoint, tmp_path):
    out = tmp_path / "again"
    assert _make_pairs(out, tiny_checkpoint, "--seed", "3", "--shard-size", "4") == 0
    assert _make_pairs(out, tiny_checkpoint, "--seed", "3") == 2  # exists: needs --resume
    assert _make_pairs(out, tiny_checkpoint, "--seed", "4", "--shard-size", "4", "--resume") == 2  # different settings
    before = load_tensors(out / "shard-00000.safetensors")["trajectory"]
    untouched = (out / "shard-00001.safetensors").stat().st_mtime_ns
    (out / "shard-00000.safetensors").unlink()  # as if killed before the shard was finished
    assert _make_pairs(out, tiny_checkpoint, "--seed", "3", "--shard-size", "4", "--resume") == 0
    assert torch.equal(load_tensors(out / "shard-00000.safetensors")["trajectory"], before)
    assert (out / "shard-00001.safetensors").stat().st_mtime_ns == untouched  # complete: skipped
    assert len(OdePairs(out)) == 6


def test_two_processes_write_alternate_shards_with_the_same_contents(pairs, tiny_checkpoint, tmp_path):
    config = tmp_path / "pairs.yaml"  # a config, since torchrun would take --num for its own flags
    config.write_text(yaml.safe_dump({"teacher": str(tiny_checkpoint), "out": str(tmp_path / "pairs"), "num": 6,
                                      "batch": 2, "shard_size": 2, "num_frames": FRAMES, "seed": 3}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "causvid.cli", "distill", "ode-pairs", "--config", str(config)],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 2 shards" in result.stdout and "wrote 1 shards" in result.stdout  # ranks 0 and 1
    sharded = torch.cat([OdePairs(tmp_path / "pairs")[i]["trajectory"][None] for i in range(6)])
    single = torch.cat([OdePairs(pairs)[i]["trajectory"][None] for i in range(6)])
    torch.testing.assert_close(sharded, single, atol=2e-2, rtol=1e-2)  # bf16 of the same trajectories


def test_grid_contains_the_student_levels_exactly():
    levels = torch.cat([student_sigmas([1000, 750, 500, 250]), torch.zeros(1)])
    grid, positions = ode_grid(40, 1.0, levels)  # already on the grid: unchanged
    assert torch.equal(grid, teacher_sigmas(40)) and torch.equal(grid[positions], levels)
    grid, positions = ode_grid(50, 1.0, levels)  # steps of 0.02 miss 0.75 and 0.25
    assert len(grid) == 51 + 2 and torch.equal(grid[positions], levels)
    shifted, positions = ode_grid(10, 3.0, levels)  # shift 3 puts .75 and .5 on the grid, not .25
    assert torch.equal(shifted[positions], levels)
    assert len(shifted) == 11 + 1 and bool((shifted[:-1] > shifted[1:]).all())


def test_regression_input_takes_each_block_from_its_level():
    trajectory = torch.arange(5.0).view(1, 5, 1, 1, 1, 1).expand(2, 5, 3, 4, 2, 2).clone()  # value = level index
    seen = {}

    def student(x, sigma, text, causal):
        seen.update(x=x, sigma=sigma, causal=causal)
        return torch.zeros_like(x)  # x0 = x_t

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    loss, _ = ode_regression_loss(student, trajectory, sigmas, None, 2, torch.Generator().manual_seed(0))
    level = seen["x"][:, 0, :, 0, 0]  # [B, F]
    assert seen["causal"] and torch.equal(level[:, 0], level[:, 1]) and torch.equal(level[:, 2], level[:, 3])
    assert bool((level < 4).all())  # never the endpoint itself
    assert torch.equal(seen["sigma"], sigmas[level.long()])
    assert math.isclose(loss.item(), ((level - 4) ** 2).mean().item(), rel_tol=1e-6)


def test_ode_init_trains_a_causal_student_and_exports_a_pipeline(pairs, tiny_checkpoint, tmp_path):
    config = {
        "objective": "ode_init", "out_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2,
        "lr": {"student": 1e-3}, "warmup_steps": 1, "log_every": 1, "sample_every": 3, "checkpoint_every": 3,
        "data": {"type": "ode_pairs", "root": str(pairs)},
        "objective_args": {"teacher": str(tiny_checkpoint), "sample_cases": 1, "sample_frames": 9},
    }
    path = tmp_path / "ode_init.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "dmd", "--config", str(path)]) == 2  # wrong kind of config
    assert main(["distill", "ode-init", "--config", str(path)]) == 0
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["loss_student"]) for r in rows if r.get("loss_student")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(r.get("bench_colour") for r in rows) and list((tmp_path / "run" / "samples").glob("*.png"))

    pipe = load_pipeline(tmp_path / "run" / "export", "cpu", torch.float32)
    student, teacher = pipe.denoiser.state_dict(), pipe.teacher.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)
    # Causal: changing the second block leaves the first block's prediction unchanged.
    x, sigma, text = torch.randn(1, 4, 4, 8, 8), torch.full((1, 4), 0.5), pipe.encode_prompt("a red circle")
    changed = x.clone()
    changed[:, :, 2:] = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        a, b = (pipe.denoiser(v, sigma, text, causal=True) for v in (x, changed))
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.allclose(a[:, :, 2:], b[:, :, 2:])
    assert pipe.generate("a red circle", num_frames=9).shape == (9, 32, 32, 3)
