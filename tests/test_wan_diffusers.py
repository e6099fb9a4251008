"""A Wan2.1 download in diffusers format loads as it is (`WanPipeline`: transformer, vae, UMT5
text_encoder, tokenizer, scheduler), and our own pipeline directories use the same model_index
convention while older ones still load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from causvid.cli import main
from causvid.pipeline import WAN_NEGATIVE_PROMPT, CausVidPipeline, load_pipeline


def test_a_wan_download_loads_with_its_scheduler_shift_and_wan_defaults(wan_dir):
    pipe = load_pipeline(wan_dir, "cpu", torch.float32, height=32, width=32)
    assert pipe.config.shift == 3.0 and pipe.config.teacher_solver == "euler"  # from scheduler/
    assert (pipe.config.teacher_steps, pipe.config.guidance_scale, pipe.config.fps) == (50, 5.0, 16)  # Wan's
    assert pipe.config.negative_prompt == WAN_NEGATIVE_PROMPT
    assert pipe.teacher is pipe.denoiser and pipe.text_encoder.dim == 384 and pipe.text_encoder.max_length == 512
    assert type(pipe.text_encoder.model).__name__ == "UMT5EncoderModel"
    assert load_pipeline(wan_dir, "cpu").config.height == 480  # Wan's 480x832 unless told otherwise


def test_generate_samples_a_wan_download_as_the_teacher(wan_dir, tmp_path):
    out = tmp_path / "teacher.npy"
    assert main(["generate", "a red circle moving right", "-o", str(out), "--teacher", "--steps", "2", "--frames", "5",
                 "--height", "32", "--width", "32", "--checkpoint", str(wan_dir), "--device", "cpu"]) == 0
    frames = np.load(out)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8


def test_our_directories_name_their_components_and_older_ones_still_load(tiny_checkpoint, tmp_path):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "CausVidPipeline"
    assert index["transformer"] == index["teacher"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"] == ["causvid", "MiniLMTextEncoder"]
    new = CausVidPipeline.from_pretrained(tiny_checkpoint, "cpu", torch.float32).config
    old_dir = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old_dir)
    settings = {k: v for k, v in index.items() if not isinstance(v, list) and k != "text_encoder_config"}
    (old_dir / "model_index.json").write_text(json.dumps(settings | {"text_encoder": index["text_encoder_config"]}))
    assert CausVidPipeline.from_pretrained(old_dir, "cpu", torch.float32).config == new


def test_a_wan_download_is_the_teacher_of_an_ode_pairs_run(wan_dir, tmp_path):
    out = tmp_path / "pairs"
    assert main(["distill", "ode-pairs", "--teacher", str(wan_dir), "--out", str(out), "--num", "2", "--batch", "2",
                 "--frames", "5", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_shape"][2:] == [8, 8] and manifest["negative_prompt"] == WAN_NEGATIVE_PROMPT
    from causvid.checkpoint import load_tensors

    trajectory = load_tensors(out / "shard-00000.safetensors")["trajectory"]
    assert trajectory.shape[0] == 2 and torch.isfinite(trajectory.float()).all()
