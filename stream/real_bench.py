"""`causvid bench real`: the streaming loop at Wan2.1-T2V-1.3B's size, on random weights.

The real transformer and VAE configs at 480×832 (random weights: speed does not depend on them),
random text embeddings at UMT5's width (the text encoder runs once per prompt), Self-Forcing's
sampling settings (4 warped steps, blocks of 3 latent frames, a cache of 18 frames plus the
block). Each block is denoised, decoded latent frame by latent frame, JPEG-encoded, then
committed to the KV cache, as the server does. One JSON record: end-to-end FPS, time to the
first frame, a per-block breakdown, peak memory, for each variant asked for (bf16 with SDPA's
default kernels; the flash kernel; torch.compile). `--preset tiny` runs the same code on a CPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from causvid.errors import UserError
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.presets import UMT5_TOKENS, WAN_1_3B_TRANSFORMER, WAN_SIZE, WAN_VAE
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas
from stream.protocol import encode_jpeg

PRESETS = {
    "wan-1.3b": dict(transformer=WAN_1_3B_TRANSFORMER, vae=WAN_VAE, height=WAN_SIZE[0], width=WAN_SIZE[1],
                     text=(UMT5_TOKENS, WAN_1_3B_TRANSFORMER["text_dim"])),
    "tiny": dict(transformer=dict(WAN_1_3B_TRANSFORMER, num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
                 vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                          temperal_downsample=[False, True, True]),
                 height=64, width=64, text=(16, 32)),
}
VARIANTS = ("sdpa", "flash", "compile")


def _models(preset: dict, device: torch.device, dtype: torch.dtype) -> tuple[WanDenoiser, VideoAutoencoder]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    with device:
        transformer = WanTransformer3DModel(**preset["transformer"]).to(dtype).eval()
        vae = AutoencoderKLWan(**preset["vae"], latents_mean=[0.0] * preset["vae"]["z_dim"],
                               latents_std=[1.0] * preset["vae"]["z_dim"])
    return WanDenoiser(transformer, block_frames=3), VideoAutoencoder(vae).to(device, dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _stream(denoiser, autoencoder, preset: dict, device: torch.device, blocks: int, kernel) -> dict:
    dtype = next(denoiser.parameters()).dtype
    text = torch.randn(1, *preset["text"], generator=torch.Generator().manual_seed(0)).to(device, dtype)
    spatial = autoencoder.spatial_factor
    shape = (autoencoder.vae.config.z_dim, preset["height"] // spatial, preset["width"] // spatial)
    rollout = CausalRollout(denoiser, student_sigmas([1000, 750, 500, 250], 5.0), shape, sink_frames=0, window_frames=18,
                            rng=torch.Generator(device).manual_seed(0), device=device)
    decoder = autoencoder.new_decoder_stream()
    times = {"denoise_s": [], "decode_s": [], "jpeg_s": [], "commit_s": []}
    frames, first_frame_s = 0, None
    _sync(device)
    start = time.perf_counter()
    with kernel():
        for _ in range(blocks):
            tick = time.perf_counter()
            latents = rollout.denoise_block(text)
            _sync(device)
            times["denoise_s"].append(time.perf_counter() - tick)
            decode = jpeg = 0.0
            pieces = autoencoder.iter_decode_frames(decoder, latents)
            while True:
                tick = time.perf_counter()
                decoded = next(pieces, None)  # decodes the next latent frame
                _sync(device)
                decode += time.perf_counter() - tick
                if decoded is None:
                    break
                tick = time.perf_counter()
                for frame in decoded:
                    encode_jpeg(frame)
                jpeg += time.perf_counter() - tick
                frames += len(decoded)
                if first_frame_s is None:
                    first_frame_s = time.perf_counter() - start
            times["decode_s"].append(decode)
            times["jpeg_s"].append(jpeg)
            tick = time.perf_counter()
            rollout.commit(latents, text)
            _sync(device)
            times["commit_s"].append(time.perf_counter() - tick)
    total = time.perf_counter() - start
    return {"frames": frames, "blocks": blocks, "fps": frames / total, "first_frame_s": first_frame_s,
            "per_block_s": {name: statistics.mean(values) for name, values in times.items()},
            "steady_fps": 0.0 if blocks < 2 else _steady_fps(times, frames, blocks)}


def _steady_fps(times: dict, frames: int, blocks: int) -> float:
    """Frames per second after the first block (which has the smallest cache and no warm-up)."""
    later = sum(sum(values[1:]) for values in times.values())
    return (frames - frames // blocks) / later if later else 0.0


def run_real_bench(preset_name: str = "wan-1.3b", device: str | None = None, blocks: int = 8,
                   variants: tuple[str, ...] = ("sdpa",)) -> dict:
    """One JSON-able record: each variant's stream numbers on the same random-weight models."""
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r} (choose from {', '.join(PRESETS)})")
    if unknown := set(variants) - set(VARIANTS):
        raise UserError(f"unknown variants {sorted(unknown)} (choose from {', '.join(VARIANTS)})")
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1, got {blocks}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' is not available: this torch build sees no CUDA GPU; use cpu")
    dtype = torch.bfloat16
    preset = PRESETS[preset_name]
    denoiser, autoencoder = _models(preset, device, dtype)
    record = {"bench": "real", "preset": preset_name, "device": str(device), "dtype": str(dtype),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "height": preset["height"], "width": preset["width"], "student_steps": 4, "block_frames": 3,
              "cache_frames": 18, "variants": {}}
    for variant in variants:
        kernel = contextlib.nullcontext
        if variant == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
        model = torch.compile(denoiser) if variant == "compile" else denoiser
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            _stream(model, autoencoder, preset, device, min(2, blocks), kernel)  # warm-up: kernels, compile
            result = _stream(model, autoencoder, preset, device, blocks, kernel)
        except RuntimeError as error:  # e.g. no flash kernel for this GPU or dtype: recorded, not fatal
            result = {"error": " ".join(str(error).split())[:300]}
        if device.type == "cuda":
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        record["variants"][variant] = result
    return record
