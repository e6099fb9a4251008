"""Block expansion: a deeper denoiser grown from a trained one, with the same outputs until trained."""

from __future__ import annotations

import pytest
import torch

from causvid.models.denoiser import WanDenoiser
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas


def _speaking(denoiser: WanDenoiser) -> WanDenoiser:
    """The denoiser deepened, with its new blocks' output layers made non-zero so they matter."""
    deeper = denoiser.deepened(2 * denoiser.config.num_layers).eval()
    with torch.no_grad():
        for block in deeper.transformer.blocks[1::2]:
            block.ffn.net[2].weight.normal_(std=0.2)
    return deeper


def test_deepening_keeps_outputs_until_trained_and_round_trips(tiny_denoiser, tmp_path):
    text, x, sigma = torch.randn(1, 32, 384), torch.randn(1, 4, 4, 8, 8), torch.tensor([0.7])
    depth = tiny_denoiser.config.num_layers
    deeper = tiny_denoiser.deepened(3 * depth).eval()
    assert deeper.config.num_layers == 3 * depth == len(deeper.transformer.blocks)
    # Each new block copies the block before it, all but its output layers.
    assert torch.equal(deeper.transformer.blocks[2].attn1.to_q.weight, tiny_denoiser.transformer.blocks[0].attn1.to_q.weight)
    assert not deeper.transformer.blocks[2].attn1.to_out[0].weight.any()
    with torch.no_grad():
        for causal in (False, True):
            torch.testing.assert_close(deeper(x, sigma, text, causal=causal), tiny_denoiser(x, sigma, text, causal=causal))
        speaking = _speaking(tiny_denoiser)
        out = speaking(x, sigma, text)
        assert not torch.allclose(out, tiny_denoiser(x, sigma, text))
        speaking.save_pretrained(tmp_path)
        loaded = WanDenoiser.from_pretrained(tmp_path, block_frames=2).eval()
        assert loaded.config.num_layers == 2 * depth
        torch.testing.assert_close(loaded(x, sigma, text), out)


def test_new_blocks_learn_from_the_first_step(tiny_denoiser):
    deeper = tiny_denoiser.deepened(2 * tiny_denoiser.config.num_layers).train()
    x, sigma, text = torch.randn(1, 4, 4, 8, 8), torch.tensor([0.7]), torch.randn(1, 32, 384)
    deeper(x, sigma, text).square().mean().backward()
    for block in deeper.transformer.blocks[1::2]:
        assert block.ffn.net[2].weight.grad.abs().sum() > 0


def test_kv_cached_rollout_equals_the_full_causal_forward_when_deepened(tiny_denoiser):
    speaking, text = _speaking(tiny_denoiser), torch.randn(1, 32, 384)

    def rollout(use_kv_cache: bool) -> torch.Tensor:
        steps = CausalRollout(speaking, student_sigmas([1000, 750, 500, 250]), (4, 8, 8),
                              generator=torch.Generator().manual_seed(1), use_kv_cache=use_kv_cache)
        with torch.no_grad():
            return torch.cat([steps.next_block(text) for _ in range(3)], dim=2)

    assert (rollout(True) - rollout(False)).abs().max().item() < 1e-4


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_deepening_needs_a_larger_multiple_of_the_depth(tiny_denoiser, num_layers):
    assert tiny_denoiser.config.num_layers == 2
    with pytest.raises(ValueError, match="larger multiple"):
        tiny_denoiser.deepened(num_layers)
