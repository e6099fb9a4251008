"""Model sizes by name: the tiny random-weight pipeline for tests, and the shapes-world models.

Each preset gives the init arguments of the diffusers classes and the pipeline config, so a
pipeline can be built from a name, trained, and saved with `save_pretrained`.
"""

from __future__ import annotations

import copy

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from causvid.errors import UserError
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.pipeline import CausVidPipeline, PipelineConfig
from causvid.text import TextEncoder, load_text_encoder


# diffusers configs of Wan2.1-T2V-1.3B (transformer/config.json, vae/config.json of the download),
# for what is measured at real scale on random weights or the meta device.
WAN_1_3B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
WAN_SIZE = (480, 832)  # Wan2.1-T2V-1.3B's height and width; its VAE is 8x smaller spatially
# Its UMT5-XXL text encoder (text_encoder/config.json) and prompt length.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
UMT5_TOKENS = 512

PRESETS: dict[str, dict] = {
    # Fast enough for unit tests on 2 cores: 32x32 pixels, 8x8 latents, 16 tokens per frame.
    "tiny": {
        "transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        ),
        "vae": dict(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ),
        "pipeline": dict(height=32, width=32, block_frames=2, teacher_steps=4, sink_frames=1, window_frames=4,
                         switch_recache=True),
    },
    # The embedded default: 64x64 pixels, 4x spatial autoencoder, 8x8 tokens per latent frame.
    "shapes": {
        "transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=8, out_channels=8,
            text_dim=384, freq_dim=256, ffn_dim=1024, num_layers=4, rope_max_seq_len=256,
        ),
        "vae": dict(
            base_dim=16, z_dim=8, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
        ),
        # A stream's context stays what the students are distilled with: a 2-block rollout's second
        # block sees the first block's 3 frames. Longer windows flood streams (docs/experiments.md).
        # A switch cuts to a new stream of the new prompt, the world's own switch: kept or re-cached
        # contexts pull the old scene back (docs/benchmarks.md).
        "pipeline": dict(height=64, width=64, block_frames=3, shift=3.0, sink_frames=1, window_frames=2,
                         switch_recache=False, switch_cut=True),
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def build_transformer(name: str, seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A randomly initialised transformer of a preset's size; `overrides` replace config entries."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(**preset(name)["transformer"] | overrides)


def build_autoencoder(name: str, seed: int = 0) -> VideoAutoencoder:
    torch.manual_seed(seed)
    return VideoAutoencoder(AutoencoderKLWan(**preset(name)["vae"]))


def build_pipeline(name: str, seed: int = 0, text_encoder: TextEncoder | None = None, with_teacher: bool = True) -> CausVidPipeline:
    """A randomly initialised pipeline of a preset's size (the teacher starts as the student's copy)."""
    config = PipelineConfig(**preset(name)["pipeline"])
    student = WanDenoiser(build_transformer(name, seed), config.block_frames)
    teacher = WanDenoiser(build_transformer(name, seed), config.block_frames) if with_teacher else None
    text_encoder = text_encoder or load_text_encoder(config.text_encoder)
    return CausVidPipeline(student, build_autoencoder(name, seed), text_encoder, config, teacher).to("cpu", torch.float32)
