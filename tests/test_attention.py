"""Block-causal mask semantics and KV-cache equivalence of the causal Wan denoiser."""

from __future__ import annotations

import pytest
import torch

from causvid.models.attention import apply_rotary, block_causal_mask
from causvid.rollout import CausalRollout
from causvid.schedule import student_sigmas

C, H, W = 4, 8, 8  # tiny preset latents: 16 tokens per frame
SIGMAS = student_sigmas([1000, 750, 500, 250])


def _rollout(denoiser, text, blocks, seed=1, **kwargs):
    rollout = CausalRollout(denoiser, SIGMAS, (C, H, W), rng=torch.Generator().manual_seed(seed), **kwargs)
    with torch.no_grad():
        return torch.cat([rollout.next_block(text) for _ in range(blocks)], dim=2), rollout


def test_mask_matches_causvid_definition():
    mask = block_causal_mask(num_frames=7, tokens_per_frame=1, block_frames=3)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(mask, (j // 3) <= (i // 3))


def test_windowed_mask_keeps_sinks_and_recent_frames():
    mask = block_causal_mask(num_frames=10, tokens_per_frame=1, block_frames=2, sink_frames=1, window_frames=4)
    # Query frame 8 (block 4, starts at frame 8): sees sink 0, window 4..7, its own block 8..9.
    assert mask[8].nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8, 9]


def test_later_block_cannot_change_earlier_outputs(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    x = torch.randn(1, C, 6, H, W)
    sigma = torch.rand(1, 6)
    changed = x.clone()
    changed[:, :, 4:] = torch.randn(1, C, 2, H, W)  # the last block (frames 4-5)
    with torch.no_grad():
        a = tiny_denoiser(x, sigma, text, causal=True)
        b = tiny_denoiser(changed, sigma, text, causal=True)
        bidirectional_a = tiny_denoiser(x, sigma, text)
        bidirectional_b = tiny_denoiser(changed, sigma, text)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    # Without the mask the same change leaks backwards: the mask is what makes it causal.
    assert not torch.allclose(bidirectional_a[:, :, :4], bidirectional_b[:, :, :4])


def test_per_frame_noise_levels_matter(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    x = torch.randn(1, C, 4, H, W)
    with torch.no_grad():
        low = tiny_denoiser(x, torch.tensor([[0.1, 0.1, 0.9, 0.9]]), text, causal=True)
        high = tiny_denoiser(x, torch.tensor([[0.1, 0.1, 0.2, 0.2]]), text, causal=True)
        uniform = tiny_denoiser(x, torch.tensor([0.1]), text, causal=True)
        per_frame_uniform = tiny_denoiser(x, torch.full((1, 4), 0.1), text, causal=True)
    assert torch.equal(low[:, :, :2], high[:, :, :2])  # causal: later levels don't reach back
    assert not torch.allclose(low[:, :, 2:], high[:, :, 2:])
    torch.testing.assert_close(uniform, per_frame_uniform, atol=1e-5, rtol=0)


def test_kv_cache_equals_full_block_causal_forward(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    cached, rollout = _rollout(tiny_denoiser, text, blocks=4)
    recomputed, _ = _rollout(tiny_denoiser, text, blocks=4, use_kv_cache=False)
    assert (cached - recomputed).abs().max().item() < 1e-4
    assert rollout.cache.cached_frames == 8


def test_rolling_cache_equals_windowed_mask_across_evictions(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    cached, rollout = _rollout(tiny_denoiser, text, blocks=6, window_frames=3)
    recomputed, _ = _rollout(tiny_denoiser, text, blocks=6, window_frames=3, use_kv_cache=False)
    assert rollout.cache.cached_frames == 3  # evicted down to the window
    assert (cached - recomputed).abs().max().item() < 1e-4
    unbounded, _ = _rollout(tiny_denoiser, text, blocks=6)
    assert not torch.allclose(cached[:, :, 6:], unbounded[:, :, 6:])  # the window really cut context


def test_rotated_keys_are_reused_until_the_cache_changes(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    _, rollout = _rollout(tiny_denoiser, text, blocks=2, window_frames=3)
    cache = rollout.cache
    rotation = tiny_denoiser.transformer.rope.at(torch.arange(cache.cached_frames), H // 2, W // 2)
    first = cache.rotated_keys(0, rotation)
    assert cache.rotated_keys(0, rotation) is first  # a block's later steps reuse the rotation
    with torch.no_grad():
        rollout.next_block(text)  # appends a block and evicts one
    fresh = cache.rotated_keys(0, rotation)
    assert fresh is not first
    torch.testing.assert_close(fresh, apply_rotary(cache.keys[0], rotation))


def test_sink_frames_stay_visible_after_eviction(tiny_denoiser):
    text = torch.randn(1, 32, 384)
    kwargs = dict(sink_frames=1, window_frames=2)
    base, rollout = _rollout(tiny_denoiser, text, blocks=5, **kwargs)
    assert rollout.cache.cached_frames == 3
    # Before anything is evicted the rolling cache is exactly the windowed mask.
    recomputed, _ = _rollout(tiny_denoiser, text, blocks=2, use_kv_cache=False, **kwargs)
    assert (base[:, :, :4] - recomputed).abs().max().item() < 1e-4

    def last_block_after(prefix: torch.Tensor) -> torch.Tensor:
        r = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W), rng=torch.Generator().manual_seed(9), **kwargs)
        with torch.no_grad():
            for b in range(4):
                r.commit(prefix[:, :, 2 * b : 2 * b + 2], text)
            return r.next_block(text)

    reference = last_block_after(base[:, :, :8])
    sink_changed = base[:, :, :8].clone()
    sink_changed[:, :, 0] += 1.0
    assert not torch.allclose(last_block_after(sink_changed), reference)

    # The rolling cache holds exactly frames [0, 6, 7] of what an unbounded cache holds.
    unbounded = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W))
    with torch.no_grad():
        for b in range(4):
            unbounded.commit(base[:, :, 2 * b : 2 * b + 2], text)
    rolling = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W), **kwargs)
    with torch.no_grad():
        for b in range(4):
            rolling.commit(base[:, :, 2 * b : 2 * b + 2], text)
    tokens = 16
    kept = torch.cat([torch.arange(0, tokens), torch.arange(6 * tokens, 8 * tokens)])
    # Layer 0's K/V depend only on frames' own inputs, so they match the unbounded cache exactly.
    assert torch.equal(rolling.cache.keys[0], unbounded.cache.keys[0][:, kept])


def test_long_stream_never_leaves_the_rope_table(text_encoder):
    from causvid.models.denoiser import WanDenoiser
    from diffusers import WanTransformer3DModel
    from causvid.presets import preset

    config = preset("tiny")["transformer"] | {"rope_max_seq_len": 8}
    denoiser = WanDenoiser(WanTransformer3DModel(**config), block_frames=2).eval()
    text = torch.randn(1, 32, 384)
    _, rollout = _rollout(denoiser, text, blocks=12, sink_frames=1, window_frames=4)  # 24 frames > 8
    assert rollout.frames_done == 24 and rollout.cache.cached_frames == 5
    with pytest.raises(ValueError, match="RoPE table"):
        _rollout(denoiser, text, blocks=6)  # without a rolling window the positions run out
    with pytest.raises(ValueError, match="RoPE table"):
        denoiser.new_cache(H, W, sink_frames=2, window_frames=8)


def test_prompt_switch_resets_cross_attention_cache(tiny_denoiser, text_encoder):
    red, blue = text_encoder.encode(["a red circle"]), text_encoder.encode(["a blue square"])
    rollout = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W), rng=torch.Generator().manual_seed(0))
    noise = rollout.noise(2)
    with torch.no_grad():
        rollout.next_block(red)
        cache = rollout.cache
        switched = tiny_denoiser(noise, torch.tensor([1.0]), blue, cache=cache)
        stale_key = cache.cross[0][0].clone()
        # A fresh cache holding the same frames, conditioned on blue from the start.
        fresh = tiny_denoiser.new_cache(H, W)
        fresh.keys, fresh.values = list(cache.keys), list(cache.values)
        expected = tiny_denoiser(noise, torch.tensor([1.0]), blue, cache=fresh)
        old_prompt = tiny_denoiser(noise, torch.tensor([1.0]), red, cache=cache)
    torch.testing.assert_close(switched, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(old_prompt, switched)
    assert not torch.equal(stale_key, cache.cross[0][0])


def test_kv_recache_equals_a_fresh_recompute_under_the_new_prompt(tiny_denoiser, text_encoder):
    red, blue = text_encoder.encode(["a red circle"]), text_encoder.encode(["a blue square"])
    _, cached = _rollout(tiny_denoiser, red, blocks=3)
    noise = cached.noise(2)
    sigma = torch.tensor([0.75])
    with torch.no_grad():
        stale = tiny_denoiser(noise, sigma, blue, cache=cached.cache)  # cross-attention reset only
        cached.recache(blue)
        recached = tiny_denoiser(noise, sigma, blue, cache=cached.cache)
        # The uncached path recomputes every frame under the prompt it is given, every step.
        fresh = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W), use_kv_cache=False)
        for start in range(0, 6, 2):
            fresh.commit(cached.history[:, :, start : start + 2], blue)
        expected = fresh.velocity_fn(blue)(noise, sigma)
    torch.testing.assert_close(recached, expected, atol=1e-5, rtol=1e-5)
    assert (stale - expected).abs().max() > 100 * (recached - expected).abs().max()


