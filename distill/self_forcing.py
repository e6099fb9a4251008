"""Self-Forcing's training rollout (Huang et al. 2025, arXiv 2506.08009).

The generator produces every block the way it will at inference: few-step denoising against
a KV cache filled with its *own* earlier outputs, so training sees the errors it will have
to live with. Backpropagating through the whole rollout would cost the memory of every step
of every block; instead each block stops at one random step of its few-step schedule (its
exit step), and only that step's forward keeps a graph. The steps before it, and the clean
pass that commits the block to the cache, run without gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from causvid.rollout import CausalRollout
from causvid.samplers import sample_few_step
from causvid.schedule import add_noise, x0_from_velocity


def self_forcing_rollout(
    rollout: CausalRollout,
    generator: Callable[..., torch.Tensor],
    text: torch.Tensor,
    num_frames: int,
    rng: torch.Generator,
) -> torch.Tensor:
    """Roll out `num_frames` latent frames block by block; returns them [B, C, F, H, W].

    `rollout` (its denoiser, KV cache, noise and sigmas) runs the gradient-free steps and the
    commits; `generator` is the same model as the loop wrapped it, called for the exit step so
    its gradients are the ones the optimiser (and, across processes, the all-reduce) sees.
    `rng` draws the exit steps and the re-noising between steps.
    """
    if rollout.cache is None:
        raise ValueError("self-forcing rolls out against a KV cache: build the rollout with use_kv_cache=True")
    sigmas, block_frames = rollout.sigmas, rollout.denoiser.block_frames
    if num_frames % block_frames:
        raise ValueError(f"a rollout is whole blocks: {num_frames} latent frames, blocks of {block_frames}")
    blocks = []
    while rollout.frames_done < num_frames:
        exit_step = int(torch.randint(len(sigmas), (1,), generator=rng))
        x = rollout.noise(block_frames)
        if exit_step > 0:
            # The steps before the exit step, as at inference (predict x0, re-noise), without a graph.
            with torch.no_grad():
                x0 = sample_few_step(rollout.velocity_fn(text), x, sigmas[:exit_step],
                                     lambda: torch.randn(x.shape, generator=rng))
            x = add_noise(x0, rollout.noise(block_frames), sigmas[exit_step].expand(x.shape[0]))
        sigma = sigmas[exit_step].expand(x.shape[0])
        # The cache keeps the prompt's cross-attention K/V from the stream's first forward, which
        # usually ran without a graph; forgetting them makes the exit step recompute them, so the
        # text embedder and cross-attention K/V projections get gradients in every block.
        rollout.cache.forget_prompt()
        x0 = x0_from_velocity(x, generator(x, sigma, text, cache=rollout.cache), sigma)
        rollout.commit(x0.detach(), text)  # no_grad: later blocks see this block, gradients don't cross
        blocks.append(x0)
    return torch.cat(blocks, dim=2)
