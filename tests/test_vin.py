"""Parallel long videos: chunk layout and overlap fusion, the Video Interface Network's read and
guide, training with exact resume, and the parallel mode from the API and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from causvid.checkpoint import load_tensors
from causvid.cli import main
from causvid.errors import UserError
from causvid.models.attention import GlobalTokens
from causvid.models.vin import VideoInterfaceNetwork
from causvid.objectives.vin import VinObjective
from causvid.parallel import ChunkLayout, ParallelDenoiser
from causvid.pipeline import load_pipeline
from causvid.train import TrainConfig


def _tiny_vin(denoiser, **overrides) -> VideoInterfaceNetwork:
    dit = denoiser.config
    torch.manual_seed(0)
    return VideoInterfaceNetwork(**{
        "in_channels": dit.in_channels, "dim": dit.num_attention_heads * dit.attention_head_dim,
        "num_heads": dit.num_attention_heads, "dit_layers": dit.num_layers, "num_tokens": 8, "process_layers": 1,
        **overrides,
    }).eval()


def test_layout_windows_and_fusion_invert_each_other():
    layout = ChunkLayout(3, chunk_frames=4, context_frames=2)
    assert layout.total_frames == 14 and layout.window_frames == 6 and layout.starts == [0, 4, 8]
    x = torch.randn(2, 3, 14, 2, 2)
    windows = layout.windows(x)
    assert windows.shape == (6, 3, 6, 2, 2)
    # Batch-major: clip 1's chunk 2 is window 5, frames 8..13.
    assert torch.equal(windows[5], x[1, :, 8:14])
    for blend in (False, True):
        weights = layout.weights(blend)
        per_frame = torch.zeros(14).index_add_(0, torch.cat([torch.arange(s, s + 6) for s in layout.starts]),
                                               weights.flatten())
        assert torch.allclose(per_frame, torch.ones(14))
        assert torch.allclose(layout.fuse(windows, blend), x)
    # Without blending an overlap frame is its earlier chunk's; with it, shares ramp linearly.
    assert layout.weights(False)[1, :2].tolist() == [0.0, 0.0]
    assert torch.allclose(layout.weights(True)[1, :2], torch.tensor([1 / 3, 2 / 3]))


def test_layout_covers_any_length_and_rejects_bad_ones():
    assert ChunkLayout.covering(21, 5, 1) == ChunkLayout(4, 5, 1)
    assert ChunkLayout.covering(22, 5, 1).total_frames == 26  # padded up to whole chunks
    assert ChunkLayout.covering(1, 5, 1).num_chunks == 1
    with pytest.raises(UserError, match="use 26"):
        ChunkLayout.of(22, 5, 1)
    with pytest.raises(UserError, match="context_frames"):
        ChunkLayout(2, 3, 4)


class _ChunkIndex(torch.nn.Module):
    """Predicts, for every frame of a window, the window's chunk number (1-based) in its clip."""

    def __init__(self, chunks: int):
        super().__init__()
        self.chunks = chunks

    def forward(self, x, sigma, text, global_tokens=None):
        index = (torch.arange(x.shape[0]) % self.chunks + 1).float()
        return index.view(-1, 1, 1, 1, 1).expand_as(x).clone()


def test_overlaps_blend_only_above_the_cutoff():
    parallel = ParallelDenoiser(_ChunkIndex(3), chunk_frames=4, context_frames=2, blend_cutoff=0.5)
    x, text = torch.zeros(1, 1, 14, 1, 1), torch.zeros(1, 3, 8)
    early = parallel(x, torch.tensor([0.9]), text)[0, 0, :, 0, 0]
    late = parallel(x, torch.tensor([0.3]), text)[0, 0, :, 0, 0]
    # Frames 4-5 overlap chunks 1 and 2: early, chunk 2's share rises 1/3, 2/3; late, chunk 1 owns them.
    assert torch.allclose(early[4:6], torch.tensor([1 * 2 / 3 + 2 * 1 / 3, 1 * 1 / 3 + 2 * 2 / 3]))
    assert late[4:6].tolist() == [1.0, 1.0] and late[8:10].tolist() == [2.0, 2.0]
    assert early[:4].tolist() == [1.0] * 4 and early[10:].tolist() == [3.0] * 4


