"""Self-Forcing's training rollout (Huang et al. 2025, arXiv 2506.08009), run past the teacher's horizon.

The student produces every block the way it will at inference: few-step denoising against
the same rolling KV cache (sinks + window) filled with its *own* earlier outputs, so training
sees the errors it will have to live with. Backpropagating through the whole rollout would
cost the memory of every step of every block; instead each block stops at one random step of
its few-step schedule (its exit step), and only that step's forward keeps a graph. The steps
before it, and the clean pass that commits the block to the cache, run without gradient.

Long rollouts (Self-Forcing++, arXiv 2510.02283) roll the stream out for many blocks and let
the scores judge only a window of the teacher's length: the blocks before the window are made
exactly as at inference, without a graph, so memory stays that of the window whatever its
place. A prompt switch (LongLive, arXiv 2509.22622) changes the prompt at a block before the
window, with the same KV re-cache as at inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from causvid.rollout import CausalRollout
from causvid.samplers import sample_few_step
from causvid.schedule import add_noise, x0_from_velocity


def self_forcing_rollout(
    rollout: CausalRollout,
    student: Callable[..., torch.Tensor],
    text: torch.Tensor,
    num_frames: int,
    rng: torch.Generator,
    *,
    start_block: int = 0,
    switch: tuple[int, torch.Tensor] | None = None,
    recache: bool = True,
    exit_step: int | None = None,
) -> torch.Tensor:
    """Roll out blocks up to the end of a window of `num_frames` latent frames that starts at
    block `start_block`; returns the window's latents [B, C, num_frames, H, W].

    `rollout` (its denoiser, KV cache, noise and sigmas) runs the gradient-free steps and the
    commits; `student` is the same model as the loop wrapped it, called for the exit steps so
    its gradients are the ones the optimiser (and, across processes, the all-reduce) sees.
    `switch` = (block, new text) changes the prompt from that block on (at most `start_block`,
    so the window is made under one prompt), re-caching as inference does when `recache`.
    `rng` draws each window block's exit step, or `exit_step` fixes it (for checks); with sharded
    models it must draw alike on every process (`causvid.sharding.agreed_generator`).
    """
    if rollout.cache is None:
        raise ValueError("self-forcing rolls out against a KV cache: build the rollout with use_kv_cache=True")
    sigmas, block_frames = rollout.sigmas, rollout.denoiser.block_frames
    if num_frames % block_frames:
        raise ValueError(f"a rollout is whole blocks: {num_frames} latent frames, blocks of {block_frames}")
    if switch is not None and not 0 < switch[0] <= start_block:
        raise ValueError(f"a switch must come after the first block and by the window's start ({start_block}), "
                         f"got block {switch[0]}")
    end_block = start_block + num_frames // block_frames
    window = []
    for block in range(end_block):
        if switch is not None and block == switch[0]:
            text = switch[1]
            if recache:
                rollout.recache(text)
        if block < start_block:  # as at inference: every step, then the commit
            with torch.no_grad():
                rollout.next_block(text)
            continue
        step = int(torch.randint(len(sigmas), (1,), generator=rng)) if exit_step is None else exit_step
        x = rollout.noise(block_frames)
        if step > 0:
            # The steps before the exit step, as at inference (predict x0, re-noise), without a graph.
            with torch.no_grad():
                x0 = sample_few_step(rollout.velocity_fn(text), x, sigmas[:step], lambda: rollout.noise(block_frames))
            x = add_noise(x0, rollout.noise(block_frames), sigmas[step].expand(x.shape[0]))
        sigma = sigmas[step].expand(x.shape[0])
        # The cache keeps the prompt's cross-attention K/V from the stream's first forward, which
        # usually ran without a graph; forgetting them makes the exit step recompute them, so the
        # text embedder and cross-attention K/V projections get gradients in every block.
        rollout.cache.forget_prompt()
        x0 = x0_from_velocity(x, student(x, sigma, text, cache=rollout.cache), sigma)
        rollout.commit(x0.detach(), text)  # no_grad: later blocks see this block, gradients don't cross
        window.append(x0)
    return torch.cat(window, dim=2)
