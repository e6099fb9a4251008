"""`causvid convert` from the formats people download: original Wan2.1 transformer and VAE weights
and the released CausVid and Self-Forcing students, with every key accounted for."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

from causvid.cli import main
from causvid.convert import rename_wan_transformer, rename_wan_vae, wan_transformer, wan_vae
from causvid.errors import UserError
from causvid.pipeline import load_pipeline

# diffusers configs of the released Wan2.1 text-to-video transformers (their config.json files).
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = WAN_1_3B | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)


def original_wan_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of Wan2.1's own checkpoint (its wan/modules/model.py), written from
    that naming scheme and not from the converter's table."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    t, h, w = config["patch_size"]
    linear = lambda name, out, inp: {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}  # noqa: E731
    shapes = {"patch_embedding.weight": (dim, config["in_channels"], t, h, w), "patch_embedding.bias": (dim,),
              **linear("text_embedding.0", dim, config["text_dim"]), **linear("text_embedding.2", dim, dim),
              **linear("time_embedding.0", dim, config["freq_dim"]), **linear("time_embedding.2", dim, dim),
              **linear("time_projection.1", 6 * dim, dim), **linear("head.head", config["out_channels"] * t * h * w, dim),
              "head.modulation": (1, 2, dim)}
    for n in range(config["num_layers"]):
        block = f"blocks.{n}"
        shapes[f"{block}.modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes.update(linear(f"{block}.{attn}.{proj}", dim, dim))
            shapes[f"{block}.{attn}.norm_q.weight"] = shapes[f"{block}.{attn}.norm_k.weight"] = (dim,)
        shapes[f"{block}.norm3.weight"] = shapes[f"{block}.norm3.bias"] = (dim,)  # the cross-attention's norm
        shapes.update(linear(f"{block}.ffn.0", config["ffn_dim"], dim))
        shapes.update(linear(f"{block}.ffn.2", dim, config["ffn_dim"]))
    return shapes


@pytest.mark.parametrize("config", [WAN_1_3B, WAN_14B], ids=["1.3B", "14B"])
def test_the_real_checkpoints_fill_the_model_exactly(config):
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    source = {k: torch.empty(s, device="meta") for k, s in original_wan_shapes(config).items()}
    renamed = rename_wan_transformer(source, expected)
    assert set(renamed) == set(expected) and len(source) == len(expected)
    assert all(renamed[k].shape == expected[k] for k in expected)


def test_unknown_missing_and_misshapen_keys_are_named():
    config = dict(WAN_1_3B, num_layers=1)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WanTransformer3DModel(**config).state_dict().items()}
    source = {k: torch.empty(s, device="meta") for k, s in original_wan_shapes(config).items()}
    with pytest.raises(UserError, match=r"no place in the model: blocks\.0\.extra\.weight"):
        rename_wan_transformer(source | {"blocks.0.extra.weight": torch.empty(1, device="meta")}, expected)
    with pytest.raises(UserError, match=r"model keys the source lacks: blocks\.0\.norm2\.bias"):
        rename_wan_transformer({k: v for k, v in source.items() if k != "blocks.0.norm3.bias"}, expected)
    source["blocks.0.ffn.0.weight"] = torch.empty(3, 3, device="meta")
    with pytest.raises(UserError, match=r"blocks\.0\.ffn\.net\.0\.proj\.weight \(3, 3\)"):
        rename_wan_transformer(source, expected)


TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, rope_max_seq_len=64)


def _random_original(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(s, generator=rng) for k, s in original_wan_shapes(config).items()}


def _reference_block(w: dict, n: int, x, context, e, heads: int) -> torch.Tensor:
    """One block of the original layout, from the Wan2.1 report's description, with RoPE at angle 0:
    modulation + time embedding give shift, scale, gate for self-attention, then for the FFN;
    self-attention on norm1, cross-attention on the affine norm3, the FFN on norm2."""
    p = lambda name: w[f"blocks.{n}.{name}"]  # noqa: E731
    dim = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = (p("modulation") + e).chunk(6, dim=1)

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def attention(kind, query, keys):
        q = rms(F.linear(query, p(f"{kind}.q.weight"), p(f"{kind}.q.bias")), p(f"{kind}.norm_q.weight"))
        k = rms(F.linear(keys, p(f"{kind}.k.weight"), p(f"{kind}.k.bias")), p(f"{kind}.norm_k.weight"))
        v = F.linear(keys, p(f"{kind}.v.weight"), p(f"{kind}.v.bias"))
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads)
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
        return F.linear(out, p(f"{kind}.o.weight"), p(f"{kind}.o.bias"))

    norm = lambda v: F.layer_norm(v, (dim,), eps=1e-6)  # noqa: E731
    x = x + attention("self_attn", norm(x) * (1 + scale1) + shift1, norm(x) * (1 + scale1) + shift1) * gate1
    x = x + attention("cross_attn", F.layer_norm(x, (dim,), p("norm3.weight"), p("norm3.bias"), 1e-6), context)
    hidden = F.gelu(F.linear(norm(x) * (1 + scale2) + shift2, p("ffn.0.weight"), p("ffn.0.bias")), approximate="tanh")
    return x + F.linear(hidden, p("ffn.2.weight"), p("ffn.2.bias")) * gate2


def test_a_converted_block_computes_what_the_original_layout_describes():
    """Independent of the converter's table: the reference reads the original names by their role in
    the block, so two same-shaped tensors swapped by the mapping (q and k, self- and cross-attention,
    the norms) change the output."""
    original = _random_original(TINY)
    model = wan_transformer(original, TINY).float().eval()
    rng = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 8, 32, generator=rng), torch.randn(2, 5, 32, generator=rng)
    e = torch.randn(2, 6, 32, generator=rng)
    rotary = (torch.ones(1, 8, 1, 16), torch.zeros(1, 8, 1, 16))  # angle 0: RoPE is the identity
    for n in range(TINY["num_layers"]):
        block = model.blocks[n]
        # The block's cross-attention reads text already embedded to the model width.
        ours = block(x, context, e, rotary)
        torch.testing.assert_close(ours, _reference_block(original, n, x, context, e, heads=2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind, layout", [("self-forcing", "ema"), ("self-forcing", "plain"), ("causvid", "plain"),
                                          ("causvid", "unprefixed"), ("wan", "safetensors")])
def test_released_checkpoints_convert_load_generate_and_stream(kind, layout, wan_dir, tmp_path):
    config = json.loads((wan_dir / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    original = _random_original(config, seed=5)
    if layout == "safetensors":
        source = tmp_path / "wan.safetensors"
        save_file(original, source)
    else:
        prefixed = {("" if layout == "unprefixed" else "model.") + k: v for k, v in original.items()}
        checkpoint = {"generator": prefixed} | ({"generator_ema": {k: v + 1 for k, v in prefixed.items()}} if layout == "ema" else {})
        source = tmp_path / "model.pt"
        torch.save(checkpoint, source)
    out = tmp_path / "converted"
    assert main(["convert", str(source), str(out), "--from", kind, "--base", str(wan_dir), "--dtype", "fp32"]) == 0
    pipe = load_pipeline(out, "cpu", torch.float32, height=32, width=32)
    expected = wan_transformer({k: v + (1 if layout == "ema" else 0) for k, v in original.items()}, config)
    assert all(torch.equal(pipe.denoiser.transformer.state_dict()[k], v) for k, v in expected.state_dict().items())
    if kind == "self-forcing":
        assert pipe.config.student_timesteps == [1000, 750, 500, 250] and pipe.config.warp_timesteps
        assert (pipe.config.shift, pipe.config.sink_frames, pipe.config.window_frames) == (5.0, 0, 18)
    frames = pipe.generate("a red circle moving right", num_frames=13)
    assert frames.shape == (13, 32, 32, 3)
    if layout == "ema":
        _stream_through_the_server(pipe)


def _stream_through_the_server(pipe) -> None:
    from PIL import Image
    from websockets.sync.client import connect

    from stream.protocol import unpack_frame
    from stream.server import ServerConfig, ServerThread

    with ServerThread(pipe, ServerConfig(port=0)) as running, connect(running.server.ws_url) as ws:
        json.loads(ws.recv())  # hello
        ws.send(json.dumps({"type": "start", "prompt": "a red circle", "pacing": "fast", "max_frames": 5}))
        frames = []
        while len(frames) < 5:
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                frames.append(unpack_frame(message))
    assert [header.index for header, _ in frames] == list(range(5))
    assert all(np.asarray(Image.open(io.BytesIO(jpeg))).shape == (32, 32, 3) for _, jpeg in frames)


def test_a_converter_needs_a_base_and_a_real_checkpoint(wan_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a pickle")
    assert main(["convert", str(bad), str(tmp_path / "out"), "--from", "self-forcing"]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert main(["convert", str(bad), str(tmp_path / "out"), "--from", "self-forcing", "--base", str(wan_dir)]) == 2
    assert "cannot read as a torch checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert main(["convert", str(tmp_path / "other.pt"), str(tmp_path / "out"), "--from", "causvid", "--base", str(wan_dir)]) == 2
    assert "not a 'generator'" in capsys.readouterr().err

# Wan2.1's VAE (wan/modules/vae.py, `_video_vae`): these are also AutoencoderKLWan's defaults.
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True])


def original_wan_vae_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of Wan's own VAE checkpoint, written from the module layout of its
    wan/modules/vae.py (Encoder3d, Decoder3d, ResidualBlock, AttentionBlock, Resample), not from
    the converter's table."""
    dim, z, mult, blocks = config["base_dim"], config["z_dim"], config["dim_mult"], config["num_res_blocks"]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out, inp, *kernel):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, *kernel), (out,)

    def residual(name, inp, out):  # Sequential(RMS_norm, SiLU, conv, RMS_norm, SiLU, Dropout, conv)
        shapes[f"{name}.residual.0.gamma"] = (inp, 1, 1, 1)
        conv(f"{name}.residual.2", out, inp, 3, 3, 3)
        shapes[f"{name}.residual.3.gamma"] = (out, 1, 1, 1)
        conv(f"{name}.residual.6", out, out, 3, 3, 3)
        if inp != out:
            conv(f"{name}.shortcut", out, inp, 1, 1, 1)

    def middle(name, width):
        residual(f"{name}.0", width, width)
        shapes[f"{name}.1.norm.gamma"] = (width, 1, 1)
        conv(f"{name}.1.to_qkv", 3 * width, width, 1, 1)
        conv(f"{name}.1.proj", width, width, 1, 1)
        residual(f"{name}.2", width, width)

    dims = [dim * u for u in [1, *mult]]
    conv("encoder.conv1", dims[0], 3, 3, 3, 3)
    layer = 0
    for i, (inp, out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(blocks):
            residual(f"encoder.downsamples.{layer}", inp, out)
            inp, layer = out, layer + 1
        if i != len(mult) - 1:
            conv(f"encoder.downsamples.{layer}.resample.1", out, out, 3, 3)
            if config["temperal_downsample"][i]:
                conv(f"encoder.downsamples.{layer}.time_conv", out, out, 3, 1, 1)
            layer += 1
    middle("encoder.middle", dims[-1])
    shapes["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z, dims[-1], 3, 3, 3)
    conv("conv1", 2 * z, 2 * z, 1, 1, 1)
    conv("conv2", z, z, 1, 1, 1)

    dims = [dim * u for u in [mult[-1], *mult[::-1]]]
    upsample_in_time = config["temperal_downsample"][::-1]
    conv("decoder.conv1", dims[0], z, 3, 3, 3)
    middle("decoder.middle", dims[0])
    layer = 0
    for i, (inp, out) in enumerate(zip(dims[:-1], dims[1:])):
        inp = inp // 2 if i > 0 else inp  # a resample halves the channels it hands on
        for _ in range(blocks + 1):
            residual(f"decoder.upsamples.{layer}", inp, out)
            inp, layer = out, layer + 1
        if i != len(mult) - 1:
            conv(f"decoder.upsamples.{layer}.resample.1", out // 2, out, 3, 3)
            if upsample_in_time[i]:
                conv(f"decoder.upsamples.{layer}.time_conv", 2 * out, out, 3, 1, 1)
            layer += 1
    shapes["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], 3, 3, 3)
    return shapes


def _expected(config: dict) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    return {k: v.shape for k, v in model.state_dict().items()}


TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[True, True])


@pytest.mark.parametrize("config", [WAN_VAE, TINY_VAE], ids=["Wan2.1", "tiny"])
def test_the_original_vae_fills_the_model_exactly(config):
    expected = _expected(config)
    source = {k: torch.empty(s, device="meta") for k, s in original_wan_vae_shapes(config).items()}
    renamed = rename_wan_vae(source, expected, config["num_res_blocks"])
    assert set(renamed) == set(expected) and len(source) == len(expected)


def test_same_shaped_tensors_land_where_wan_names_them():
    # Pairs from diffusers' own conversion table (scripts/convert_wan_to_diffusers.py) for Wan2.1's
    # VAE, written out by hand: a residual block's two convolutions and two norms have one shape,
    # so a swap would load without complaint.
    pairs = {
        "encoder.middle.0.residual.2.weight": "encoder.mid_block.resnets.0.conv1.weight",
        "encoder.middle.0.residual.6.weight": "encoder.mid_block.resnets.0.conv2.weight",
        "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
        "decoder.middle.1.to_qkv.weight": "decoder.mid_block.attentions.0.to_qkv.weight",
        "encoder.downsamples.4.residual.0.gamma": "encoder.down_blocks.4.norm1.gamma",
        "encoder.downsamples.2.resample.1.weight": "encoder.down_blocks.2.resample.1.weight",
        "decoder.upsamples.5.residual.6.weight": "decoder.up_blocks.1.resnets.1.conv2.weight",
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.upsamples.7.time_conv.weight": "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
        "decoder.upsamples.14.residual.2.bias": "decoder.up_blocks.3.resnets.2.conv1.bias",
        "decoder.head.2.weight": "decoder.conv_out.weight",
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
    }
    shapes = original_wan_vae_shapes(WAN_VAE)
    source = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    renamed = rename_wan_vae(source, _expected(WAN_VAE))
    for old, new in pairs.items():
        assert renamed[new] is source[old], old


def test_unknown_and_missing_vae_keys_are_named():
    expected = _expected(TINY_VAE)
    source = {k: torch.empty(s, device="meta") for k, s in original_wan_vae_shapes(TINY_VAE).items()}
    with pytest.raises(UserError, match="decoder.extra.weight"):
        rename_wan_vae(source | {"decoder.extra.weight": torch.empty(1, device="meta")}, expected, 1)
    with pytest.raises(UserError, match="model keys the source lacks: encoder.mid_block.attentions.0.proj.bias"):
        rename_wan_vae({k: v for k, v in source.items() if k != "encoder.middle.1.proj.bias"}, expected, 1)


def test_a_converted_vae_file_goes_into_the_pipeline(wan_dir, tmp_path):
    # A random original-layout VAE file at the tiny Wan directory's size: converted, it replaces the
    # base's VAE, holds exactly the file's tensors, and the pipeline generates through it.
    config = json.loads((wan_dir / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    original = {k: torch.randn(s) * 0.1 for k, s in original_wan_vae_shapes(config).items()}
    vae_file = tmp_path / "Wan2.1_VAE.pth"
    torch.save(original, vae_file)
    transformer = tmp_path / "wan.safetensors"
    transformer_config = json.loads((wan_dir / "transformer" / "config.json").read_text())
    save_file(_random_original(transformer_config), transformer)
    out = tmp_path / "converted"
    assert main(["convert", str(transformer), str(out), "--from", "wan", "--base", str(wan_dir), "--vae", str(vae_file),
                 "--dtype", "fp32"]) == 0
    converted = AutoencoderKLWan.from_pretrained(out / "vae")
    assert torch.equal(converted.state_dict()["decoder.up_blocks.0.resnets.0.conv1.weight"],
                       original["decoder.upsamples.0.residual.2.weight"])
    pipe = load_pipeline(out, "cpu", torch.float32, height=32, width=32)
    assert pipe.generate("a red circle", 5, steps=1, mode="teacher").shape == (5, 32, 32, 3)
    with pytest.raises(UserError, match="cannot convert the Wan VAE"):
        wan_vae({k: v for k, v in original.items() if not k.startswith("conv1")}, config)