def test_closed_gate_is_the_plain_teacher(tiny_denoiser):
    # With the gate shut (a logit bias of -1e4), the global tokens get no attention at all.
    x, sigma, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.5, 0.8]), torch.randn(2, 5, 384)
    tokens = GlobalTokens(torch.randn(2, 8, 32), torch.full((2,), -1e4))
    with torch.no_grad():
        plain = tiny_denoiser(x, sigma, text)
        shut = tiny_denoiser(x, sigma, text, global_tokens=tokens)
        opened = tiny_denoiser(x, sigma, text, global_tokens=GlobalTokens(tokens.tokens, torch.zeros(2)))
    assert torch.allclose(plain, shut, atol=1e-5)
    assert not torch.allclose(plain, opened, atol=1e-3)


def test_the_vin_read_sees_every_chunk(tiny_denoiser):
    # A change in the last chunk's keyframe reaches the first chunk through the global tokens,
    # and only through them: without the VIN the first chunk never sees it.
    layout = ChunkLayout(4, chunk_frames=3, context_frames=1)
    x = torch.randn(1, 4, layout.total_frames, 8, 8)
    changed = x.clone()
    changed[:, :, 12] += 1.0  # a keyframe (stride 2) of the last chunk
    sigma, text = torch.tensor([0.3]), torch.randn(1, 5, 384)
    with torch.no_grad():
        for vin, reaches in ((_tiny_vin(tiny_denoiser, gate_init=0.0), True), (None, False)):
            parallel = ParallelDenoiser(tiny_denoiser, 3, 1, blend_cutoff=0.5, vin=vin)
            first = parallel(x, sigma, text)[:, :, :3]
            assert (not torch.allclose(first, parallel(changed, sigma, text)[:, :, :3], atol=1e-6)) == reaches
    # Every chunk gets its own tokens: the same global summary placed at the chunk's start.
    tokens = _tiny_vin(tiny_denoiser)(x, sigma, text, torch.tensor(layout.starts))
    assert tokens.tokens.shape == (4, 8, 32)
    assert not torch.allclose(tokens.tokens[0], tokens.tokens[3])


def _vin_config(tmp_path: Path, tiny_checkpoint: Path, name: str, **overrides) -> Path:
    config = {
        "objective": "vin", "out_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 2,
        "lr": {"parallel": 1e-3}, "warmup_steps": 1, "log_every": 1, "sample_every": 100, "checkpoint_every": 1,
        "data": {"type": "shapes", "height": 32, "width": 32, "seed": 0},
        "objective_args": {"init_from": str(tiny_checkpoint), "num_chunks": 3, "chunk_frames": 3, "context_frames": 1,
                           "vin": {"num_tokens": 8, "process_layers": 1}, "bank_size": 4},
    } | overrides
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def vin_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("vin")
    assert main(["train", "vin", "--config", str(_vin_config(tmp_path, tiny_checkpoint, "run"))]) == 0
    return tmp_path / "run" / "export"


