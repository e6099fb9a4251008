"""Shared fixtures: tiny random-weight models, so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from a thread pool, and a pool fighting other processes for two
# cores slows torch down by 10x or more. Subprocesses started by tests inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from causvid.presets import build_pipeline, build_transformer
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


@pytest.fixture
def tiny_denoiser():
    from causvid.models.denoiser import WanDenoiser

    return WanDenoiser(build_transformer("tiny", seed=1), block_frames=2).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
