"""Streaming encode/decode of the Wan autoencoder equals whole-clip encode/decode."""

from __future__ import annotations

import copy

import pytest
import torch

from causvid.models.autoencoder import num_latent_frames, num_pixel_frames
from causvid.presets import build_autoencoder


@pytest.fixture(scope="module")
def autoencoder():
    return build_autoencoder("tiny").eval()


def test_frame_arithmetic():
    assert [num_latent_frames(t) for t in (1, 5, 33)] == [1, 2, 9]
    assert [num_pixel_frames(f) for f in (0, 1, 2, 9)] == [0, 1, 5, 33]
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        num_latent_frames(8)


@torch.no_grad()
def test_streaming_decode_equals_whole_decode(autoencoder):
    latents = torch.randn(1, 4, 7, 8, 8)
    whole = autoencoder.decode(latents)
    assert whole.shape == (1, 3, 25, 32, 32)
    stream = autoencoder.new_decoder_stream()
    parts = [autoencoder.decode_stream(stream, latents[:, :, i : i + 3]) for i in (0, 3)]
    parts.append(autoencoder.decode_stream(stream, latents[:, :, 6:]))
    assert [p.shape[2] for p in parts] == [9, 12, 4]
    assert torch.equal(torch.cat(parts, dim=2), whole)


@torch.no_grad()
def test_bf16_inference_stays_close_to_fp32(autoencoder):
    """Pipelines run the autoencoder in their dtype (bf16 on CPUs that have it) for speed."""
    bf16 = copy.deepcopy(autoencoder).to(torch.bfloat16)
    latents = torch.randn(1, 4, 3, 8, 8)
    reference = autoencoder.decode_stream(autoencoder.new_decoder_stream(), latents)
    decoded = bf16.decode_stream(bf16.new_decoder_stream(), latents)
    assert decoded.dtype == torch.float32  # pixels come back in fp32 whatever the compute dtype
    relative_mse = (decoded - reference).square().mean() / reference.var()
    assert relative_mse < 1e-3
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    torch.testing.assert_close(bf16.encode(video.to(torch.bfloat16)).float(), autoencoder.encode(video), atol=0.1, rtol=0.05)


@torch.no_grad()
def test_channels_last_layout_changes_speed_not_results(autoencoder, tmp_path):
    from causvid.models.autoencoder import VideoAutoencoder

    fast = copy.deepcopy(autoencoder).channels_last()
    convs = [m for m in fast.vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)
    latents = torch.randn(1, 4, 3, 8, 8)
    reference = autoencoder.decode_stream(autoencoder.new_decoder_stream(), latents)
    torch.testing.assert_close(fast.decode_stream(fast.new_decoder_stream(), latents), reference, atol=1e-5, rtol=1e-4)
    fast.save_pretrained(tmp_path)  # safetensors needs contiguous tensors; the weights are unchanged
    reloaded = VideoAutoencoder.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(value, reloaded[name]) for name, value in autoencoder.state_dict().items())


@torch.no_grad()
def test_streaming_encode_equals_whole_encode(autoencoder):
    video = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    whole = autoencoder.encode(video)
    assert whole.shape == (1, 4, 4, 8, 8)
    stream = autoencoder.new_encoder_stream()
    outputs = [autoencoder.encode_stream(stream, video[:, :, i : i + 2]) for i in range(0, 13, 2)]
    assert outputs[0].shape[2] == 1  # frame 0 completes the first latent at once
    assert outputs[1] is None  # frames 1-3 are not yet a full chunk of four
    assert torch.equal(torch.cat([o for o in outputs if o is not None], dim=2), whole)


@torch.no_grad()
def test_two_streams_do_not_share_state(autoencoder):
    a, b = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8)
    sa, sb = autoencoder.new_decoder_stream(), autoencoder.new_decoder_stream()
    out_a = [autoencoder.decode_stream(sa, a[:, :, i : i + 1]) for i in range(2)]
    out_b = [autoencoder.decode_stream(sb, b[:, :, i : i + 1]) for i in range(2)]
    assert torch.equal(torch.cat(out_a, 2), autoencoder.decode(a))
    assert torch.equal(torch.cat(out_b, 2), autoencoder.decode(b))


def test_normalisation_round_trip_uses_config_statistics():
    from causvid.models.autoencoder import VideoAutoencoder
    from diffusers import AutoencoderKLWan
    from causvid.presets import preset

    config = preset("tiny")["vae"] | {"latents_mean": [1.0, 2.0, 3.0, 4.0], "latents_std": [2.0] * 4}
    ae = VideoAutoencoder(AutoencoderKLWan(**config))
    z = torch.randn(1, 4, 2, 3, 3)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    torch.testing.assert_close(ae.normalize(torch.ones(1, 4, 1, 1, 1)).flatten(), torch.tensor([0.0, -0.5, -1.0, -1.5]))
    with pytest.raises(ValueError, match="latents_mean"):
        VideoAutoencoder(AutoencoderKLWan(**(config | {"latents_mean": [0.0] * 3})))


def test_training_forward_with_context_is_the_tail_of_a_stream(autoencoder):
    video = (torch.rand(1, 3, 13, 32, 32) * 2 - 1).requires_grad_(True)
    reconstruction, posterior = autoencoder(video, context_frames=5)
    assert reconstruction.shape[2] == 8 and posterior.mode().shape[2] == 2
    with torch.no_grad():
        whole = autoencoder.decode(autoencoder.encode(video))
    torch.testing.assert_close(reconstruction, whole[:, :, 5:], atol=1e-5, rtol=0)
    reconstruction.sum().backward()
    # Truncated backpropagation: the context warms the caches but gets no gradient.
    assert video.grad[:, :, :5].abs().sum() == 0 and video.grad[:, :, 5:].abs().sum() > 0
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        autoencoder(video, context_frames=4)
    with pytest.raises(ValueError, match="whole chunks"):
        autoencoder(video[:, :, :11], context_frames=5)
