"""Memory per GPU of DMD distillation at Wan2.1-T2V-1.3B's size, sharded over N GPUs.

Two parts, one JSON record (`causvid distill memory`):
- model states, from parameter counts of the real configs built on the meta device and what
  the loop keeps per parameter: student and critic sharded (fp32 weights, gradients and Adam
  moments; the student's EMA too), the frozen teacher and UMT5 text encoder whole on every GPU
  in bf16, and the gathered bf16 weights and fp32 gradients of the blocks in flight;
- activations, measured: one DMD step of the training code itself (the self-forcing rollout
  with its KV cache, the critic's and the student's losses, both backward passes) runs on the
  meta device at full size with gradient checkpointing, while a dispatch mode adds up the
  bytes of every tensor the step creates and frees. Attention runs SDPA's flash kernel, as on
  a GPU; parameter gradients are dropped once accumulated, as sharding frees them after the
  reduce-scatter. Allocator slack and kernel workspaces are not counted.
"""

from __future__ import annotations

import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from causvid.models.denoiser import WanDenoiser
from causvid.presets import UMT5_TOKENS, UMT5_XXL, WAN_1_3B_TRANSFORMER, WAN_SIZE, WAN_VAE
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas
from distill.dmd import DMD
from distill.self_forcing import self_forcing_rollout


GIB = 2**30
# Bytes the loop keeps per parameter: fp32 weights, gradients and two Adam moments; EMA in fp32.
TRAINED_BYTES, EMA_BYTES, FROZEN_BYTES = 16, 4, 2
# Self-Forcing's settings (its configs/self_forcing_dmd.yaml): 21 latent frames judged, blocks of 3,
# a 4-step student, one video per GPU, a total batch of 64, a global KV cache, CFG 3.
WINDOW_FRAMES, BLOCK_FRAMES, STUDENT_TIMESTEPS, TOTAL_BATCH, GUIDANCE = 21, 3, [1000, 750, 500, 250], 64, 3.0


class LiveBytes(TorchDispatchMode):
    """The bytes held by tensors created inside the mode: now (`live`) and at most (`peak`).

    An op's output counts once per storage it creates; views and in-place results share their
    input's storage and do not count. A storage's bytes are released when it is freed.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: weakref.WeakSet = weakref.WeakSet()

    def _release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage._cdata in inputs or storage in self._counted:
                continue
            self._counted.add(storage)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, storage.nbytes())
        return out


def _flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None or is_causal:
        raise ValueError("the measured step should attend without masks (KV-cached and bidirectional forwards)")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)[0]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_dmd_step(transformer_config: dict, latent_shape: tuple[int, int, int], text_tokens: int = UMT5_TOKENS,
                     window_frames: int = WINDOW_FRAMES, block_frames: int = BLOCK_FRAMES) -> dict:
    """GiB held by one DMD step's tensors at its stages and at peak, on the meta device (no memory used)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        student, critic, teacher = (WanDenoiser(WanTransformer3DModel(**transformer_config), block_frames)
                                    .to(torch.bfloat16) for _ in range(3))
    teacher.requires_grad_(False)
    for trained in (student, critic):
        trained.enable_gradient_checkpointing()
        for p in trained.parameters():  # freed after accumulation, as the reduce-scatter frees them
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    text_shape = (1, text_tokens, transformer_config["text_dim"])
    text, null_text = (torch.empty(text_shape, device="meta", dtype=torch.bfloat16) for _ in range(2))
    stages = {}
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", _flash_attention), LiveBytes() as live:
        rollout = CausalRollout(student, student_sigmas(STUDENT_TIMESTEPS), latent_shape, device="meta")
        x = self_forcing_rollout(rollout, student, text, window_frames, torch.Generator())
        stages["rollout (KV cache, student graph)"] = live.live / GIB
        dmd = DMD(teacher, GUIDANCE)
        critic_loss, _ = dmd.critic_loss(x, critic, text, torch.Generator())
        stages["+ critic loss (its graph)"] = live.live / GIB
        student_loss, _ = dmd.student_loss(x, critic, text, null_text, torch.Generator())
        stages["+ student loss"] = live.live / GIB
        critic_loss.backward()
        student_loss.backward()
    return {"stages_gib": stages, "peak_gib": live.peak / GIB}


def dmd_memory(gpus: list[int], height: int = WAN_SIZE[0], width: int = WAN_SIZE[1]) -> dict:
    """The record: parameter counts, measured activations and the per-GPU total for each GPU count."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN_1_3B_TRANSFORMER)
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
        vae = AutoencoderKLWan(**WAN_VAE)
    params = parameter_count(transformer)
    block = max(parameter_count(m) for m in transformer.modules() if isinstance(m, WanTransformerBlock))
    latent_shape = (WAN_1_3B_TRANSFORMER["in_channels"], height // 8, width // 8)  # Wan's VAE: 8x spatially
    activations = measure_dmd_step(WAN_1_3B_TRANSFORMER, latent_shape)
    per_gpu = {}
    for n in gpus:
        terms = {
            "student (sharded: weights, grads, Adam, EMA)": params * (TRAINED_BYTES + EMA_BYTES) / n / GIB,
            "critic (sharded: weights, grads, Adam)": params * TRAINED_BYTES / n / GIB,
            "teacher (bf16, whole)": params * FROZEN_BYTES / GIB,
            "text encoder (bf16, whole)": parameter_count(text_encoder) * FROZEN_BYTES / GIB,
            "blocks in flight (2 gathered in bf16, 1 gradient in fp32)": block * (2 * 2 + 4) / GIB,
            "activations and KV cache (measured peak)": activations["peak_gib"],
        }
        per_gpu[str(n)] = {"terms_gib": terms, "total_gib": sum(terms.values()),
                           "grad_accumulation": max(1, TOTAL_BATCH // n)}
    return {
        "model": "Wan2.1-T2V-1.3B", "height": height, "width": width, "latent_shape": list(latent_shape),
        "window_latent_frames": WINDOW_FRAMES, "block_frames": BLOCK_FRAMES, "batch_per_gpu": 1,
        "total_batch": TOTAL_BATCH,
        "parameters": {"transformer": params, "transformer_block": block,
                       "text_encoder": parameter_count(text_encoder), "vae": parameter_count(vae)},
        "activations": activations,
        "per_gpu": per_gpu,
        "not_counted": "allocator slack, kernel workspaces, CUDA context (~0.5-1 GiB); the VAE stays on the CPU",
    }
