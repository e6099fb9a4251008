"""Denoise the next block of several streams, batching the ones whose shapes match.

Streams whose KV caches hold the same number of frames and who sample the same noise levels
can share one forward pass per step: their caches are stacked along the batch dimension,
denoised together, and split back. Each stream keeps drawing its re-noising from its own
RNG, so a batched block equals the block the stream would get alone (test_stream_session).
Denoising and committing are separate calls, so the engine can decode and send a block before
the pass that writes it into the caches.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from causvid.rollout import CausalRollout
from causvid.samplers import sample_few_step
from stream.state import BlockPlan


def _batch_key(plan: BlockPlan) -> tuple:
    return (plan.stream.rollout.cache.cached_frames, tuple(plan.sigmas.tolist()), tuple(plan.noise.shape))


def _denoise_together(plans: list[BlockPlan]) -> list[torch.Tensor]:
    """`CausalRollout.denoise_block` for several streams at once; returns each stream's clean block."""
    rollouts = [plan.stream.rollout for plan in plans]
    batch, frames = CausalRollout.stacked(rollouts, plans[0].sigmas), plans[0].noise.shape[2]
    # Each stream re-noises from its own RNG, so its block equals the one it gets alone.
    x0 = sample_few_step(
        batch.velocity_fn(torch.cat([plan.text for plan in plans])), torch.cat([plan.noise for plan in plans]),
        plans[0].sigmas, lambda: torch.cat([r.noise(frames) for r in rollouts]),
    )
    batch.scatter(rollouts)  # keeps the prompts' cross-attention K/V
    return list(x0.split(1))


def group_plans(plans: list[BlockPlan], batching: bool = True) -> list[list[int]]:
    """Indices of plans that can share forward passes (each plan alone when not batching)."""
    if not batching:
        return [[i] for i in range(len(plans))]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, plan in enumerate(plans):
        groups[_batch_key(plan)].append(i)
    return list(groups.values())


def denoise(plans: list[BlockPlan], groups: list[list[int]]) -> list[torch.Tensor]:
    """Denoise every plan's block, group by group, without committing; clean latents in plan order."""
    clean: list[torch.Tensor | None] = [None] * len(plans)
    for members in groups:
        if len(members) == 1:
            plan = plans[members[0]]
            clean[members[0]] = plan.stream.rollout.denoise_block(plan.text, plan.noise, plan.sigmas)
            continue
        for i, block in zip(members, _denoise_together([plans[i] for i in members])):
            clean[i] = block
    return clean


def commit(plans: list[BlockPlan], groups: list[list[int]], clean: list[torch.Tensor]) -> None:
    """Write each plan's clean block into its stream's KV cache, one cache-writing pass per group."""
    for members in groups:
        group = [plans[i] for i in members]
        if len(group) == 1:
            group[0].stream.rollout.commit(clean[members[0]], group[0].text)
            continue
        rollouts = [plan.stream.rollout for plan in group]
        batch = CausalRollout.stacked(rollouts, group[0].sigmas)
        batch.commit(torch.cat([clean[i] for i in members]), torch.cat([plan.text for plan in group]))
        batch.scatter(rollouts)
