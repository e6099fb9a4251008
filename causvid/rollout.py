"""The block-causal rollout: latent blocks generated one after another, each seeing the ones before.

This is the one generation loop of the project. The pipeline, the streaming server and
self-rollout distillation all drive a `CausalRollout`; they differ only in what they do with
each block.
"""

from __future__ import annotations

import torch

from causvid.models.attention import KVCache
from causvid.models.denoiser import WanDenoiser
from causvid.samplers import VelocityFn, sample_few_step


class CausalRollout:
    """One stream's generation state over a shared denoiser: KV cache, context latents and RNG.

    `history` holds the clean latents of the frames later blocks see: those the rolling cache
    keeps (so `recache` can rebuild it), or, with `use_kv_cache=False`, every frame so far, over
    which each step recomputes a full block-causal forward. That path is slow and exists to
    check the cached one.
    """

    def __init__(
        self,
        denoiser: WanDenoiser,
        sigmas: torch.Tensor,
        latent_shape: tuple[int, int, int],
        *,
        batch: int = 1,
        sink_frames: int = 0,
        window_frames: int | None = None,
        use_kv_cache: bool = True,
        rng: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.channels, self.height, self.width = latent_shape
        self.batch = batch
        self.device = torch.device(device)
        self.rng = rng
        self.window = None if window_frames is None else (sink_frames, window_frames)
        self.cache = denoiser.new_cache(self.height, self.width, sink_frames, window_frames) if use_kv_cache else None
        self.history: torch.Tensor | None = None
        self.frames_done = 0

    def noise(self, frames: int) -> torch.Tensor:
        """Fresh Gaussian latents for `frames` frames, drawn from this stream's RNG."""
        shape = (self.batch, self.channels, frames, self.height, self.width)
        device = self.rng.device if self.rng is not None else self.device
        return torch.randn(shape, generator=self.rng, device=device).to(self.device)

    def velocity_fn(self, text: torch.Tensor) -> VelocityFn:
        """The denoiser applied to a new block, conditioned on every committed frame."""
        if self.cache is not None:
            return lambda x, sigma: self.denoiser(x, sigma, text, cache=self.cache)

        def recompute(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if self.history is None:
                return self.denoiser(x, sigma, text, causal=True, window=self.window)
            context_frames, frames = self.history.shape[2], x.shape[2]
            per_frame = torch.cat(
                [sigma.new_zeros(x.shape[0], context_frames), sigma[:, None].expand(-1, frames)], dim=1
            )
            full = torch.cat([self.history.to(x.dtype), x], dim=2)
            velocity = self.denoiser(full, per_frame, text, causal=True, window=self.window)
            return velocity[:, :, context_frames:]

        return recompute

    def denoise_block(self, text: torch.Tensor, noise: torch.Tensor | None = None,
                      sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise one block with the few-step sampler, without committing it. Returns [B, C, k, H, W].

        `noise` may be a partly noised input (video-to-video) whose level is `sigmas[0]`. Streams
        decode and show the block before `commit`, so the first frame does not wait for that pass.
        """
        if noise is None:
            noise = self.noise(self.denoiser.block_frames)
        sigmas = self.sigmas if sigmas is None else sigmas
        return sample_few_step(self.velocity_fn(text), noise, sigmas, lambda: self.noise(noise.shape[2]))

    def next_block(self, text: torch.Tensor, noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """`denoise_block`, then `commit`: the next block, already context for the one after."""
        clean = self.denoise_block(text, noise, sigmas)
        self.commit(clean, text)
        return clean

    @torch.no_grad()
    def commit(self, clean: torch.Tensor, text: torch.Tensor) -> None:
        """Make clean latents context for later blocks: the pass at sigma=0 that fills the KV cache."""
        if self.cache is not None:
            self._write_cache(clean, text)
        history = clean if self.history is None else torch.cat([self.history, clean], dim=2)
        keep = None if self.cache is None else self.cache.kept_frames(history.shape[2])
        self.history = history if keep is None else history[:, :, keep.to(history.device)]
        self.frames_done += clean.shape[2]

    def _write_cache(self, clean: torch.Tensor, text: torch.Tensor) -> None:
        zero = torch.zeros(clean.shape[0], device=clean.device)
        self.denoiser(clean, zero, text, cache=self.cache, write_cache=True)

    def restart(self) -> None:
        """Forget every committed frame: the next block starts a new stream (a scene cut), its
        noise still drawn from this stream's RNG."""
        if self.cache is not None:
            old = self.cache
            self.cache = self.denoiser.new_cache(self.height, self.width, old.sink_frames, old.window_frames)
        self.history = None
        self.frames_done = 0

    @torch.no_grad()
    def recache(self, text: torch.Tensor) -> None:
        """Rebuild the KV cache from the frames it holds, under a new prompt (LongLive's KV re-cache).

        Cached keys and values depend on the prompt the frames were committed under; after a
        prompt switch the old ones pull later blocks back to the old scene. The held frames are
        committed again from an empty cache, in blocks counted back from the newest frame (so the
        latest blocks are re-formed as they were made; the sinks or an image prefix lead).
        Without a KV cache every step already reads the current prompt: nothing to do.
        """
        if self.cache is None or self.history is None:
            return
        old = self.cache
        self.cache = self.denoiser.new_cache(self.height, self.width, old.sink_frames, old.window_frames)
        frames, block = self.history.shape[2], self.denoiser.block_frames
        starts = [0] + list(range(frames % block or block, frames, block))
        for start, end in zip(starts, starts[1:] + [frames]):
            self._write_cache(self.history[:, :, start:end], text)

    @classmethod
    def stacked(cls, rollouts: list["CausalRollout"], sigmas: torch.Tensor) -> "CausalRollout":
        """One rollout whose batch rows are the given streams' (equal cache lengths), to denoise or
        commit their blocks in one pass each; `scatter` hands the rows back."""
        first = rollouts[0]
        batch = cls(first.denoiser, sigmas, (first.channels, first.height, first.width), batch=len(rollouts),
                    device=first.device)
        batch.cache = KVCache.stacked([r.cache for r in rollouts])
        if first.history is not None:
            batch.history = torch.cat([r.history for r in rollouts])
        return batch  # its frames_done counts the frames committed while stacked

    def scatter(self, rollouts: list["CausalRollout"]) -> None:
        """Write this stacked rollout's rows back into the streams it was stacked from."""
        for row, rollout in enumerate(rollouts):
            rollout.cache.take_row(self.cache, row)
            rollout.history = None if self.history is None else self.history[row : row + 1]
            rollout.frames_done += self.frames_done
