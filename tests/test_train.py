"""The training loop: exact resume (also after a kill), accelerate with 2 processes, and export."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from causvid.checkpoint import CheckpointError, load_tensors
from causvid.cli import main

TINY_AE = {
    "objective": "autoencoder", "max_steps": 6, "batch_size": 2, "lr": {"autoencoder": 2e-4},
    "warmup_steps": 2, "log_every": 1, "sample_every": 100, "checkpoint_every": 1,
    "data": {"type": "shapes", "num_frames": 9, "height": 32, "width": 32, "seed": 0},
    "objective_args": {"preset_name": "tiny", "stats_clips": 2, "context_frames": [0, 5], "target_frames": 4},
}


def _config(tmp_path: Path, name: str, **overrides) -> Path:
    config = TINY_AE | {"out_dir": str(tmp_path / name)} | overrides
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(run: Path, column: str = "loss_autoencoder") -> dict[int, str]:
    with open(run / "metrics.csv", newline="") as handle:
        return {int(r["step"]): r[column] for r in csv.DictReader(handle) if r.get(column)}


def _weights(run: Path, module: str = "autoencoder") -> dict[str, torch.Tensor]:
    return load_tensors(sorted(run.glob("checkpoint-*"))[-1] / f"{module}.safetensors")


def test_resume_continues_exactly(tmp_path):
    straight = _config(tmp_path, "straight")
    assert main(["train", "autoencoder", "--config", str(straight)]) == 0
    split = _config(tmp_path, "split")
    assert main(["train", "autoencoder", "--config", str(split), "--max-steps", "3"]) == 0
    # Refuses to silently restart over an existing run.
    assert main(["train", "autoencoder", "--config", str(split)]) == 2
    assert main(["train", "autoencoder", "--config", str(split), "--resume"]) == 0
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    assert len(_losses(tmp_path / "straight")) == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Checkpoints are pruned to keep_checkpoints, and the export loads as a diffusers model.
    assert len(list((tmp_path / "split").glob("checkpoint-*"))) == 2
    from causvid.models.autoencoder import VideoAutoencoder

    VideoAutoencoder.from_pretrained(tmp_path / "split" / "export")


def test_kill_and_resume_continues_the_loss_curve(tmp_path):
    straight = _config(tmp_path, "straight", max_steps=8)
    assert main(["train", "autoencoder", "--config", str(straight)]) == 0
    killed = _config(tmp_path, "killed", max_steps=8)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "causvid.cli", "train", "autoencoder", "--config", str(killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "latest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.exists() and '"step": 3' in pointer.read_text():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert pointer.exists()
    assert main(["train", "autoencoder", "--config", str(killed), "--resume"]) == 0
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")


ADVERSARIAL = {"lr": {"autoencoder": 2e-4, "discriminator": 2e-4},
               "objective_args": TINY_AE["objective_args"] | {"adversarial_weight": 0.5, "adversarial_start": 2}}


def test_adversarial_training_resumes_exactly_with_its_discriminator(tmp_path):
    straight = _config(tmp_path, "straight", max_steps=4, **ADVERSARIAL)
    assert main(["train", "autoencoder", "--config", str(straight)]) == 0
    split = _config(tmp_path, "split", max_steps=4, **ADVERSARIAL)
    assert main(["train", "autoencoder", "--config", str(split), "--max-steps", "2"]) == 0
    assert main(["train", "autoencoder", "--config", str(split), "--resume"]) == 0
    for column in ("loss_autoencoder", "loss_discriminator"):
        assert _losses(tmp_path / "split", column) == _losses(tmp_path / "straight", column)
        assert len(_losses(tmp_path / "straight", column)) == 4
    for module in ("autoencoder", "discriminator", "autoencoder_ema"):
        a, b = _weights(tmp_path / "straight", module), _weights(tmp_path / "split", module)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Only what the export reads keeps an EMA: the discriminator serves training alone.
    checkpoint = sorted((tmp_path / "straight").glob("checkpoint-*"))[-1]
    assert not (checkpoint / "discriminator_ema.safetensors").exists()
    # The decoder feels the discriminator from adversarial_start (step 2, the third step) on.
    assert sorted(_losses(tmp_path / "straight", "adversarial")) == [3, 4]


def test_the_discriminator_reaches_the_autoencoder_only_through_the_adversarial_term(tmp_path):
    plain = _config(tmp_path, "plain", max_steps=3)
    assert main(["train", "autoencoder", "--config", str(plain)]) == 0
    late = ADVERSARIAL | {"objective_args": ADVERSARIAL["objective_args"] | {"adversarial_start": 10}}
    gated = _config(tmp_path, "gated", max_steps=3, **late)
    assert main(["train", "autoencoder", "--config", str(gated)]) == 0
    # Before adversarial_start the discriminator trains beside an autoencoder that is not affected by it.
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "gated")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "gated", "loss_discriminator")
    on = _config(tmp_path, "on", max_steps=3, **ADVERSARIAL)
    assert main(["train", "autoencoder", "--config", str(on)]) == 0
    c = _weights(tmp_path / "on")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_adaptive_adversarial_weight_matches_the_gradient_norms():
    from causvid.models.discriminator import adaptive_adversarial_weight

    layer = torch.ones(2, 2, requires_grad=True)
    reconstruction = (3.0 * layer).sum()  # gradient norm 3 * 2
    adversarial = (torch.tensor([[1.5, 0.0], [0.0, 0.0]]) * layer).sum()  # gradient norm 1.5
    weight = adaptive_adversarial_weight(reconstruction, adversarial, layer)
    assert weight.item() == pytest.approx(6.0 / 1.5, rel=1e-3)
    assert not weight.requires_grad
    assert adaptive_adversarial_weight(reconstruction, adversarial, layer, max_weight=2.0).item() == 2.0


def test_frozen_forward_gives_gradients_to_the_inputs_only():
    from causvid.models.discriminator import frozen_forward

    module, inputs = torch.nn.Linear(3, 1), torch.randn(4, 3, requires_grad=True)
    outputs = frozen_forward(module, inputs)
    assert torch.equal(outputs, module(inputs))
    outputs.sum().backward()
    assert inputs.grad is not None and all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("adversarial", [False, True], ids=["plain", "adversarial"])
def test_two_cpu_processes_with_accelerate(tmp_path, adversarial, run_as_two_cpu_processes):
    # The loop checks at each checkpoint that both processes hold the same weights; a discriminator
    # whose gradients skip DDP's all-reduce fails it. Each process draws its own clips.
    from_the_start = {"objective_args": ADVERSARIAL["objective_args"] | {"adversarial_start": 0}}
    extra = ADVERSARIAL | from_the_start if adversarial else {}
    config = _config(tmp_path, "ddp", max_steps=3, checkpoint_every=3, **extra)
    run_as_two_cpu_processes(["train", "autoencoder", "--config", str(config)])
    assert len(_losses(tmp_path / "ddp")) == 3
    state = json.loads(next((tmp_path / "ddp").glob("checkpoint-*/state.json")).read_text())
    assert state["world_size"] == 2 and state["step"] == 3


def _teacher_config(tmp_path: Path, name: str, autoencoder: Path, **overrides) -> Path:
    """A 3-step tiny teacher run on a bank of 4 clips; `objective_args` overrides merge into the defaults."""
    objective_args = {"autoencoder": str(autoencoder), "preset_name": "tiny", "bank_size": 4,
                      **overrides.pop("objective_args", {})}
    config = {
        "objective": "teacher", "out_dir": str(tmp_path / name), "max_steps": 3, "batch_size": 2,
        "lr": {"teacher": 1e-4}, "log_every": 1, "sample_every": 100, "checkpoint_every": 3,
        "data": {"type": "shapes", "num_frames": 9, "height": 32, "width": 32, "seed": 0},
        "objective_args": objective_args,
    } | overrides
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tiny_autoencoder(tmp_path: Path) -> Path:
    assert main(["train", "autoencoder", "--config", str(_config(tmp_path, "ae", max_steps=1))]) == 0
    return tmp_path / "ae" / "export"


def test_teacher_objective_trains_and_exports_a_pipeline(tmp_path):
    path = _teacher_config(tmp_path, "teacher", _tiny_autoencoder(tmp_path), sample_every=3, objective_args={
        "sample_steps": 2, "sample_prompts": ["a red circle"], "object_weight": 10.0,
    })
    assert main(["train", "teacher", "--config", str(path)]) == 0
    assert (tmp_path / "teacher" / "latent_bank" / "manifest.json").exists()
    assert list((tmp_path / "teacher" / "samples").glob("*.mp4"))
    out = tmp_path / "clip.npy"
    assert main(["generate", "a red circle", "-o", str(out), "--frames", "9", "--teacher", "--steps", "2",
                 "--checkpoint", str(tmp_path / "teacher" / "export"), "--device", "cpu"]) == 0
    # A config of the wrong kind is refused.
    assert main(["train", "autoencoder", "--config", str(path)]) == 2


def test_loader_workers_change_neither_the_bank_nor_the_losses(tmp_path):
    autoencoder = _tiny_autoencoder(tmp_path)
    runs = {}
    for workers in (0, 2):
        path = _teacher_config(tmp_path, f"teacher_{workers}", autoencoder, num_workers=workers,
                               objective_args={"bank_size": 5})
        assert main(["train", "teacher", "--config", str(path)]) == 0
        runs[workers] = (list(_losses(tmp_path / f"teacher_{workers}", "loss_teacher").values()),
                         load_tensors(tmp_path / f"teacher_{workers}" / "latent_bank" / "shard-00000.safetensors"))
    (losses, bank), (losses_with_workers, bank_with_workers) = runs[0], runs[2]
    assert len(losses) == 3 and losses == losses_with_workers
    assert all(torch.equal(bank[k], bank_with_workers[k]) for k in bank)


def test_a_compiled_run_follows_the_eager_one(tmp_path, monkeypatch):
    autoencoder = _tiny_autoencoder(tmp_path)
    compiled_modules, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: compiled_modules.append(module) or compile(module))
    for name, compiled in (("eager", False), ("compiled", True)):
        path = _teacher_config(tmp_path, name, autoencoder, compile=compiled, mixed_precision="no")
        assert main(["train", "teacher", "--config", str(path)]) == 0
    assert len(compiled_modules) == 1
    eager, compiled = _losses(tmp_path / "eager", "loss_teacher"), _losses(tmp_path / "compiled", "loss_teacher")
    assert len(eager) == 3 and eager.keys() == compiled.keys()
    assert all(math.isclose(float(eager[s]), float(compiled[s]), rel_tol=1e-3) for s in eager)
    a, b = _weights(tmp_path / "eager", "teacher"), _weights(tmp_path / "compiled", "teacher")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_loop_places_frozen_models_beside_the_trainable_ones_before_data(tmp_path):
    from causvid.train import Objective, TrainConfig, train

    class Recorder(Objective):
        def __init__(self):
            self.model, self.events = torch.nn.Linear(2, 1), []

        def trainable(self):
            return {"model": self.model}

        def place(self, device):
            self.events.append(("place", torch.device(device).type, next(self.model.parameters()).device.type))

        def dataset(self):
            self.events.append(("dataset",))
            return [{"x": torch.randn(2)} for _ in range(8)]

        def losses(self, models, batch, step, generator):
            self.events.append(("losses",))
            return {"model": (models["model"](batch["x"]).square().mean(), {})}

        def export(self, ema, out_dir):
            pass

    objective = Recorder()
    train(TrainConfig(objective="recorder", out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2), objective)
    # Once, with the trainable module already there, and before the data (a latent bank encodes on it).
    assert objective.events[:2] == [("place", "cpu", "cpu"), ("dataset",)]
    assert objective.events.count(("place", "cpu", "cpu")) == 1
    assert objective.events[2:] == [("losses",)] * 2


def test_config_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"objective": "autoencoder", "learning_rate": 1}))
    assert main(["train", "autoencoder", "--config", str(bad)]) == 2
    assert main(["train", "autoencoder", "--config", str(tmp_path / "missing.yaml")]) == 2
    # A discriminator with no learning rate of its own.
    no_lr = _config(tmp_path, "no_lr", objective_args=ADVERSARIAL["objective_args"])
    capsys.readouterr()
    assert main(["train", "autoencoder", "--config", str(no_lr)]) == 2
    assert "config lr has no entry for ['discriminator']" in capsys.readouterr().err


def test_bf16_on_a_cpu_that_only_emulates_it_trains_in_fp32(tmp_path, monkeypatch):
    from causvid import pipeline
    from causvid.train import training_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(pipeline, "default_dtype", lambda device: torch.bfloat16)
    assert training_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(pipeline, "default_dtype", lambda device: torch.float32)
    assert training_precision("bf16", cpu) == "no"
    assert training_precision("bf16", cuda) == "bf16" and training_precision("no", cpu) == "no"
    # A run that asks for bf16 there follows the fp32 run step for step, and records what ran.
    for precision in ("no", "bf16"):
        path = _config(tmp_path, precision, max_steps=2, mixed_precision=precision)
        assert main(["train", "autoencoder", "--config", str(path)]) == 0
    assert _losses(tmp_path / "bf16") == _losses(tmp_path / "no")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["mixed_precision"] == "no"


def test_lr_warms_up_holds_then_decays_linearly():
    from causvid.train import TrainConfig, lr_factor

    config = TrainConfig(max_steps=100, warmup_steps=10, decay_steps=40, final_lr_fraction=0.1)
    assert lr_factor(config, 0) == pytest.approx(0.1)
    assert lr_factor(config, 9) == lr_factor(config, 59) == 1.0
    assert lr_factor(config, 80) == pytest.approx(0.55)
    assert lr_factor(config, 100) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(max_steps=100, warmup_steps=10), 99) == 1.0  # no decay by default


def test_ema_warms_up_then_uses_its_decay():
    from causvid.train import EMA

    module = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(module.weight, 0.0)
    ema = EMA(module, decay=0.999)
    torch.nn.init.constant_(module.weight, 1.0)
    ema.update(module)  # first update: decay min(0.999, 1/10)
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    ema.updates = 10_000
    ema.update(module)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 + 0.1 * 0.001)


def test_decoder_only_fine_tuning_keeps_the_encoder_and_its_latent_statistics(tmp_path):
    first = _config(tmp_path, "first", max_steps=1)
    assert main(["train", "autoencoder", "--config", str(first)]) == 0
    export = tmp_path / "first" / "export"
    # Statistics a re-measurement would not give (e.g. measured at another precision): kept as they are.
    config = json.loads((export / "config.json").read_text())
    stats = {"latents_mean": [0.5] * len(config["latents_mean"]), "latents_std": [2.0] * len(config["latents_std"])}
    (export / "config.json").write_text(json.dumps(config | stats))
    args = TINY_AE["objective_args"] | {"init_from": str(export), "freeze_encoder": True}
    second = _config(tmp_path, "second", max_steps=2, objective_args=args)
    assert main(["train", "autoencoder", "--config", str(second)]) == 0
    start = {"vae." + k: v for k, v in load_tensors(next(export.glob("*.safetensors"))).items()}
    after = _weights(tmp_path / "second")
    assert all(torch.equal(start[k], after[k]) for k in start if k.startswith("vae.encoder."))
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("vae.decoder."))
    exported = json.loads((tmp_path / "second" / "export" / "config.json").read_text())
    assert {k: exported[k] for k in stats} == stats


def test_object_weights_reach_margin_pixels_past_the_object():
    from causvid.data.masks import object_weights

    video = -torch.ones(1, 3, 2, 16, 16)  # black
    video[:, :, :, 6:9, 6:9] = 1.0  # a 3x3 white object
    plain = object_weights(video, 10.0)
    widened = object_weights(video, 10.0, margin=2)
    expected = torch.ones(16, 16)
    expected[6:9, 6:9] = 11.0
    assert torch.equal(plain[0, 0, 1], expected)
    expected[4:11, 4:11] = 11.0  # two pixels past each edge, the object included
    assert torch.equal(widened[0, 0, 0], expected) and torch.equal(widened[0, 0, 1], expected)


def test_latent_object_mask_marks_the_cells_an_object_covers():
    from causvid.data.masks import latent_object_mask

    video = -torch.ones(1, 3, 5, 32, 32)  # black, 5 frames -> 2 latent frames of 8x8 cells (s=4)
    video[:, :, 0, 0:4, 0:4] = 1.0  # frame 0: object in cell (0, 0)
    video[:, :, 3, 16:20, 24:28] = 1.0  # frame 3 (latent frame 1): object in cell (4, 6)
    mask = latent_object_mask(video, spatial_factor=4)
    assert mask.shape == (1, 2, 8, 8) and mask.dtype == torch.bool
    first, second = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    first[0:2, 0:2] = True  # the cell and its one-cell dilation, clipped at the border
    second[3:6, 5:8] = True
    assert torch.equal(mask[0, 0], first) and torch.equal(mask[0, 1], second)


def test_the_latent_bank_is_sharded_resumable_and_read_entry_by_entry(tmp_path, monkeypatch):
    import pickle

    from causvid.data import latent_bank
    from causvid.data.latent_bank import LatentBank
    from causvid.data.masks import latent_object_mask
    from causvid.data.shapes import ShapesWorld
    from causvid.presets import build_autoencoder

    monkeypatch.setattr(latent_bank, "SHARD_SIZE", 2)
    world = ShapesWorld(num_frames=9, height=32, width=32, seed=3)
    autoencoder = build_autoencoder("tiny")
    path = tmp_path / "bank"
    bank = LatentBank.build_or_load(path, autoencoder, world, size=5, seed=0)
    assert sorted(p.name for p in path.glob("*.safetensors")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    videos = torch.stack([world[i]["video"] for i in range(5)])
    with torch.no_grad():
        latents = autoencoder.encode(videos).to(torch.bfloat16).float()
    masks = latent_object_mask(videos, autoencoder.spatial_factor)
    for index in (0, 3, 4, 7):  # item i is entry i mod 5
        item = bank[index]
        assert torch.equal(item["latents"], latents[index % 5]) and torch.equal(item["object_mask"], masks[index % 5])
        assert item["caption"] in world[index % 5]["captions"]
    assert len({bank[i * 5]["caption"] for i in range(20)}) > 1  # other phrasings on other passes
    # A build killed after two shards resumes with the third; nothing else is re-encoded.
    (path / "manifest.json").unlink()
    (path / "shard-00002.safetensors").unlink()
    encoded = []
    monkeypatch.setattr(autoencoder, "encode", lambda video: encoded.append(len(video)) or latents[4:5].to(torch.bfloat16))
    resumed = LatentBank.build_or_load(path, autoencoder, world, size=5, seed=0)
    assert encoded == [1] and torch.equal(resumed[3]["latents"], latents[3])
    # Loader workers get a copy without open files; settings that differ are refused.
    assert torch.equal(pickle.loads(pickle.dumps(resumed))[4]["latents"], latents[4])
    with pytest.raises(CheckpointError, match="other settings"):
        LatentBank.build_or_load(path, autoencoder, world, size=4, seed=0)


def test_a_bank_of_footage_has_no_masks_and_leaves_unreadable_clips_out(tmp_path):
    from causvid.data.latent_bank import LatentBank
    from causvid.presets import build_autoencoder

    class Footage(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):  # clip 1 cannot be read: the dataset hands back clip 2
            shown = 2 if index == 1 else index
            return {"video": torch.full((3, 5, 32, 32), shown / 4 - 0.5), "caption": f"clip {shown}", "index": shown}

    bank = LatentBank.build_or_load(tmp_path / "bank", build_autoencoder("tiny"), Footage(), size=10, seed=0)
    assert bank.entries == 3 and not bank.has_masks
    assert [bank[i]["caption"] for i in range(3)] == ["clip 0", "clip 2", "clip 3"]
    assert "object_mask" not in bank[0]


class _ReconstructWithError(torch.nn.Module):
    """An autoencoder stand-in: returns the clip with an error of `size` in one frame, no KL
    (a list gives each clip its own)."""

    def __init__(self, frame: int, size: float | list[float] = 1.0):
        super().__init__()
        self.frame = frame
        self.size = size

    def forward(self, video, context):
        reconstruction = video[:, :, context:].clone()
        reconstruction[:, :, self.frame] += torch.as_tensor(self.size).view(-1, 1, 1, 1)
        return reconstruction, SimpleNamespace(kl=lambda: torch.zeros(1))


def test_first_frame_weight_raises_the_cost_of_first_frame_error_only(tmp_path):
    from causvid.objectives import AutoencoderObjective
    from causvid.train import TrainConfig

    config = TrainConfig.from_yaml(_config(tmp_path, "ae"))
    batch = {"video": -torch.ones(1, 3, 9, 32, 32)}

    def loss(first_frame_weight: float, frame: int) -> float:
        objective = AutoencoderObjective(config, preset_name="tiny", context_frames=(0,), target_frames=4,
                                         first_frame_weight=first_frame_weight)
        models = {"autoencoder": _ReconstructWithError(frame)}
        return objective.losses(models, batch, 0, torch.Generator())["autoencoder"][0].item()

    assert loss(4.0, frame=0) > 2 * loss(1.0, frame=0)
    assert loss(4.0, frame=1) < loss(1.0, frame=1)  # weight moved to frame 0, away from the rest


def test_l1_weight_zero_leaves_mean_squared_error(tmp_path):
    from causvid.objectives import AutoencoderObjective
    from causvid.train import TrainConfig

    config = TrainConfig.from_yaml(_config(tmp_path, "ae"))
    batch = {"video": -torch.ones(1, 3, 9, 32, 32)}

    def loss(error: float, **weights) -> float:
        objective = AutoencoderObjective(config, preset_name="tiny", context_frames=(0,), target_frames=4,
                                         object_weight=0.0, **weights)
        models = {"autoencoder": _ReconstructWithError(frame=1, size=error)}
        return objective.losses(models, batch, 0, torch.Generator())["autoencoder"][0].item()

    # One frame of five is off by `error` everywhere: MSE is error^2 / 5, and L1 adds error / 5.
    assert loss(0.1, l1_weight=0.0) == pytest.approx(0.01 / 5, rel=1e-4)
    assert loss(0.1) == pytest.approx((0.1 + 0.01) / 5, rel=1e-4)


def test_log_per_clip_averages_each_clips_log_error(tmp_path):
    from causvid.objectives import AutoencoderObjective
    from causvid.train import TrainConfig

    config = TrainConfig.from_yaml(_config(tmp_path, "ae"))
    batch = {"video": -torch.ones(2, 3, 9, 32, 32)}

    def loss(errors: list[float], **options) -> float:
        objective = AutoencoderObjective(config, preset_name="tiny", context_frames=(0,), target_frames=4,
                                         object_weight=0.0, l1_weight=0.0, **options)
        models = {"autoencoder": _ReconstructWithError(frame=1, size=errors)}
        return objective.losses(models, batch, 0, torch.Generator())["autoencoder"][0].item()

    # Clips off by 0.1 and 0.01 in one frame of five: MSEs 0.01 / 5 and 0.0001 / 5.
    assert loss([0.1, 0.01]) == pytest.approx((0.01 + 0.0001) / 10, rel=1e-4)
    assert loss([0.1, 0.01], log_per_clip=True) == pytest.approx(
        (math.log(0.01 / 5) + math.log(0.0001 / 5)) / 2, rel=1e-4)
    # Halving either clip's error gains the same under logs; pooled, the clean clip's gain is lost.
    gain_clean = loss([0.1, 0.01], log_per_clip=True) - loss([0.1, 0.005], log_per_clip=True)
    gain_dirty = loss([0.1, 0.01], log_per_clip=True) - loss([0.05, 0.01], log_per_clip=True)
    assert gain_clean == pytest.approx(gain_dirty, rel=1e-3)
    assert loss([0.1, 0.01]) - loss([0.1, 0.005]) < 0.01 * (loss([0.1, 0.01]) - loss([0.05, 0.01]))


class _LineFit(torch.utils.data.Dataset):
    """y = 3x - 1 at fixed points: a loss with no randomness, so only the batching can differ."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        x = torch.tensor([index / 8.0 - 1.0])
        return {"x": x, "y": 3 * x - 1}


