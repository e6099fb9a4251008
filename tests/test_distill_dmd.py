"""Distillation stage 3: the DMD gradient, the critic/student schedule, both student inputs, resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from causvid.checkpoint import load_tensors
from causvid.cli import main
from causvid.pipeline import load_pipeline
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas
from causvid.sharding import agreed_generator
from distill.dmd import DMD, dmd_gradient
from distill.self_forcing import self_forcing_rollout


def _toy_score(target: torch.Tensor):
    """A 'model' whose x0 prediction is always `target` (v = (x_t - x0) / sigma)."""

    def score(x, sigma, text):
        return (x - target) / sigma.view(-1, 1, 1, 1, 1)

    return score


def _dmd_step(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    dmd = DMD(_toy_score(real), guidance_scale=1.0)
    loss, _ = dmd.student_loss(x, _toy_score(fake), None, None, torch.Generator().manual_seed(0))
    loss.backward()
    return x.grad


def test_dmd_gradient_vanishes_when_fake_matches_real_and_points_to_real():
    x = torch.randn(2, 4, 3, 5, 5)
    real = torch.randn(2, 4, 3, 5, 5)
    assert torch.count_nonzero(_dmd_step(x, real, real)) == 0
    # A critic that has fitted the student (fake x0 = x): descent moves x towards the real x0.
    grad = _dmd_step(x, real, x)
    torch.testing.assert_close(grad, dmd_gradient(x, real, x) / x.numel())
    assert ((x - grad * x.numel() * 0.1 - real).norm() < (x - real).norm())
    # Normalised per sample: scaling one sample's distance to real does not change its gradient.
    far = x.clone()
    far[1] = real[1] + 10 * (x[1] - real[1])
    torch.testing.assert_close(dmd_gradient(far, real, far)[1], dmd_gradient(x, real, x)[1])


def _run_config(tmp_path, name, teacher, data, **objective_args):
    config = {
        "objective": "dmd", "out_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 2,
        "lr": {"student": 1e-3, "critic": 1e-3}, "warmup_steps": 1, "log_every": 1, "sample_every": 1000,
        "checkpoint_every": 2, "ema_decay": 0.9, "betas": [0.0, 0.999], "data": data,
        "objective_args": {"teacher": str(teacher), "student_every": 2, "sample_cases": 1, "sample_frames": 9}
        | objective_args,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(run) -> list[dict]:
    """metrics.csv rows without the timing column (which differs between identical runs)."""
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds_per_step"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def pairs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    assert main(["distill", "ode-pairs", "--teacher", str(tiny_checkpoint), "--out", str(out), "--num", "4",
                 "--batch", "2", "--frames", "13", "--device", "cpu"]) == 0
    return out


def test_causvid_dmd_steps_critic_every_step_student_every_rth_and_resumes_exactly(pairs, tiny_checkpoint, tmp_path):
    data = {"type": "ode_pairs", "root": str(pairs)}
    straight = _run_config(tmp_path, "straight", tiny_checkpoint, data)
    assert main(["distill", "dmd", "--config", str(straight)]) == 0
    rows = _metrics(tmp_path / "straight")
    assert [r["step"] for r in rows if r.get("loss_critic")] == ["1", "2", "3", "4"]
    # The student steps at iterations 0 and 2 (r = 2); between them the log carries its last loss.
    student_losses = [r["loss_student"] for r in rows]
    assert student_losses[0] == student_losses[1] != student_losses[2] == student_losses[3]
    checkpoint = next((tmp_path / "straight").glob("checkpoint-0000004"))
    steps = {name: load_tensors(checkpoint / f"{name}_optimizer.safetensors")["opt.0.step"].item()
             for name in ("student", "critic")}
    assert steps == {"student": 2, "critic": 4}
    assert not (checkpoint / "critic_ema.safetensors").exists()  # the export reads the student's alone

    split = _run_config(tmp_path, "split", tiny_checkpoint, data)
    assert main(["distill", "dmd", "--config", str(split), "--max-steps", "2"]) == 0
    assert main(["distill", "dmd", "--config", str(split), "--resume"]) == 0
    assert _metrics(tmp_path / "split") == rows
    for name in ("student", "critic", "student_ema"):
        a = load_tensors(checkpoint / f"{name}.safetensors")
        b = load_tensors(tmp_path / "split" / "checkpoint-0000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The export is a pipeline whose student is the EMA student, with the teacher alongside.
    pipe = load_pipeline(tmp_path / "straight" / "export", "cpu", torch.float32)
    ema = load_tensors(checkpoint / "student_ema.safetensors")
    student = pipe.denoiser.state_dict()
    assert all(torch.equal(student[k], ema[k]) for k in ema)
    assert pipe.teacher is not None


def test_self_forcing_dmd_with_a_student_from_a_pipeline(tiny_checkpoint, tmp_path):
    config = _run_config(tmp_path, "sf", tiny_checkpoint, {"type": "prompts", "seed": 1},
                         student_input="self_forcing", num_frames=13,
                         student_init=str(tiny_checkpoint), sample_frames=9)
    assert main(["distill", "dmd", "--config", str(config), "--max-steps", "3"]) == 0
    rows = _metrics(tmp_path / "sf")
    student_losses = [r["loss_student"] for r in rows]
    assert student_losses[0] == student_losses[1] != student_losses[2]  # iterations 0 and 2
    assert all(float(r["loss_critic"]) >= 0 for r in rows)
    load_pipeline(tmp_path / "sf" / "export", "cpu", torch.float32)
    # The wrong data for the input mode is refused.
    bad = _run_config(tmp_path, "bad", tiny_checkpoint, {"type": "prompts"})
    assert main(["distill", "dmd", "--config", str(bad)]) == 2


def test_self_forcing_rollout_keeps_a_graph_only_for_each_blocks_exit_step(tiny_denoiser):
    sigmas = student_sigmas([1000, 750, 500, 250])
    calls = []
    tiny_denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), float(args[1][0]), kwargs.get("write_cache"))),
        with_kwargs=True,
    )
    rng = torch.Generator().manual_seed(5)
    rollout = CausalRollout(tiny_denoiser, sigmas, (4, 8, 8), batch=2, rng=rng)
    text = torch.randn(2, 32, 384)
    video = self_forcing_rollout(rollout, tiny_denoiser, text, 6, rng)
    assert video.shape == (2, 4, 6, 8, 8) and video.requires_grad

    blocks, current = [], []
    for call in calls:
        current.append(call)
        if call[2]:  # the commit closes a block
            blocks.append(current)
            current = []
    assert len(blocks) == 3 and not current
    for block in blocks:
        *steps, commit = block
        *before, exit_call = steps
        assert commit[0] is False and commit[1] == 0.0  # the clean pass into the cache: no graph
        assert exit_call[0] is True  # the one step with a graph...
        assert [c[0] for c in before] == [False] * len(before)  # ...after gradient-free steps
        assert [c[1] for c in steps] == pytest.approx(sigmas[: len(steps)].tolist())  # in schedule order
    assert len({len(block) for block in blocks}) > 1  # exit steps are drawn per block

    video.square().mean().backward()
    assert all(p.grad is not None for p in tiny_denoiser.parameters() if p.requires_grad)


@pytest.mark.parametrize("student_input", ["causvid", "self_forcing"])
def test_two_cpu_processes_keep_student_and_critic_in_step(student_input, pairs, tiny_checkpoint, tmp_path,
                                                             run_as_two_cpu_processes):
    # The loop checks at each checkpoint that both ranks hold the same student and critic: a
    # module used outside DDP's all-reduce (the critic in the student's loss, the rollout's
    # gradient-free steps) would fail it.
    data = {"type": "ode_pairs", "root": str(pairs)} if student_input == "causvid" else {"type": "prompts", "seed": 1}
    config = _run_config(tmp_path, "ddp", tiny_checkpoint, data, student_input=student_input, num_frames=13)
    run_as_two_cpu_processes(["distill", "dmd", "--config", str(config)])
    rows = _metrics(tmp_path / "ddp")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    state = json.loads((tmp_path / "ddp" / "checkpoint-0000004" / "state.json").read_text())
    assert state["world_size"] == 2


def _stream_blocks(denoiser, texts, seed, **cache):
    """Blocks [B, C, F, H, W] as inference makes them: `texts[b]` for block b, re-cached on a change."""
    rollout = CausalRollout(denoiser, student_sigmas([1000, 750, 500, 250]), (4, 8, 8), batch=texts[0].shape[0],
                            rng=torch.Generator().manual_seed(seed), **cache)
    blocks = []
    with torch.no_grad():
        for b, text in enumerate(texts):
            if b and text is not texts[b - 1]:
                rollout.recache(text)
            blocks.append(rollout.next_block(text))
    return torch.cat(blocks, dim=2), rollout


@pytest.mark.parametrize("start_block", [0, 3, 5])
def test_a_long_rollout_judges_the_window_where_it_lands_with_the_inference_cache(tiny_denoiser, start_block):
    sigmas = student_sigmas([1000, 750, 500, 250])
    cache = {"sink_frames": 1, "window_frames": 4}  # rolls from the third block of 2 frames on
    text = torch.randn(2, 32, 384)
    rollout = CausalRollout(tiny_denoiser, sigmas, (4, 8, 8), batch=2, rng=torch.Generator().manual_seed(3),
                            **cache)
    # With the exit step at the last level, a window block is made exactly as inference makes it.
    window = self_forcing_rollout(rollout, tiny_denoiser, text, 4, torch.Generator(), start_block=start_block,
                                  exit_step=len(sigmas) - 1)
    expected, streamed = _stream_blocks(tiny_denoiser, [text] * (start_block + 2), seed=3, **cache)
    assert window.shape == (2, 4, 4, 8, 8) and window.requires_grad
    torch.testing.assert_close(window.detach(), expected[:, :, 2 * start_block:], atol=1e-5, rtol=1e-5)
    assert rollout.frames_done == streamed.frames_done == 2 * (start_block + 2)
    assert rollout.cache.cached_frames == streamed.cache.cached_frames == min(5, 2 * (start_block + 2))
    torch.testing.assert_close(rollout.history, streamed.history, atol=1e-5, rtol=1e-5)


def test_a_long_rollout_keeps_a_graph_only_inside_the_window(tiny_denoiser):
    sigmas = student_sigmas([1000, 750, 500, 250])
    graphs = []
    tiny_denoiser.register_forward_pre_hook(lambda module, args, kwargs: graphs.append(torch.is_grad_enabled()),
                                            with_kwargs=True)
    rollout = CausalRollout(tiny_denoiser, sigmas, (4, 8, 8), batch=1, sink_frames=1, window_frames=4,
                            rng=torch.Generator().manual_seed(0))
    self_forcing_rollout(rollout, tiny_denoiser, torch.randn(1, 32, 384), 4, torch.Generator(), start_block=6,
                         exit_step=len(sigmas) - 1)
    # 6 blocks before the window: 4 steps and a commit each, all without a graph; then per window
    # block 3 gradient-free steps, the exit step with a graph, and the commit.
    assert graphs == [False] * 30 + [False, False, False, True, False] * 2


def test_a_switch_in_a_rollout_follows_the_inference_switch(tiny_denoiser, text_encoder):
    sigmas = student_sigmas([1000, 750, 500, 250])
    red, blue = text_encoder.encode(["a red circle"] * 2), text_encoder.encode(["a blue square"] * 2)
    cache = {"sink_frames": 1, "window_frames": 4}
    windows = {}
    for recache in (True, False):
        rollout = CausalRollout(tiny_denoiser, sigmas, (4, 8, 8), batch=2, rng=torch.Generator().manual_seed(4),
                                **cache)
        windows[recache] = self_forcing_rollout(rollout, tiny_denoiser, red, 4, torch.Generator(), start_block=3,
                                                switch=(2, blue), recache=recache, exit_step=len(sigmas) - 1).detach()
    expected, _ = _stream_blocks(tiny_denoiser, [red, red, blue, blue, blue], seed=4, **cache)
    torch.testing.assert_close(windows[True], expected[:, :, 6:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(windows[False], windows[True])  # the re-cache changes what follows
    with pytest.raises(ValueError, match="by the window's start"):
        self_forcing_rollout(rollout, tiny_denoiser, red, 4, torch.Generator(), start_block=1, switch=(2, blue))


def test_long_rollouts_with_switches_judge_a_window_under_the_prompt_it_was_made_with(tiny_checkpoint, tmp_path):
    from causvid.train import TrainConfig, build_objective
    from distill.dmd import DMDObjective

    objectives = {"dmd": DMDObjective}
    config = TrainConfig.from_yaml(_run_config(tmp_path, "long", tiny_checkpoint, {"type": "prompts", "seed": 1},
                                               student_input="self_forcing", num_frames=13, rollout_blocks=6,
                                               switch_probability=1.0))
    objective = build_objective(config, objectives)
    assert objective.window_blocks == 2  # 13 frames: 4 latent frames, blocks of 2
    item = objective.dataset()[0]
    batch = {"caption": [item["caption"]] * 2, "switch_caption": [item["switch_caption"]] * 2}
    old, new = objective.encode(batch["caption"], "cpu"), objective.encode(batch["switch_caption"], "cpu")
    starts, switched = [], 0
    for seed in range(20):
        # The objective's first draw from the layout generator: the window's block.
        start = int(torch.randint(5, (1,), generator=agreed_generator(torch.Generator().manual_seed(seed))))
        with torch.no_grad():
            x, text = objective.generate(objective.student, batch, old, torch.Generator().manual_seed(seed), "cpu")
        assert x.shape[2] == 4  # the window's two blocks
        # From block 1 on a switch is always drawn (probability 1), and the window is judged under it.
        assert torch.equal(text, new if start > 0 else old)
        starts.append(start)
        switched += start > 0
    assert len(set(starts)) >= 3 and 0 < switched < 20
    with pytest.raises(ValueError, match="cover the judged window"):
        build_objective(TrainConfig.from_yaml(_run_config(
            tmp_path, "short", tiny_checkpoint, {"type": "prompts"}, student_input="self_forcing", num_frames=13,
            rollout_blocks=1)), objectives)


def test_long_switching_dmd_trains_and_resumes_exactly(tiny_checkpoint, tmp_path):
    args = dict(student_input="self_forcing", num_frames=13, rollout_blocks=4, switch_probability=0.5)
    straight = _run_config(tmp_path, "straight", tiny_checkpoint, {"type": "prompts", "seed": 1}, **args)
    split = _run_config(tmp_path, "split", tiny_checkpoint, {"type": "prompts", "seed": 1}, **args)
    assert main(["distill", "dmd", "--config", str(straight)]) == 0
    assert main(["distill", "dmd", "--config", str(split), "--max-steps", "2"]) == 0
    assert main(["distill", "dmd", "--config", str(split), "--resume"]) == 0
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "split")


def test_image_to_video_rollouts_start_from_the_prompts_scene(tiny_checkpoint, tmp_path, monkeypatch):
    from causvid.train import TrainConfig, build_objective
    from distill.dmd import DMDObjective

    config = TrainConfig.from_yaml(_run_config(tmp_path, "i2v", tiny_checkpoint, {"type": "prompts", "seed": 1},
                                               student_input="self_forcing", num_frames=13, image_probability=1.0))
    objective = build_objective(config, {"dmd": DMDObjective})
    item = objective.dataset()[3]
    batch = {"caption": [item["caption"]] * 2, "scene": [item["scene"]] * 2, "switch_caption": [item["switch_caption"]] * 2}
    commits = []
    original = CausalRollout.commit
    monkeypatch.setattr(CausalRollout, "commit", lambda self, clean, text: (commits.append(clean), original(self, clean, text)))
    with torch.no_grad():
        x, _ = objective.generate(objective.student, batch, objective.encode(batch["caption"], "cpu"),
                                  torch.Generator().manual_seed(0), "cpu")
    assert x.shape[2] == 4 and [c.shape[2] for c in commits] == [1, 2, 2]  # the image, then the window's blocks
    # The first commit is the encoded first frame of the caption's scene.
    rng = torch.Generator().manual_seed(0)
    agreed_generator(rng)  # the layout's seed; the window's block and the image draw come from it
    torch.testing.assert_close(commits[0], objective.first_frames(batch["scene"], rng))


def test_frozen_models_run_in_bf16_on_an_accelerator_under_bf16_and_stay_fp32_on_the_cpu(tiny_checkpoint, tmp_path):
    from causvid.train import TrainConfig, build_objective
    from distill.dmd import DMDObjective

    for device, precision, expected in (("cpu", "bf16", torch.float32), ("meta", "no", torch.float32),
                                        ("meta", "bf16", torch.bfloat16)):
        config = TrainConfig.from_yaml(_run_config(tmp_path, f"{device}_{precision}", tiny_checkpoint,
                                                   {"type": "prompts"}, student_input="self_forcing", num_frames=13))
        config.mixed_precision = precision
        objective = build_objective(config, {"dmd": DMDObjective})
        objective.place(torch.device(device))
        assert {p.dtype for p in objective.teacher.parameters()} == {expected}
        assert {p.dtype for p in objective.text_encoder.model.parameters()} == {expected}
        assert {p.dtype for p in objective.critic.parameters()} == {torch.float32}  # trained: the loop's
