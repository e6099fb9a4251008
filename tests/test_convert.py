"""`causvid convert` from the formats people download: original Wan2.1 transformer weights and the
released CausVid and Self-Forcing students, with every key accounted for."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from causvid.cli import main
from causvid.convert import rename_wan_transformer, wan_transformer
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
