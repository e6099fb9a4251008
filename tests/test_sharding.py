"""Sharded training (fsdp: true): the DMD stage's student and critic sharded over 2 gloo ranks
train as data parallelism does, resume exactly, and their checkpoints load unsharded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from causvid.checkpoint import load_tensors
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import load_pipeline
from causvid.train import EMA, TrainConfig, load_checkpoint


def _dmd_config(tmp_path, name: str, teacher, max_steps: int, **settings) -> str:
    config = {
        "objective": "dmd", "out_dir": str(tmp_path / name), "max_steps": max_steps, "batch_size": 1,
        "lr": {"student": 1e-3, "critic": 1e-3}, "warmup_steps": 1, "log_every": 1, "sample_every": 1000,
        "checkpoint_every": 1, "ema_decay": 0.9, "betas": [0.0, 0.999], "data": {"type": "prompts", "seed": 1},
        "gradient_checkpointing": True,
        "objective_args": {"teacher": str(teacher), "student_every": 2, "sample_cases": 1, "sample_frames": 9,
                           "num_frames": 13, "rollout_blocks": 3, "switch_probability": 0.5,
                           "student_input": "self_forcing"},
    } | settings
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _checkpoint(run, step: int) -> dict[str, torch.Tensor]:
    path = run / f"checkpoint-{step:07d}"
    return {f"{name}/{k}": v for name in ("student", "critic", "student_ema", "student_optimizer", "critic_optimizer")
            for k, v in load_tensors(path / f"{name}.safetensors").items()}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory, run_as_two_cpu_processes):
    """The same 2 steps data-parallel and sharded, and sharded as 1 step then a resume."""
    tmp = tmp_path_factory.mktemp("sharding")
    for name, steps, settings, extra in [("ddp", 2, {}, []), ("fsdp", 2, {"fsdp": True}, []),
                                         ("fsdp_resumed", 1, {"fsdp": True}, []),
                                         ("fsdp_resumed", 2, {"fsdp": True}, ["--resume"])]:
        run_as_two_cpu_processes(["distill", "dmd", "--config", _dmd_config(tmp, name, tiny_checkpoint, steps, **settings),
                                  *extra])
    return tmp


def test_sharded_training_matches_data_parallel(runs):
    ddp, fsdp = _checkpoint(runs / "ddp", 2), _checkpoint(runs / "fsdp", 2)
    weights = [k for k in ddp if "optimizer" not in k]
    assert weights and {k for k in ddp if "optimizer" not in k} == {k for k in fsdp if "optimizer" not in k}
    for key in weights:  # the same gradients, reduced in another order
        torch.testing.assert_close(fsdp[key], ddp[key], atol=2e-5, rtol=1e-4, msg=key)
    # Trained at all: the critic steps every iteration, the student every second.
    first = _checkpoint(runs / "fsdp_resumed", 1)
    assert not torch.equal(first["critic/transformer.proj_out.weight"], fsdp["critic/transformer.proj_out.weight"])
    assert fsdp["student_optimizer/opt.transformer.proj_out.weight.step"] == 1
    assert fsdp["critic_optimizer/opt.transformer.proj_out.weight.step"] == 2
    # Sharded optimiser states are saved by parameter name, with the moments of every parameter.
    student = WanDenoiser.from_pretrained(runs / "fsdp" / "export" / "transformer", block_frames=2)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    moments = {k.removeprefix("student_optimizer/opt.").rsplit(".", 1)[0] for k in fsdp if k.startswith("student_optimizer")}
    assert moments == names
    state = json.loads((runs / "fsdp" / "checkpoint-0000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["param_groups"]["critic"][0]["params"][0] in names


def test_sharded_training_resumes_exactly(runs):
    straight, resumed = _checkpoint(runs / "fsdp", 2), _checkpoint(runs / "fsdp_resumed", 2)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_sharded_export_is_the_average_of_the_full_weights(runs):
    exported = WanDenoiser.from_pretrained(runs / "fsdp" / "export" / "transformer", block_frames=2)
    ema = _checkpoint(runs / "fsdp", 2)
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value.float(), ema[f"student_ema/{name}"], msg=name)


def test_a_sharded_checkpoint_loads_into_one_unsharded_process(runs):
    config = TrainConfig.from_yaml(runs / "fsdp.yaml")
    student = WanDenoiser.from_pretrained(runs / "fsdp" / "export" / "transformer", block_frames=2)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr["student"])
    ema = EMA(student, 0.9)
    assert load_checkpoint(runs / "fsdp", {"student": student}, {"student": optimizer}, {"student": ema}) == 2
    saved = _checkpoint(runs / "fsdp", 2)
    torch.testing.assert_close(student.transformer.proj_out.weight, saved["student/transformer.proj_out.weight"])
    # Parameter names became the optimiser's numbers, in its parameter order.
    first = next(p for p in student.parameters() if p.requires_grad)
    first_name = next(n for n, p in student.named_parameters() if p.requires_grad)
    torch.testing.assert_close(optimizer.state[first]["exp_avg"], saved[f"student_optimizer/opt.{first_name}.exp_avg"])
    # The export is a pipeline that streams.
    assert load_pipeline(runs / "fsdp" / "export").generate("a red circle", 9).shape == (9, 32, 32, 3)
