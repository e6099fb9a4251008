"""Gradient checkpointing through causvid's attention: the recomputation in the backward pass sees
the mask, cache and global tokens of the first pass, so gradients are those without it."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from causvid.cli import main
from causvid.models.attention import GlobalTokens
from causvid.models.denoiser import WanDenoiser
from causvid.presets import build_transformer


def _pair() -> tuple[WanDenoiser, WanDenoiser]:
    plain = WanDenoiser(build_transformer("tiny", seed=1), block_frames=2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    return plain, checkpointed


def _grads(model: WanDenoiser, run) -> dict[str, torch.Tensor]:
    model.zero_grad()
    run(model).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


x, text = torch.randn(2, 4, 6, 8, 8), torch.randn(2, 5, 384)
sigma = torch.tensor([0.3, 0.7])


@pytest.mark.parametrize("mode", ["causal", "window", "global_tokens"])
def test_masked_and_guided_forwards(mode):
    kwargs = {"causal": {"causal": True}, "window": {"window": (1, 2)},
              "global_tokens": {"global_tokens": GlobalTokens(torch.randn(2, 3, 32), torch.zeros(2))}}[mode]
    plain, checkpointed = _pair()
    run = lambda model: model(x, sigma, text, **kwargs)  # noqa: E731
    _same(_grads(plain, run), _grads(checkpointed, run))


@pytest.mark.parametrize("window_frames", [2, None])  # a rolling cache that evicts; one that grows
def test_a_cached_block_recomputes_against_the_cache_it_saw(window_frames):
    plain, checkpointed = _pair()
    caches = {}

    def run(model):
        # Two blocks into the cache, a gradient-carrying third block, then another commit: the
        # recomputation must not see (or write) the frames committed after it ran.
        cache = caches[id(model)] = model.new_cache(8, 8, sink_frames=1, window_frames=window_frames)
        with torch.no_grad():
            for block in (x[:, :, :2], x[:, :, 2:4]):
                model(block, torch.zeros(2), text, cache=cache, write_cache=True)
        out = model(x[:, :, 4:], sigma, text, cache=cache)
        with torch.no_grad():
            model(x[:, :, 4:], torch.zeros(2), text, cache=cache, write_cache=True)
        return out

    _same(_grads(plain, run), _grads(checkpointed, run))
    assert caches[id(checkpointed)].cached_frames == caches[id(plain)].cached_frames == (3 if window_frames else 6)


def test_a_growing_caches_snapshot_reads_the_live_tensors_and_refuses_other_changes():
    from causvid.models.attention import KVCache

    cache = KVCache(num_layers=2, tokens_per_frame=4)
    for layer in range(2):
        cache.append(layer, torch.randn(1, 8, 2, 3), torch.randn(1, 8, 2, 3))
    before = [k.clone() for k in cache.keys]
    snapshot = cache.frozen()
    for layer in range(2):
        cache.append(layer, torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3))
    assert snapshot.cached_frames == 2 and cache.cached_frames == 3
    for layer in range(2):
        assert torch.equal(snapshot.keys[layer], before[layer])
        # A view of the live cache, not a second copy of its frames.
        assert snapshot.keys[layer].untyped_storage().data_ptr() == cache.keys[layer].untyped_storage().data_ptr()
    assert KVCache(num_layers=2, tokens_per_frame=4).frozen().keys[0] is None  # empty stays empty
    merged = KVCache.stacked([cache, cache])
    cache.take_row(merged, 0)  # not an append: the snapshot can no longer vouch for its frames
    with pytest.raises(RuntimeError, match="other than by appends"):
        snapshot.keys[0]


def test_training_with_checkpointing_matches_training_without(tmp_path, tiny_checkpoint, monkeypatch):
    enabled = []
    original = WanDenoiser.enable_gradient_checkpointing

    def recording(self):
        enabled.append(self)
        original(self)

    monkeypatch.setattr(WanDenoiser, "enable_gradient_checkpointing", recording)
    runs = {}
    for flag in (False, True):
        enabled.clear()
        config = {"objective": "teacher", "out_dir": str(tmp_path / str(flag)), "max_steps": 2, "batch_size": 2,
                  "lr": {"teacher": 1e-3}, "warmup_steps": 1, "log_every": 1, "sample_every": 100,
                  "gradient_checkpointing": flag,
                  "data": {"type": "shapes", "num_frames": 9, "height": 32, "width": 32, "seed": 0},
                  "objective_args": {"autoencoder": str(tiny_checkpoint / "vae"), "preset_name": "tiny",
                                     "bank_size": 4}}
        path = tmp_path / f"{flag}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["train", "teacher", "--config", str(path)]) == 0
        runs[flag] = (tmp_path / str(flag) / "metrics.csv").read_text().splitlines()
        assert len(enabled) == int(flag)  # the config flag reaches the trained denoiser, and only then
    losses = [[float(row.split(",")[2]) for row in lines[1:]] for lines in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