def test_kv_recache_under_the_same_prompt_rebuilds_the_same_cache(tiny_denoiser, text_encoder):
    red = text_encoder.encode(["a red circle"])
    _, rollout = _rollout(tiny_denoiser, red, blocks=3)
    before = [k.clone() for k in rollout.cache.keys]
    rollout.recache(red)
    for old, new in zip(before, rollout.cache.keys):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=0)


def test_kv_recache_of_a_rolling_cache_keeps_its_frames_and_rebuilds_from_them(tiny_denoiser, text_encoder):
    red, blue = text_encoder.encode(["a red circle"]), text_encoder.encode(["a blue square"])
    frames, rollout = _rollout(tiny_denoiser, red, blocks=6, sink_frames=1, window_frames=4)
    # The held latents are the frames the cache keeps: the sink and the latest window.
    assert torch.equal(rollout.history, frames[:, :, [0, 8, 9, 10, 11]])
    rollout.recache(blue)
    assert rollout.cache.cached_frames == 5 and rollout.frames_done == 12
    # Rebuilt as the sink alone, then the window's two blocks: what a stream of those frames holds.
    rebuilt = CausalRollout(tiny_denoiser, SIGMAS, (C, H, W), sink_frames=1, window_frames=4)
    with torch.no_grad():
        for start, end in ((0, 1), (1, 3), (3, 5)):
            rebuilt.commit(rollout.history[:, :, start:end], blue)
    for layer in range(len(rollout.cache.keys)):
        assert torch.equal(rollout.cache.keys[layer], rebuilt.cache.keys[layer])
        assert torch.equal(rollout.cache.values[layer], rebuilt.cache.values[layer])
    with torch.no_grad():
        rollout.next_block(blue)  # and the stream goes on from it
    assert rollout.cache.cached_frames == 5 and rollout.frames_done == 14
