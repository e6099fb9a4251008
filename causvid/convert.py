"""Weights in the layouts people download, into diffusers' classes.

- Wan2.1's original transformer (`blocks.N.self_attn.q`, `ffn.0`, `modulation`, `head.head`, ...)
  becomes a `WanTransformer3DModel`. Every source key is either mapped or reported, and the
  result must fill the model's exact key set: a silently dropped or leftover tensor is an error.
- Released causal students keep that naming inside a torch pickle: CausVid's holds `generator`,
  Self-Forcing's `generator` and `generator_ema`, with each key prefixed `model.`.
- Wan2.1's original VAE (`Wan2.1_VAE.pth`: `encoder.downsamples.N.residual.2`, `decoder.middle.1`,
  `conv1`, ...) becomes an `AutoencoderKLWan`, checked the same way.

Only this module reads a pickle, with `torch.load(weights_only=True)`; what it writes is safetensors.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from causvid.checkpoint import atomic_directory, atomic_write_json, read_json, save_diffusers_model
from causvid.errors import UserError

# Wan's module names -> diffusers' (the facts of diffusers' scripts/convert_wan_to_diffusers.py).
# Wan applies its norms in the order norm1, norm3, norm2 (norm3 is the cross-attention's, with
# weights); diffusers numbers them in order, so Wan's norm3 is diffusers' norm2 and the reverse.
_TOP = {
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "head.head.": "proj_out.",
    "patch_embedding.": "patch_embedding.",
}
_BLOCK = {
    "self_attn.q.": "attn1.to_q.", "self_attn.k.": "attn1.to_k.", "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.", "self_attn.norm_q.": "attn1.norm_q.", "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.", "cross_attn.k.": "attn2.to_k.", "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.", "cross_attn.norm_q.": "attn2.norm_q.", "cross_attn.norm_k.": "attn2.norm_k.",
    "norm1.": "norm1.", "norm2.": "norm3.", "norm3.": "norm2.",
    "ffn.0.": "ffn.net.0.proj.", "ffn.2.": "ffn.net.2.",
}


def wan_key(key: str) -> str | None:
    """The diffusers name of one original Wan2.1 transformer key, or None if it has none."""
    if key == "head.modulation":
        return "scale_shift_table"
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        prefix, rest = f"blocks.{parts[1]}.", parts[2]
        if rest == "modulation":
            return prefix + "scale_shift_table"
        for old, new in _BLOCK.items():
            if rest.startswith(old):
                return prefix + new + rest[len(old):]
    return None


# The original VAE's layers -> diffusers' (the facts of diffusers' convert_wan_to_diffusers.py,
# convert_vae). A residual block is Sequential(norm, SiLU, conv, norm, SiLU, dropout, conv).
_VAE_LAYERS = {
    "residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.", "head.0.": "norm_out.", "head.2.": "conv_out.",
}
_VAE_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def wan_vae_key(key: str, num_res_blocks: int = 2) -> str | None:
    """The diffusers name of one original Wan2.1 VAE key, or None if it has none.

    The encoder's `downsamples` keep their flat numbering (`down_blocks.N`). The decoder's
    `upsamples` are a flat list of stages, each `num_res_blocks + 1` residual blocks and a resample
    (the last stage has none); diffusers groups them as `up_blocks.S.resnets.J` and
    `up_blocks.S.upsamplers.0`. (Wan2.1's VAE has no attention outside the middle blocks.)
    """
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest[len('conv1.'):]}"
    if rest.startswith("head."):
        return _vae_layer(f"{side}.", rest)
    parts = rest.split(".", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    group, index, layer = parts
    if group == "middle" and index in _VAE_MIDDLE:
        prefix = f"{side}.{_VAE_MIDDLE[index]}"
        return prefix + layer if index == "1" else _vae_layer(prefix, layer)
    if group == "downsamples" and side == "encoder":
        return _vae_layer(f"encoder.down_blocks.{index}.", layer)
    if group == "upsamples" and side == "decoder":
        stage, place = divmod(int(index), num_res_blocks + 2)
        if place <= num_res_blocks:
            return _vae_layer(f"decoder.up_blocks.{stage}.resnets.{place}.", layer)
        return f"decoder.up_blocks.{stage}.upsamplers.0.{layer}"
    return None


def _vae_layer(prefix: str, layer: str) -> str:
    """A residual block's or head's layer renamed; a resample's (`resample.1`, `time_conv`) kept."""
    for old, new in _VAE_LAYERS.items():
        if layer.startswith(old):
            return prefix + new + layer[len(old):]
    return prefix + layer


def rename_checked(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], rename, what: str
                   ) -> dict[str, torch.Tensor]:
    """Source tensors -> the names `rename` gives them, for a model whose keys and shapes are `expected`.

    Raises naming every key with no counterpart, every model key left unfilled, and every shape
    that differs.
    """
    renamed, unmapped = {}, []
    for key, tensor in state.items():
        new = rename(key)
        if new is None or new not in expected:
            unmapped.append(key)
        else:
            renamed[new] = tensor
    problems = []
    if unmapped:
        problems.append(f"source keys with no place in the model: {', '.join(sorted(unmapped)[:8])}"
                        + (f" (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else ""))
    if missing := sorted(set(expected) - set(renamed)):
        problems.append(f"model keys the source lacks: {', '.join(missing[:8])}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in renamed.items() if v.shape != expected[k]]
    if shapes:
        problems.append(f"shapes that differ (source vs model): {'; '.join(shapes[:4])}")
    if problems:
        raise UserError(f"cannot convert the {what}: " + "; ".join(problems))
    return renamed


def rename_wan_transformer(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Wan-named transformer tensors -> diffusers-named ones (`rename_checked`)."""
    return rename_checked(state, expected, wan_key, "Wan transformer")


def rename_wan_vae(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], num_res_blocks: int = 2
                   ) -> dict[str, torch.Tensor]:
    """Original Wan VAE tensors -> diffusers-named ones (`rename_checked`)."""
    return rename_checked(state, expected, lambda key: wan_vae_key(key, num_res_blocks), "Wan VAE")


def load_foreign(path: str | Path) -> dict:
    """A downloaded checkpoint: safetensors, or a torch pickle read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or non-tensor pickle: name it, no traceback
        raise UserError(f"{path}: cannot read as a torch checkpoint of tensors ({' '.join(str(error).split())[:200]})") from None


def released_generator(checkpoint: dict, ema: bool = True) -> dict[str, torch.Tensor]:
    """The causal generator's Wan-named tensors from a released CausVid or Self-Forcing checkpoint."""
    name = "generator_ema" if ema and "generator_ema" in checkpoint else "generator"
    if name not in checkpoint:
        raise UserError(f"the checkpoint holds {sorted(checkpoint)[:6]}, not a 'generator': is it CausVid's or Self-Forcing's?")
    state = checkpoint[name]
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}


# Sampling settings of the released students, from each project's configs.
STUDENT_SETTINGS = {
    # CausVid configs/wan_causal_dmd.yaml: 3 steps [1000, 757, 522], no warping, blocks of 3, and
    # (as Self-Forcing) global attention over 21 latent frames.
    # Unwarped steps do not go through the shift, so the teacher keeps its own.
    "causvid": dict(student_timesteps=[1000, 757, 522], warp_timesteps=False, block_frames=3, sink_frames=0,
                    window_frames=18),
    # CausVid configs/wan_causal_dmd_warp_4step_cfg2.yaml: 4 warped steps, shift 8.
    "causvid-warp-4step": dict(student_timesteps=[1000, 750, 500, 250], shift=8.0, warp_timesteps=True, block_frames=3,
                               sink_frames=0, window_frames=18),
    # Self-Forcing configs/self_forcing_dmd.yaml: 4 warped steps, shift 5, blocks of 3, trained on
    # 21 latent frames with global attention (no sink): a window of 18 frames plus the block is 21.
    "self-forcing": dict(student_timesteps=[1000, 750, 500, 250], shift=5.0, warp_timesteps=True, block_frames=3,
                         sink_frames=0, window_frames=18),
}

SOURCES = ("wan", *STUDENT_SETTINGS)


def wan_transformer(state: dict[str, torch.Tensor], config: dict):
    """A `WanTransformer3DModel` of `config` holding Wan-named `state` (checked key by key)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict(rename_wan_transformer(state, expected), strict=True, assign=True)
    return model


def wan_vae(state: dict[str, torch.Tensor], config: dict):
    """An `AutoencoderKLWan` of `config` holding the original Wan VAE's `state` (checked key by key)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan.from_config(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict(rename_wan_vae(state, expected, model.config.num_res_blocks), strict=True, assign=True)
    return model


def convert_download(kind: str, source: Path, destination: Path, base: Path, ema: bool = True,
                     dtype: torch.dtype = torch.bfloat16, vae: Path | None = None) -> None:
    """A pipeline directory of safetensors from a downloaded checkpoint.

    `kind` "wan": original Wan2.1 transformer weights, which become student and teacher; or a
    released student ("causvid", "causvid-warp-4step", "self-forcing"), whose teacher is the base
    directory's transformer. `base` is the Wan2.1 diffusers directory that gives the transformer
    config, the VAE and the text encoder (read from there, not copied), and the teacher's sampling
    settings; a released student's own settings replace the student's. `vae` names Wan's original
    VAE file (`Wan2.1_VAE.pth`), converted in place of the base directory's VAE, with its config.
    """
    from causvid.pipeline import model_index, wan_pipeline_config  # here: the pipeline is a heavy import

    if kind not in SOURCES:
        raise UserError(f"unknown source format {kind!r} (expected one of {', '.join(SOURCES)})")
    if read_json(base / "model_index.json").get("_class_name") != "WanPipeline":
        raise UserError(f"{base}: --base must be a Wan2.1 diffusers directory (model_index.json naming WanPipeline)")
    checkpoint = load_foreign(source)
    state = checkpoint if kind == "wan" else released_generator(checkpoint, ema)
    student = wan_transformer(state, read_json(base / "transformer" / "config.json")).to(dtype)
    autoencoder = wan_vae(load_foreign(vae), read_json(base / "vae" / "config.json")) if vae is not None else None
    config = replace(wan_pipeline_config(base.resolve()), **STUDENT_SETTINGS.get(kind, {}))
    with atomic_directory(destination) as tmp:
        save_diffusers_model(student, tmp / "transformer")
        if kind == "wan":
            save_diffusers_model(student, tmp / "teacher")
        else:
            shutil.copytree(base / "transformer", tmp / "teacher")
        if autoencoder is not None:  # fp32: the autoencoder decodes close to fp32 only from fp32 weights
            save_diffusers_model(autoencoder.float(), tmp / "vae")
        else:
            shutil.copytree(base / "vae", tmp / "vae")
        atomic_write_json(tmp / "model_index.json", model_index(config, True, "UMT5TextEncoder"))
