"""The denoiser: diffusers' `WanTransformer3DModel` plus CausVid's attention, as a thin wrapper.

The transformer class and its weights are untouched, so a Wan2.1 checkpoint in diffusers
format loads as it is, and `save_pretrained` writes something diffusers loads back. What the
wrapper adds is how attention behaves (bidirectional, block-causal, KV-cached), per-frame
noise levels, and RoPE at chosen frame positions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from causvid.checkpoint import load_diffusers_model, save_diffusers_model
from causvid.errors import UserError
from causvid.models.attention import (
    AttentionContext,
    CachedCrossAttnProcessor,
    CausalSelfAttnProcessor,
    GlobalTokens,
    KVCache,
    block_causal_mask,
)
from causvid.schedule import timestep_from_sigma


class FramePositionedRope(WanRotaryPosEmbed):
    """Wan's 3-axis RoPE, evaluated at chosen frame positions instead of always 0..F-1."""

    def __init__(self, rope: WanRotaryPosEmbed):
        super().__init__(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        self.frame_positions: torch.Tensor | None = None

    def at(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Unit complex rotations [1, len(frames)*height*width, 1, D/2] for patch grids at the given frame positions."""
        if len(frames) and int(frames.max()) >= self.max_seq_len:
            raise UserError(
                f"frame position {int(frames.max())} is past the RoPE table ({self.max_seq_len}); "
                "use a rolling KV cache (window_frames) for long streams"
            )
        split = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            t, h, w = table.split(split, dim=1)
            grid = (len(frames), height, width)
            parts = [
                t[frames.to(t.device)].view(-1, 1, 1, self.t_dim).expand(*grid, -1),
                h[:height].view(1, height, 1, -1).expand(*grid, -1),
                w[:width].view(1, 1, width, -1).expand(*grid, -1),
            ]
            # Wan's tables repeat each frequency for both members of a pair; one copy is enough.
            out.append(torch.cat(parts, dim=-1)[..., ::2].reshape(1, -1, 1, table.shape[1] // 2).float())
        return torch.complex(*out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        positions = self.frame_positions
        if positions is None:
            positions = torch.arange(frames // p_t)
        return self.at(positions, height // p_h, width // p_w)


class WanDenoiser(torch.nn.Module):
    """Predicts flow velocity for video latents [B, C, F, H, W] at per-frame noise levels.

    `block_frames` latent frames form one causal block. The same weights serve as the
    bidirectional teacher (`causal=False`), the block-causal student in training
    (`causal=True`, one masked forward) and in inference (`cache=KVCache`, one block at a time).
    """

    def __init__(self, transformer: WanTransformer3DModel, block_frames: int = 3):
        super().__init__()
        if transformer.config.added_kv_proj_dim is not None:
            raise UserError("image-conditioned Wan transformers (added_kv_proj_dim) are not supported")
        if block_frames < 1:
            raise UserError(f"block_frames must be >= 1, got {block_frames}")
        self.transformer = transformer
        self.block_frames = block_frames
        self.context = AttentionContext()
        transformer.rope = FramePositionedRope(transformer.rope)
        for layer, block in enumerate(transformer.blocks):
            block.attn1.set_processor(CausalSelfAttnProcessor(layer, self.context))
            block.attn2.set_processor(CachedCrossAttnProcessor(layer, self.context))
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, block_frames: int = 3, **kwargs) -> "WanDenoiser":
        """Load a diffusers-format `WanTransformer3DModel` directory."""
        return cls(load_diffusers_model(WanTransformer3DModel, path, **kwargs), block_frames)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block in the backward pass instead of keeping its activations.

        The processors read the shared attention context, which `forward` clears as it returns,
        before the backward pass recomputes anything: each block therefore saves a snapshot of the
        context (mask, this moment's cache tensors, global tokens) and recomputes under it.
        """
        context = self.context

        def checkpointed(block, *args):
            state = context.snapshot()
            return torch.utils.checkpoint.checkpoint(
                block.__call__, *args, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), context.holding(state)),
            )

        self.transformer.enable_gradient_checkpointing(checkpointed)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a plain diffusers `WanTransformer3DModel` directory (config.json + safetensors)."""
        save_diffusers_model(self.transformer, path)

    @property
    def config(self):
        return self.transformer.config

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, p_h, p_w = self.patch_size
        return (height // p_h) * (width // p_w)

    def new_cache(self, height: int, width: int, sink_frames: int = 0, window_frames: int | None = None) -> KVCache:
        """An empty KV cache for latents of this spatial size."""
        if window_frames is not None:
            longest = sink_frames + window_frames + self.block_frames
            if longest > self.transformer.rope.max_seq_len:
                raise UserError(
                    f"sink_frames + window_frames + block_frames = {longest} exceeds the RoPE table "
                    f"({self.transformer.rope.max_seq_len} frames)"
                )
        return KVCache(len(self.transformer.blocks), self.tokens_per_frame(height, width), sink_frames, window_frames)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor,
        *,
        causal: bool = False,
        window: tuple[int, int] | None = None,
        cache: KVCache | None = None,
        write_cache: bool = False,
        global_tokens: GlobalTokens | None = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        Args:
            x: noisy latents [B, C, F, H, W].
            sigma: noise level in [0, 1], shape [B] (one per clip) or [B, F] (one per frame).
            text: prompt embeddings [B, L, D].
            causal: one full forward under the block-causal mask.
            window: (sink_frames, window_frames) for a windowed causal mask (the rolling cache's).
            cache: denoise `x` as the block after the cached frames.
            write_cache: also store this block's K/V in `cache` (the clean pass at sigma=0).
            global_tokens: a Video Interface Network's tokens, one set per clip, joined to every
                self-attention (bidirectional only).
        """
        _, _, frames, height, width = x.shape
        timestep = timestep_from_sigma(sigma.to(x.device, torch.float32))
        if timestep.ndim == 2:
            # Per-frame noise levels become per-token ones: the transformer supports [B, N] timesteps.
            timestep = timestep.repeat_interleave(self.tokens_per_frame(height, width), dim=1)
        ctx, rope = self.context, self.transformer.rope
        try:
            if cache is not None:
                _, p_h, p_w = self.patch_size
                cached = cache.cached_frames
                rope.frame_positions = torch.arange(cached, cached + frames)
                ctx.cache_rotation = rope.at(torch.arange(cached), height // p_h, width // p_w)
                ctx.cache, ctx.write_cache = cache, write_cache
                cache.sync_prompt(text)
            elif causal or window is not None:
                ctx.mask = self._causal_mask(frames, height, width, x.device, window)
            ctx.global_tokens = global_tokens
            dtype = self.transformer.dtype
            velocity = self.transformer(x.to(dtype), timestep, text.to(dtype), return_dict=False)[0]
        finally:
            ctx.clear()
            rope.frame_positions = None
        return velocity.to(x.dtype)

    def _causal_mask(self, frames, height, width, device, window) -> torch.Tensor:
        # The mask depends only on shapes; rebuilding it every training step is wasted work.
        key = (frames, height, width, str(device), window)
        if key != self._mask_key:
            sink, win = window if window is not None else (0, None)
            self._mask = block_causal_mask(
                frames, self.tokens_per_frame(height, width), self.block_frames, sink, win, device
            )
            self._mask_key = key
        return self._mask
