"""The video autoencoder: diffusers' `AutoencoderKLWan` with streaming encode and decode.

Wan's autoencoder is causal in time and carries a feature cache between chunks: the first
chunk is one pixel frame (one latent frame), every later chunk four pixel frames (one latent
frame). diffusers' public `encode`/`decode` reset that cache on every call; here each stream
owns its own cache, so one shared model can encode or decode many streams a block at a time.
Latents are normalised per channel with `latents_mean`/`latents_std` from the model config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from causvid.checkpoint import load_diffusers_model, save_diffusers_model
from causvid.errors import UserError
from causvid.frames import to_uint8


TEMPORAL_FACTOR = 4


@dataclass
class _ConvCache:
    """One stream's causal-conv feature cache for the encoder or the decoder."""

    feats: list
    started: bool = False
    pending: list[torch.Tensor] = field(default_factory=list)


def num_latent_frames(num_frames: int) -> int:
    """Latent frames for a clip of 1 + 4k pixel frames."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        raise UserError(f"clips must have 1 + 4k frames, got {num_frames}")
    return 1 + (num_frames - 1) // TEMPORAL_FACTOR


def latent_frames_covering(num_frames: int) -> int:
    """The fewest latent frames that decode to at least `num_frames` pixel frames (any count)."""
    return 1 + -(-(num_frames - 1) // TEMPORAL_FACTOR)


def num_pixel_frames(latent_frames: int) -> int:
    """Pixel frames decoded from `latent_frames` latent frames."""
    return 1 + TEMPORAL_FACTOR * (latent_frames - 1) if latent_frames else 0


class VideoAutoencoder(torch.nn.Module):
    """Pixels [B, 3, T, H, W] in [-1, 1] <-> normalised latents [B, z, F, H/s, W/s]."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae
        z = vae.config.z_dim
        if 2 ** sum(vae.config.temperal_downsample) != TEMPORAL_FACTOR:
            raise UserError(f"the autoencoder must compress time {TEMPORAL_FACTOR}x, got {vae.config.temperal_downsample}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(vae.config, name)) != z:
                raise UserError(f"{name} has {len(getattr(vae.config, name))} channels, z_dim is {z}")
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VideoAutoencoder":
        """Load in fp32 whatever the stored dtype: training needs it (pipelines cast for inference)."""
        return cls(load_diffusers_model(AutoencoderKLWan, path, torch_dtype=torch.float32))

    def save_pretrained(self, path: str | Path) -> None:
        save_diffusers_model(self.vae, path)

    def channels_last(self) -> "VideoAutoencoder":
        """Keep conv weights channels-last, the layout oneDNN convolves fastest (inference).

        Activations follow the weights' layout, so oneDNN need not reorder them around each
        convolution. Values are unchanged; saving writes contiguous tensors.
        """
        for module in self.vae.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(module, torch.nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        return self

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.dim_mult) - 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    # -- whole clips -------------------------------------------------------------------------

    def encode(self, video: torch.Tensor, sample: bool = False, rng: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents of a clip of 1 + 4k frames (the posterior mode unless `sample`)."""
        num_latent_frames(video.shape[2])
        posterior = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = posterior.sample(rng) if sample else posterior.mode()
        return self.normalize(z.float())

    def forward(self, video: torch.Tensor, context_frames: int = 0):
        """Training pass: (reconstruction in [-1, 1], posterior) of `video[:, :, context_frames:]`.

        The first `context_frames` frames (0 or 1 + 4k) only warm up the causal caches, without
        gradient, as in truncated backpropagation through time. The caches' receptive field spans
        tens of frames, longer than any clip that is affordable to backpropagate through, so
        without a warm-up the model never trains in the state that a long stream reaches.
        """
        if context_frames and (context_frames - 1) % TEMPORAL_FACTOR:
            raise UserError(f"context_frames must be 0 or 1 + 4k, got {context_frames}")
        encoder, decoder = self.new_encoder_stream(), self.new_decoder_stream()
        if context_frames:
            with torch.no_grad():
                warm = self._encode_moments(encoder, video[:, :, :context_frames])
                self._decode_raw(decoder, warm[:, : self.latent_channels])
        moments = self._encode_moments(encoder, video[:, :, context_frames:])
        if moments is None or encoder.pending:
            raise UserError(f"{video.shape[2] - context_frames} frames after the context do not fill whole chunks")
        posterior = DiagonalGaussianDistribution(moments)
        return self._decode_raw(decoder, posterior.mode()), posterior

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from normalised latents."""
        return self.vae.decode(self.denormalize(latents).to(self.vae.dtype)).sample.float()

    # -- streams -----------------------------------------------------------------------------

    def new_decoder_stream(self) -> _ConvCache:
        return _ConvCache([None] * self.vae._cached_conv_counts["decoder"])

    def new_encoder_stream(self) -> _ConvCache:
        return _ConvCache([None] * self.vae._cached_conv_counts["encoder"])

    def decode_stream(self, stream: _ConvCache, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of a stream; returns their pixel frames in [-1, 1].

        The first latent frame of a stream gives one pixel frame, every later one four.
        """
        return self._decode_raw(stream, self.denormalize(latents).to(self.vae.dtype)).float()

    def iter_decode_frames(self, stream: _ConvCache, latents: torch.Tensor, limit: int | None = None) -> Iterator[np.ndarray]:
        """`decode_stream` of a one-video batch, yielding each latent frame's uint8 frames [1 or 4, H, W, 3].

        A caller shows them before the next latent frame is decoded. At most `limit` frames come
        out (None: all); a latent frame past the limit is never decoded.
        """
        decoded = self._iter_decode_raw(stream, self.denormalize(latents).to(self.vae.dtype))
        shown = 0
        while limit is None or shown < limit:
            pixels = next(decoded, None)
            if pixels is None:
                return
            frames = to_uint8(pixels)[: None if limit is None else limit - shown]
            shown += len(frames)
            yield frames

    def _iter_decode_raw(self, stream: _ConvCache, z: torch.Tensor) -> Iterator[torch.Tensor]:
        # Un-normalised latents -> pixels, one latent frame at a time through the stream's cache.
        x = self.vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            pixels = self.vae.decoder(x[:, :, i : i + 1], feat_cache=stream.feats, feat_idx=[0],
                                      first_chunk=not stream.started)
            stream.started = True
            yield pixels.clamp(-1, 1)

    def _decode_raw(self, stream: _ConvCache, z: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self._iter_decode_raw(stream, z)), dim=2)

    def encode_stream(self, stream: _ConvCache, frames: torch.Tensor) -> torch.Tensor | None:
        """Feed pixel frames [B, 3, n, H, W] of a stream; returns the latent frames now complete.

        Frames are buffered until a chunk is full (1 frame first, then 4), so any number can be
        fed at a time. Returns None when no latent frame completed.
        """
        moments = self._encode_moments(stream, frames)
        return None if moments is None else self.normalize(moments[:, : self.latent_channels].float())

    def _encode_moments(self, stream: _ConvCache, frames: torch.Tensor) -> torch.Tensor | None:
        # Pixels -> posterior moments [B, 2z, n, h, w] of every chunk the new frames complete.
        stream.pending.extend(frames.to(self.vae.dtype).unbind(2))
        out = []
        while True:
            need = TEMPORAL_FACTOR if stream.started else 1
            if len(stream.pending) < need:
                break
            chunk = torch.stack(stream.pending[:need], dim=2)
            del stream.pending[:need]
            out.append(self.vae.quant_conv(self.vae.encoder(chunk, feat_cache=stream.feats, feat_idx=[0])))
            stream.started = True
        return torch.cat(out, dim=2) if out else None
