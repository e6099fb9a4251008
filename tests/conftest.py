"""Shared fixtures: tiny random-weight models, so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# Tiny models gain nothing from a thread pool, and a pool fighting other processes for two
# cores slows torch down by 10x or more. Subprocesses started by tests inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from causvid.presets import build_autoencoder, build_pipeline, build_transformer
from causvid.text import MiniLMTextEncoder


@pytest.fixture(scope="session")
def text_encoder() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


@pytest.fixture(scope="session")
def tiny_pipeline(text_encoder):
    return build_pipeline("tiny", seed=0, text_encoder=text_encoder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    """A tiny directory in the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, built from diffusers'
    and transformers' own classes, with a tokenizer made offline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan_tiny")
    build_transformer("tiny", seed=3).save_pretrained(root / "transformer")
    build_autoencoder("tiny", seed=3).vae.save_pretrained(root / "vae")
    # A unigram vocabulary as T5's: <pad>, </s>, <unk>, then word pieces with their log-probabilities.
    words = "a red blue circle square moving left right on black white background".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=384, d_kv=16, d_ff=64, num_layers=1,
                                num_heads=2)).save_pretrained(root / "text_encoder")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}))
    return root


@pytest.fixture
def tiny_denoiser():
    from causvid.models.denoiser import WanDenoiser

    return WanDenoiser(build_transformer("tiny", seed=1), block_frames=2).eval()


@pytest.fixture(scope="session")
def run_as_two_cpu_processes():
    """Runs `causvid` with the given arguments as 2 gloo ranks and checks that it succeeded."""

    def run(args: list[str]) -> subprocess.CompletedProcess:
        # accelerate's own launcher starts one process for --cpu; torchrun starts two gloo ranks.
        env = os.environ | {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "causvid.cli", *args],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