def test_training_resumes_exactly(vin_checkpoint, tiny_checkpoint, tmp_path):
    split = _vin_config(tmp_path, tiny_checkpoint, "split")
    assert main(["train", "vin", "--config", str(split), "--max-steps", "2"]) == 0
    assert main(["train", "vin", "--config", str(split), "--resume"]) == 0
    straight = load_tensors(sorted((vin_checkpoint.parent).glob("checkpoint-*"))[-1] / "parallel.safetensors")
    resumed = load_tensors(sorted((tmp_path / "split").glob("checkpoint-*"))[-1] / "parallel.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # The VIN learnt something: its gates moved from where they started.
    assert not torch.allclose(straight["vin.logit_bias"], torch.full_like(straight["vin.logit_bias"], -3.0))


def test_a_finished_vin_moves_to_a_retrained_pipeline(vin_checkpoint, tiny_checkpoint, tmp_path):
    # Another pipeline (a retrained teacher and student) takes over the finished run's parallel model.
    other = load_pipeline(tiny_checkpoint, "cpu", torch.float32)
    with torch.no_grad():
        for module in (other.teacher, other.denoiser):
            for parameter in module.parameters():
                parameter.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    run = tmp_path / "moved"
    shutil.copytree(vin_checkpoint.parent, run)
    args = {"init_from": str(tmp_path / "other"), "dit_from": str(tiny_checkpoint)}
    config = _vin_config(tmp_path, tiny_checkpoint, "moved")
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump(data | {"objective_args": data["objective_args"] | args}))
    assert main(["train", "vin", "--config", str(config), "--resume"]) == 0
    moved, old = load_pipeline(run / "export", "cpu", torch.float32), load_pipeline(vin_checkpoint, "cpu", torch.float32)
    for name in ("teacher", "denoiser"):
        assert _same_weights(getattr(moved, name), getattr(other, name))
    assert _same_weights(moved.parallel, old.parallel)
    # A fresh run starts its DiT from dit_from's teacher, not init_from's.
    objective = VinObjective(TrainConfig.from_yaml(config), **args)
    assert _same_weights(objective.model.denoiser, load_pipeline(tiny_checkpoint, "cpu", torch.float32).teacher)
    assert not _same_weights(objective.model.denoiser, other.teacher)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_parallel_mode_from_the_api_any_length(vin_checkpoint):
    pipe = load_pipeline(vin_checkpoint, "cpu", torch.float32)
    assert pipe.model_index()["vin"] == ["causvid", "VideoInterfaceNetwork"]
    assert (pipe.config.chunk_frames, pipe.config.context_frames) == (3, 1)  # the layout it was trained on
    for frames in (1, 30, 61):  # 61 frames are 16 latent frames: 5 chunks of 3 after 1
        video = pipe.generate("a red circle moving right", frames, seed=1, steps=2, mode="parallel")
        assert video.shape == (frames, 32, 32, 3) and video.dtype == np.uint8
    same = pipe.generate("a red circle moving right", 30, seed=1, steps=2, mode="parallel")
    assert np.array_equal(same, pipe.generate("a red circle moving right", 30, seed=1, steps=2, mode="parallel"))
    for model in ("teacher", "vin-dit"):  # the teacher's chunks, and the VIN's DiT without its tokens
        without = pipe.generate_parallel("a red circle moving right", 30, seed=1, steps=2, model=model)
        assert without.shape == same.shape and not np.array_equal(without, same)
    with pytest.raises(UserError, match="num_frames must be >= 1"):
        pipe.generate_parallel("a red circle", 0)


def test_parallel_mode_from_the_cli(vin_checkpoint, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "long.npy"
    assert main(["generate", "a blue square", "--mode", "parallel", "--frames", "45", "--steps", "2", "-o", str(out),
                 "--checkpoint", str(vin_checkpoint), "--device", "cpu"]) == 0
    assert np.load(out).shape == (45, 32, 32, 3)
    # A checkpoint without a VIN says so in one line.
    assert main(["generate", "a blue square", "--mode", "parallel", "--frames", "45", "-o", str(out),
                 "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "no vin/ directory" in capsys.readouterr().err
    assert main(["info", "--checkpoint", str(vin_checkpoint), "--device", "cpu"]) == 0
    parameters = json.loads(capsys.readouterr().out)["parameters"]
    assert parameters["vin"] > 0 and parameters["vin_transformer"] == parameters["teacher"]
