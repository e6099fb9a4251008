"""diffusers compatibility of saved models, and clear one-line errors for bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from causvid.checkpoint import CheckpointError
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, load_pipeline
from causvid.presets import build_transformer


def test_diffusers_model_loads_as_student_and_teacher_and_saves_back(tmp_path):
    reference = build_transformer("tiny", seed=3).eval()
    reference.save_pretrained(tmp_path / "diffusers")
    student = WanDenoiser.from_pretrained(tmp_path / "diffusers", block_frames=2).eval()
    teacher = WanDenoiser.from_pretrained(tmp_path / "diffusers", block_frames=2).eval()

    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 7, 384)
    with torch.no_grad():
        expected = reference(x, torch.tensor([500.0]), text, return_dict=False)[0]
        # Our processors in bidirectional mode compute exactly what diffusers' own processor does.
        torch.testing.assert_close(teacher(x, torch.tensor([0.5]), text), expected, atol=1e-5, rtol=0)
        causal = student(x, torch.tensor([0.5]), text, causal=True)
    assert not torch.allclose(causal, expected)

    student.save_pretrained(tmp_path / "student")
    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "student").eval()
    assert isinstance(reloaded.blocks[0].attn1.processor, WanAttnProcessor)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_pipeline_round_trip(tiny_checkpoint, tiny_pipeline):
    pipe = load_pipeline(tiny_checkpoint, device="cpu", dtype=torch.float32)
    assert pipe.config == tiny_pipeline.config
    a = pipe.generate("a red circle", num_frames=5, seed=1)
    b = tiny_pipeline.generate("a red circle", num_frames=5, seed=1)
    assert a.shape == (5, 32, 32, 3) and a.dtype.name == "uint8"
    assert (a == b).all()


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_pipeline(tmp_path / "nope")


def test_missing_config_file(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json: file not found"):
        load_pipeline(ckpt)


def test_corrupt_weights_name_the_file(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    weights = next((ckpt / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError) as info:
        load_pipeline(ckpt, device="cpu")
    message = str(info.value)
    assert str(weights) in message and "corrupt" in message and "\n" not in message


def test_mismatched_weights_are_reported(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    config_file = ckpt / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["ffn_dim"] = 96
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_pipeline(ckpt, device="cpu")
    assert "transformer" in str(info.value) and "\n" not in str(info.value)


def test_malformed_json(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="vae/config.json: not valid JSON"):
        load_pipeline(ckpt, device="cpu")


def test_incompatible_parts_are_rejected(tiny_pipeline):
    from causvid.presets import build_autoencoder

    shapes_vae = build_autoencoder("shapes")
    with pytest.raises(CheckpointError, match="z_dim"):
        CausVidPipeline(tiny_pipeline.denoiser, shapes_vae, tiny_pipeline.text_encoder, tiny_pipeline.config)


def test_convert_to_bf16_and_load_back(tiny_checkpoint, tmp_path):
    from causvid.cli import main

    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    stored = load_pipeline(tmp_path / "bf16", device="cpu")
    from safetensors import safe_open

    weights = next((tmp_path / "bf16" / "transformer").glob("*.safetensors"))
    with safe_open(str(weights), "pt") as reader:
        assert reader.get_tensor(next(iter(reader.keys()))).dtype == torch.bfloat16
    # Every model runs in the pipeline's dtype, whatever the stored one.
    assert next(stored.autoencoder.parameters()).dtype == stored.denoiser.transformer.dtype
    fp32 = load_pipeline(tmp_path / "bf16", device="cpu", dtype=torch.float32)
    assert next(fp32.autoencoder.parameters()).dtype == torch.float32
    assert stored.generate("a red circle", num_frames=5).shape == (5, 32, 32, 3)


def test_convert_a_single_model_directory(tiny_checkpoint, tmp_path):
    from causvid.cli import main
    from causvid.models.autoencoder import VideoAutoencoder

    assert main(["convert", str(tiny_checkpoint / "vae"), str(tmp_path / "vae"), "--dtype", "bf16"]) == 0
    assert VideoAutoencoder.from_pretrained(tmp_path / "vae").latent_channels == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    assert main(["convert", str(tmp_path / "other"), str(tmp_path / "x")]) == 2


def test_a_failed_save_leaves_the_previous_model_whole(tiny_pipeline, tmp_path, monkeypatch):
    import stat

    path = tmp_path / "transformer"
    tiny_pipeline.denoiser.save_pretrained(path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in path.iterdir())  # readable by others

    def interrupted(self, directory, **kwargs):
        (Path(directory) / "config.json").write_text("{")  # half-written, then the write dies
        raise KeyboardInterrupt

    monkeypatch.setattr(WanTransformer3DModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_pipeline.denoiser.save_pretrained(path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]  # no temporary left behind
    WanDenoiser.from_pretrained(path, 2)
