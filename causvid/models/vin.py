"""Video Interface Network (Dedhia et al., "Generating, Fast and Slow", arXiv 2503.17539).

A small network that reads the whole noisy video at every diffusion step into a fixed set of
global tokens, so that a DiT denoising short chunks of a long video in parallel sees what the
other chunks hold. Three stages, each from the paper:

- **read**: one cross-attention step, the learned global tokens as queries and the patch tokens
  of the noisy video's keyframes (one latent frame every `keyframe_stride`) as keys and values;
- **process**: `process_layers` self-attention blocks over [global tokens; text tokens],
  conditioned on the timestep by adaptive layer norm;
- **guide**: the tokens, plus an embedding of each chunk's place in the video, join every
  self-attention of the DiT as extra keys and values (`causvid.models.attention.GlobalTokens`).

Joining the DiT's own keys and values (the paper's reading) rather than adding cross-attention
layers keeps the DiT an unmodified diffusers `WanTransformer3DModel`: the guide is an attention
processor feature, with no new modules inside the transformer, and each layer reads the tokens
through the K/V projections it already has.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from causvid.models.attention import GlobalTokens
from causvid.schedule import timestep_from_sigma


class ProcessBlock(nn.Module):
    """Self-attention and feed-forward over [global; text] tokens, modulated by the timestep (adaLN)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(query_dim=dim, heads=num_heads, dim_head=dim // num_heads, qk_norm="rms_norm", bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=4, activation_fn="gelu-approximate")
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.ff(self.norm2(x) * (1 + scale2) + shift2)


def _positions(frames: torch.Tensor, rows: int, cols: int, dim: int) -> torch.Tensor:
    """Sinusoidal (frame, row, column) embeddings [len(frames) * rows * cols, dim]: half for time."""
    device = frames.device
    t = get_timestep_embedding(frames.float(), dim // 2, flip_sin_to_cos=True, downscale_freq_shift=0)
    r = get_timestep_embedding(torch.arange(rows, device=device).float(), dim // 4, flip_sin_to_cos=True)
    c = get_timestep_embedding(torch.arange(cols, device=device).float(), dim - dim // 2 - dim // 4,
                               flip_sin_to_cos=True)
    grid = (len(frames), rows, cols)
    return torch.cat([
        t[:, None, None].expand(*grid, -1), r[None, :, None].expand(*grid, -1), c[None, None].expand(*grid, -1),
    ], dim=-1).flatten(0, 2)


class VideoInterfaceNetwork(ModelMixin, ConfigMixin):
    """Noisy video latents, noise level and prompt -> global tokens for every chunk of the video.

    `dim` must be the DiT's hidden size (heads x head dim): the tokens enter its attention
    as they are. `dit_layers` is its depth: one learned gate per layer (`GlobalTokens`).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        dim: int = 256,
        text_dim: int = 384,
        num_tokens: int = 64,
        num_heads: int = 4,
        process_layers: int = 2,
        keyframe_stride: int = 2,
        dit_layers: int = 4,
        gate_init: float = -3.0,
    ):
        super().__init__()
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.read_norm = nn.LayerNorm(dim, eps=1e-6)
        self.video_norm = nn.LayerNorm(dim, eps=1e-6)
        self.read = Attention(query_dim=dim, heads=num_heads, dim_head=dim // num_heads, qk_norm="rms_norm", bias=True)
        self.process = nn.ModuleList(ProcessBlock(dim, num_heads) for _ in range(process_layers))
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, dim)
        self.chunk_embedding = nn.Linear(dim, dim)
        # Starts low so the DiT first attends almost only to its chunk, as the teacher it comes from.
        self.logit_bias = nn.Parameter(torch.full((dit_layers,), float(gate_init)))

    def read_video(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the keyframes of `x` [B, C, T, H, W], with their places: [B, n, dim]."""
        stride = self.config.keyframe_stride
        keyframes = torch.arange(0, x.shape[2], stride, device=x.device)
        patches = self.patch_embedding(x[:, :, ::stride].to(self.dtype))
        _, dim, _, rows, cols = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        return tokens + _positions(keyframes, rows, cols, dim).to(tokens.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                chunk_starts: torch.Tensor) -> GlobalTokens:
        """Global tokens for each chunk: `tokens` [B * len(chunk_starts), N, dim], batch-major.

        Args:
            x: the whole noisy video's latents [B, C, T, H, W].
            sigma: its noise level [B].
            text: prompt embeddings [B, L, text_dim].
            chunk_starts: first latent frame of each chunk.
        """
        batch = x.shape[0]
        temb = self.time_embedding(self.time_proj(timestep_from_sigma(sigma.float())).to(self.dtype))
        video = self.video_norm(self.read_video(x))
        queries = self.tokens[None].expand(batch, -1, -1) + temb[:, None]
        tokens = queries + self.read(self.read_norm(queries), encoder_hidden_states=video)
        num_tokens = tokens.shape[1]
        joint = torch.cat([tokens, self.text_proj(text.to(self.dtype))], dim=1)
        for block in self.process:
            joint = block(joint, temb)
        tokens = self.out(self.out_norm(joint[:, :num_tokens]))
        place = get_timestep_embedding(chunk_starts.float(), tokens.shape[-1], flip_sin_to_cos=True)
        per_chunk = tokens[:, None] + self.chunk_embedding(place.to(tokens))[None, :, None]
        return GlobalTokens(per_chunk.flatten(0, 1), self.logit_bias)
