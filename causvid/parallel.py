"""Parallel long-video denoising: a long latent video as overlapping chunks, denoised as one batch.

Chunk c owns latent frames [c*F + L, (c+1)*F + L) (chunk 0 also owns the first L) and sees the
L frames before them, the end of chunk c-1, as context: its window is [c*F, c*F + F + L). A
video of C chunks is C*F + L latent frames. Every window has the teacher's clip length when
F + L is it, so the DiT denoises clips of the length it learnt.

At each step the windows' velocities are fused back into one video: a frame takes its owner's
prediction, except in the overlaps at high noise (sigma above `blend_cutoff`), where the two
chunks' predictions are blended linearly across the overlap (FreeNoise, Gen-L-Video). With a
Video Interface Network (`causvid.models.vin`) every chunk also sees global tokens read from
the whole video; without one this is chunk-parallel sampling with overlap fusion alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from causvid.errors import UserError
from causvid.models.denoiser import WanDenoiser
from causvid.models.vin import VideoInterfaceNetwork


@dataclass(frozen=True)
class ChunkLayout:
    """How a video of `num_chunks` chunks of `chunk_frames` latent frames, each seeing the
    `context_frames` before it, is laid out."""

    num_chunks: int
    chunk_frames: int
    context_frames: int

    def __post_init__(self) -> None:
        if self.num_chunks < 1 or self.chunk_frames < 1:
            raise UserError(f"chunks need num_chunks >= 1 and chunk_frames >= 1, got {self.num_chunks}, {self.chunk_frames}")
        if not 0 <= self.context_frames <= self.chunk_frames:
            raise UserError(f"context_frames must be in [0, chunk_frames={self.chunk_frames}], got {self.context_frames}")

    @classmethod
    def covering(cls, latent_frames: int, chunk_frames: int, context_frames: int) -> "ChunkLayout":
        """The fewest chunks whose video holds at least `latent_frames` frames."""
        return cls(max(1, math.ceil((latent_frames - context_frames) / chunk_frames)), chunk_frames, context_frames)

    @classmethod
    def of(cls, latent_frames: int, chunk_frames: int, context_frames: int) -> "ChunkLayout":
        """The layout of a video of exactly `latent_frames` frames (C * chunk_frames + context_frames)."""
        layout = cls.covering(latent_frames, chunk_frames, context_frames)
        if layout.total_frames != latent_frames:
            raise UserError(
                f"{latent_frames} latent frames do not split into chunks of {chunk_frames} after {context_frames} "
                f"context frames; use {layout.total_frames} (pad, then crop)"
            )
        return layout

    @property
    def window_frames(self) -> int:
        return self.chunk_frames + self.context_frames

    @property
    def total_frames(self) -> int:
        return self.num_chunks * self.chunk_frames + self.context_frames

    @property
    def starts(self) -> list[int]:
        """First latent frame of each chunk's window."""
        return [c * self.chunk_frames for c in range(self.num_chunks)]

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> every chunk's window [B * num_chunks, C, window_frames, H, W], batch-major."""
        width = self.window_frames
        return torch.stack([x[:, :, s : s + width] for s in self.starts], dim=1).flatten(0, 1)

    def weights(self, blend: bool) -> torch.Tensor:
        """[num_chunks, window_frames]: what each window's prediction of each frame weighs in the fusion.

        Weights of one frame sum to 1. An overlap frame belongs to the earlier chunk (the later one
        sees it as context) unless `blend`, where the later chunk's share rises linearly across it.
        """
        weights = torch.ones(self.num_chunks, self.window_frames)
        overlap = self.context_frames
        if overlap and self.num_chunks > 1:
            rising = torch.arange(1, overlap + 1) / (overlap + 1) if blend else torch.zeros(overlap)
            weights[1:, :overlap] = rising
            weights[:-1, -overlap:] = 1 - rising
        return weights

    def fuse(self, windows: torch.Tensor, blend: bool) -> torch.Tensor:
        """Inverse of `windows`: per-window predictions -> one video [B, C, T, H, W], weighted by `weights`."""
        per_chunk = windows.unflatten(0, (-1, self.num_chunks))
        batch, _, channels, _, height, width = per_chunk.shape
        weights = self.weights(blend).to(windows.device, windows.dtype)
        video = windows.new_zeros(batch, channels, self.total_frames, height, width)
        for c, start in enumerate(self.starts):
            video[:, :, start : start + self.window_frames] += per_chunk[:, c] * weights[c].view(1, 1, -1, 1, 1)
        return video


class ParallelDenoiser(nn.Module):
    """Velocity of a whole long video, from a DiT denoising its chunks in one batch.

    With `vin` the chunks are guided by a Video Interface Network recomputed at every call
    (every diffusion step); without it, chunks meet only in the blended overlaps. Called as
    `denoiser(x, sigma, text)` on videos of C * chunk_frames + context_frames latent frames,
    so the samplers and `guided_velocity` take it as they take a `WanDenoiser`.
    """

    def __init__(self, denoiser: WanDenoiser, chunk_frames: int, context_frames: int, blend_cutoff: float,
                 vin: VideoInterfaceNetwork | None = None):
        super().__init__()
        ChunkLayout(1, chunk_frames, context_frames)  # a bad layout fails here
        self.denoiser = denoiser
        self.vin = vin
        self.chunk_frames = chunk_frames
        self.context_frames = context_frames
        self.blend_cutoff = blend_cutoff

    def layout(self, latent_frames: int) -> ChunkLayout:
        return ChunkLayout.of(latent_frames, self.chunk_frames, self.context_frames)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Velocity [B, C, T, H, W] of noisy latents `x` at one noise level per video, `sigma` [B]."""
        if sigma.ndim != 1:
            raise ValueError("parallel denoising takes one noise level per video")
        layout = self.layout(x.shape[2])
        chunks = layout.num_chunks
        global_tokens = None
        if self.vin is not None:
            starts = torch.tensor(layout.starts, device=x.device)
            global_tokens = self.vin(x, sigma, text, starts)
        velocity = self.denoiser(
            layout.windows(x), sigma.repeat_interleave(chunks), text.repeat_interleave(chunks, dim=0),
            global_tokens=global_tokens,
        )
        # One step has one noise level, so the whole batch blends or none of it.
        return layout.fuse(velocity, blend=bool(sigma.max() > self.blend_cutoff))