class _LineObjective:
    def __init__(self, config):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)

    def trainable(self):
        return {"model": self.model}

    def averaged(self):
        return set()

    def place(self, device):
        pass

    def dataset(self):
        return _LineFit()

    def losses(self, models, batch, step, rng):
        return {"model": (F.mse_loss(models["model"](batch["x"]), batch["y"]), {})}

    def sample(self, ema, out_dir, step):
        return {}

    def export(self, ema, out_dir):
        pass


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    from causvid.train import TrainConfig, train

    weights = {}
    for name, batch, parts in (("whole", 8, 1), ("accumulated", 2, 4)):
        config = TrainConfig(out_dir=str(tmp_path / name), max_steps=5, batch_size=batch, grad_accumulation=parts,
                             lr={"model": 0.1}, warmup_steps=1, checkpoint_every=5, log_every=1, sample_every=100)
        objective = _LineObjective(config)
        assert train(config, objective) == 5
        weights[name] = [p.detach().clone() for p in objective.model.parameters()]
    for a, b in zip(weights["whole"], weights["accumulated"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_exact_with_gradient_accumulation(tmp_path):
    straight = _config(tmp_path, "straight", batch_size=1, grad_accumulation=2)
    assert main(["train", "autoencoder", "--config", str(straight)]) == 0
    split = _config(tmp_path, "split", batch_size=1, grad_accumulation=2)
    assert main(["train", "autoencoder", "--config", str(split), "--max-steps", "3"]) == 0
    assert main(["train", "autoencoder", "--config", str(split), "--resume"]) == 0
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight") and len(_losses(tmp_path / "split")) == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
