"""Coordinate channels: a denoiser that also reads each latent cell's absolute position."""

from __future__ import annotations

import pytest
import torch

from causvid.models.denoiser import WanDenoiser, cell_coordinates
from causvid.presets import build_transformer
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas


def _reading(denoiser: WanDenoiser) -> WanDenoiser:
    """The denoiser widened, with its coordinate weights made non-zero so they matter."""
    widened = denoiser.with_coordinates().eval()
    with torch.no_grad():
        widened.transformer.patch_embedding.weight[:, -2:].normal_(std=0.5)
    return widened


def test_cell_coordinates_are_cell_centres_in_minus_one_to_one():
    grid = cell_coordinates(torch.zeros(2, 4, 3, 2, 4))
    assert grid.shape == (2, 2, 3, 2, 4)
    assert grid[0, 0, 0, 0].tolist() == [-0.75, -0.25, 0.25, 0.75]  # x grows along the width
    assert grid[0, 1, 0, :, 0].tolist() == [-0.5, 0.5]  # y grows along the height
    assert torch.equal(grid[1, :, 2], grid[0, :, 0])  # the same in every clip and frame


def test_widening_keeps_outputs_until_trained_and_round_trips(tiny_denoiser, tmp_path):
    text, x, sigma = torch.randn(1, 32, 384), torch.randn(1, 4, 4, 8, 8), torch.tensor([0.7])
    widened = tiny_denoiser.with_coordinates().eval()
    assert widened.reads_coordinates and widened.config.in_channels == tiny_denoiser.config.in_channels + 2
    with torch.no_grad():
        # Zero weights add nothing; only the convolution's summation order may differ.
        torch.testing.assert_close(widened(x, sigma, text), tiny_denoiser(x, sigma, text), atol=1e-5, rtol=1e-5)
        reading = _reading(tiny_denoiser)
        out = reading(x, sigma, text)
        assert not torch.allclose(out, tiny_denoiser(x, sigma, text))
        reading.save_pretrained(tmp_path)
        loaded = WanDenoiser.from_pretrained(tmp_path, block_frames=2).eval()
        assert loaded.reads_coordinates
        torch.testing.assert_close(loaded(x, sigma, text), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already reads coordinates"):
        widened.with_coordinates()


def test_kv_cached_rollout_equals_the_full_causal_forward_with_coordinates(tiny_denoiser):
    reading, text = _reading(tiny_denoiser), torch.randn(1, 32, 384)

    def rollout(use_kv_cache: bool) -> torch.Tensor:
        sigmas = student_sigmas([1000, 750, 500, 250])
        steps = CausalRollout(reading, sigmas, (4, 8, 8), generator=torch.Generator().manual_seed(1),
                              use_kv_cache=use_kv_cache)
        with torch.no_grad():
            return torch.cat([steps.next_block(text) for _ in range(3)], dim=2)

    assert (rollout(True) - rollout(False)).abs().max().item() < 1e-4


def test_channel_counts_other_than_latent_or_latent_plus_coordinates_are_refused():
    transformer = build_transformer("tiny", seed=0)
    transformer.register_to_config(in_channels=transformer.config.out_channels + 1)
    with pytest.raises(ValueError, match="coordinate channels"):
        WanDenoiser(transformer)
