"""Text encoder: shapes, zeroed padding, and the prompt cache."""

from __future__ import annotations

import pytest
import torch

from causvid.checkpoint import CheckpointError
from causvid.text import MiniLMTextEncoder, load_text_encoder


def test_minilm_shapes_and_padding(text_encoder):
    states = text_encoder.encode(["a red circle moving left on a black background", "dot"])
    assert states.shape == (2, 32, 384) and states.dtype == torch.float32
    tokens = text_encoder.tokenizer(["dot"]).input_ids[0]
    assert states[1, len(tokens):].abs().sum() == 0  # padding zeroed
    assert states[1, : len(tokens)].abs().sum(-1).min() > 0
    assert not torch.allclose(states[0], states[1])


def test_an_embedding_does_not_depend_on_the_prompts_beside_it():
    # Batches are encoded only up to their longest prompt, so "dot" alone runs on 3 tokens and
    # beside a long prompt on 11; the masked padding must not change it.
    alone = MiniLMTextEncoder(cache_size=0).encode("dot")
    beside = MiniLMTextEncoder(cache_size=0).encode(["a red circle moving left on a black background", "dot"])
    torch.testing.assert_close(alone[0], beside[1], atol=1e-5, rtol=0)


def test_prompt_cache_hits_and_evicts():
    encoder = MiniLMTextEncoder(cache_size=2)
    first = encoder.encode("a blue square")
    calls = []
    original = encoder._encode_uncached
    encoder._encode_uncached = lambda prompts: calls.append(list(prompts)) or original(prompts)
    assert torch.equal(encoder.encode("a blue square"), first)
    assert calls == []
    encoder.encode(["a green ball", "a red box"])
    assert calls == [["a green ball", "a red box"]]
    assert encoder.cache_info()["cached_prompts"] == 2
    encoder.encode("a blue square")  # evicted by the two newer prompts
    assert calls[-1] == ["a blue square"]
    # One call with more distinct prompts than the cache holds still returns them all.
    many = encoder.encode(["one", "two", "three", "one"])
    assert many.shape[0] == 4 and torch.equal(many[0], many[3])
    assert encoder.cache_info()["cached_prompts"] == 2


def test_bad_text_encoder_specs(tmp_path):
    with pytest.raises(CheckpointError, match="unknown text encoder"):
        load_text_encoder({"type": "clip"})
    with pytest.raises(CheckpointError, match="needs a 'path'"):
        load_text_encoder({"type": "umt5"})
    with pytest.raises(CheckpointError, match="directory not found"):
        load_text_encoder({"type": "umt5", "path": str(tmp_path / "missing")})
