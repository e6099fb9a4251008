"""Block-causal attention for diffusers' Wan transformer: masks, KV cache and processors.

Causality lives here, plugged into an unmodified `WanTransformer3DModel` through
`set_processor`. One `AttentionContext` object is shared by every layer's processors; the
denoiser wrapper fills it before each forward pass and clears it afterwards.

Three modes, chosen by what the context holds:
- no mask, no cache: bidirectional attention (the teacher), optionally joined by a Video
  Interface Network's global tokens (`GlobalTokens`, the parallel long-video mode);
- a boolean mask: one full forward under a block-causal (or windowed) mask (training);
- a `KVCache`: the current block attends to the cached K/V of earlier frames plus itself.

Cached keys are stored *before* rotary embedding and rotated at attention time to their
slot in the cache (sink frames first, then the window). RoPE scores depend only on position
differences, so within the window this equals absolute positions, and slot positions stay
below `sink_frames + window_frames + block_frames` however long the stream runs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Iterator

import torch
import torch.nn.functional as F

from causvid.errors import UserError


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` [B, N, H, D] by the unit complex `rotation` [1, N, 1, D/2] (Wan's convention).

    One complex multiply: on CPU much cheaper than the real-valued form on strided halves.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def block_causal_mask(
    num_frames: int,
    tokens_per_frame: int,
    block_frames: int,
    sink_frames: int = 0,
    window_frames: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean [N, N] mask, True where query token i may attend to key token j.

    CausVid's mask: frame j is visible from frame i iff floor(j/k) <= floor(i/k). With a window,
    earlier blocks are visible only for the first `sink_frames` frames and the `window_frames`
    frames right before the query's block, which is what `KVCache` keeps.
    """
    frame = torch.arange(num_frames, device=device)
    block = frame // block_frames
    q_block, k_block = block[:, None], block[None, :]
    allowed = k_block <= q_block
    if window_frames is not None:
        block_start = (q_block * block_frames)
        in_window = frame[None, :] >= block_start - window_frames
        allowed &= (k_block == q_block) | in_window | (frame[None, :] < sink_frames)
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


@dataclass
class KVCache:
    """Per-layer self-attention K/V of past frames, plus cached cross-attention K/V of the prompt.

    Keys are stored unrotated, grouped by frame, so evicting a frame is a slice. With
    `window_frames` set it is a rolling cache: the first `sink_frames` frames stay forever, and of
    the rest only the latest `window_frames` are kept.
    """

    num_layers: int
    tokens_per_frame: int
    sink_frames: int = 0
    window_frames: int | None = None
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    cross: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cross_text: torch.Tensor | None = None
    _rotated: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list, repr=False)
    _edits: int = field(default=0, repr=False)  # changes other than appends: evictions, rows taken

    def __post_init__(self) -> None:
        if self.window_frames is not None and self.window_frames < 0:
            raise UserError(f"window_frames must be >= 0 or None, got {self.window_frames}")
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.cross = [None] * self.num_layers
        self._rotated = [None] * self.num_layers

    @property
    def cached_frames(self) -> int:
        """How many frames' K/V are held now (after eviction)."""
        k = self.keys[0]
        return 0 if k is None else k.shape[1] // self.tokens_per_frame

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add one block's unrotated K/V [B, n, H, D] for `layer`, then evict beyond the window."""
        if self.keys[layer] is not None:
            key = torch.cat([self.keys[layer], key], dim=1)
            value = torch.cat([self.values[layer], value], dim=1)
        keep = self.kept_frames(key.shape[1] // self.tokens_per_frame)
        if keep is not None:
            tokens = (keep[:, None] * self.tokens_per_frame + torch.arange(self.tokens_per_frame)).flatten()
            key, value = key[:, tokens], value[:, tokens]
            self._edits += 1
        self.keys[layer], self.values[layer] = key, value

    def rotated_keys(self, layer: int, rotation: torch.Tensor) -> torch.Tensor:
        """`layer`'s cached keys rotated to their slots by `rotation` (which the cache length fixes).

        Every denoising step of a block and its commit pass see the same cache, so the rotation is
        computed once per cache state: the memo is tied to the keys tensor and ends when it changes.
        """
        keys, memo = self.keys[layer], self._rotated[layer]
        if memo is None or memo[0] is not keys:
            memo = (keys, apply_rotary(keys, rotation))
            self._rotated[layer] = memo
        return memo[1]

    def kept_frames(self, frames: int) -> torch.Tensor | None:
        """Which of `frames` consecutive frames the cache keeps (the sinks, then the latest
        window), or None for all of them."""
        if self.window_frames is None or frames <= self.sink_frames + self.window_frames:
            return None
        return torch.cat([torch.arange(self.sink_frames), torch.arange(frames - self.window_frames, frames)])

    def sync_prompt(self, text: torch.Tensor) -> None:
        """Drop cached cross-attention K/V when the prompt embedding changes."""
        same = (
            self.cross_text is not None
            and self.cross_text.shape == text.shape
            and (self.cross_text is text or torch.equal(self.cross_text, text))
        )
        if not same:
            self.forget_prompt()
            self.cross_text = text

    def forget_prompt(self) -> None:
        """Drop the cross-attention K/V so the next forward recomputes them (e.g. with gradient)."""
        self.cross = [None] * self.num_layers
        self.cross_text = None

    @classmethod
    def stacked(cls, caches: list["KVCache"]) -> "KVCache":
        """One cache whose batch rows are the given caches (all holding the same number of frames)."""
        first = caches[0]
        merged = cls(first.num_layers, first.tokens_per_frame, first.sink_frames, first.window_frames)
        for layer in range(first.num_layers):
            if first.keys[layer] is not None:
                merged.keys[layer] = torch.cat([c.keys[layer] for c in caches])
                merged.values[layer] = torch.cat([c.values[layer] for c in caches])
        # The prompts' cross-attention K/V carry over only if every cache has them; otherwise the
        # merged cache recomputes them for all (sync_prompt sees no cross_text).
        if all(c.cross_text is not None and all(x is not None for x in c.cross) for c in caches):
            merged.cross_text = torch.cat([c.cross_text for c in caches])
            merged.cross = [
                (torch.cat([c.cross[layer][0] for c in caches]), torch.cat([c.cross[layer][1] for c in caches]))
                for layer in range(first.num_layers)
            ]
        return merged

    def frozen(self) -> "KVCache":
        """A copy that keeps reading this moment's K/V after later appends and evictions (for
        recomputing a block in the backward pass).

        A cache without a window only ever grows, so the copy reads the first frames of the
        live cache's tensors: a rollout's checkpointed blocks then share one cache instead of
        each keeping the cache of its moment (at Wan2.1-1.3B's size, 21 frames: tens of GiB).
        A rolling cache evicts, so its copy holds this moment's tensors.
        """
        snapshot = copy.copy(self)
        snapshot.cross, snapshot._rotated = list(self.cross), [None] * self.num_layers
        if self.window_frames is None:
            tokens = self.cached_frames * self.tokens_per_frame
            snapshot.keys, snapshot.values = _CachePrefix(self, "keys", tokens), _CachePrefix(self, "values", tokens)
        else:
            snapshot.keys, snapshot.values = list(self.keys), list(self.values)
            snapshot._rotated = list(self._rotated)
        return snapshot

    def take_row(self, merged: "KVCache", row: int) -> None:
        """Become batch row `row` of a `stacked` cache (after the batch ran)."""
        rows = slice(row, row + 1)
        self._edits += 1
        for layer in range(merged.num_layers):
            if merged.keys[layer] is not None:  # None until a first block is committed
                self.keys[layer] = merged.keys[layer][rows]
                self.values[layer] = merged.values[layer][rows]
            cross = merged.cross[layer]
            self.cross[layer] = None if cross is None else (cross[0][rows], cross[1][rows])
        self.cross_text = None if merged.cross_text is None else merged.cross_text[rows]


class _CachePrefix(Sequence):
    """Per layer, the first `tokens` of a growing cache's keys or values (None while empty)."""

    def __init__(self, cache: KVCache, name: str, tokens: int):
        self.cache, self.name, self.tokens, self.edits = cache, name, tokens, cache._edits

    def __len__(self) -> int:
        return self.cache.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor | None:
        if self.cache._edits != self.edits:
            raise RuntimeError("the KV cache changed other than by appends after a checkpointed block read it")
        tensor = getattr(self.cache, self.name)[layer]
        return None if self.tokens == 0 or tensor is None else tensor[:, : self.tokens]


@dataclass
class GlobalTokens:
    """A Video Interface Network's tokens for each clip of the batch, joined to every self-attention.

    Each layer projects `tokens` [B, N, D] with its own K/V weights and appends them, unrotated
    (they have no place in time), to the clip's keys and values. `logit_bias` [num_layers] is
    added to their attention logits: a learned gate per layer, so that training starts close to
    the teacher's attention and opens the tokens up as far as they help.
    """

    tokens: torch.Tensor
    logit_bias: torch.Tensor


@dataclass
class AttentionContext:
    """What the processors read during one forward pass. Filled by the denoiser wrapper."""

    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    write_cache: bool = False
    cache_rotation: torch.Tensor | None = None
    global_tokens: GlobalTokens | None = None

    def clear(self) -> None:
        self.mask, self.cache, self.write_cache, self.cache_rotation = None, None, False, None
        self.global_tokens = None

    def snapshot(self) -> "AttentionContext":
        """The context as it is now, to recompute a block later (gradient checkpointing): with the
        cache's tensors of this moment, and writing nothing to the cache (the first pass did)."""
        cache = None if self.cache is None else self.cache.frozen()
        return AttentionContext(self.mask, cache, False, self.cache_rotation, self.global_tokens)

    @contextlib.contextmanager
    def holding(self, state: "AttentionContext") -> Iterator[None]:
        """Hold `state`'s values while the block runs, then what it held before."""
        before = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in fields(self):
            setattr(self, f.name, getattr(state, f.name))
        try:
            yield
        finally:
            for name, value in before.items():
                setattr(self, name, value)


def _project_qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(context).unflatten(2, (attn.heads, -1))
    return query, key, value


def _attend(attn, query, key, value, mask: torch.Tensor | None) -> torch.Tensor:
    # SDPA wants [B, H, N, D]; the Wan layout is [B, N, H, D].
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
    )
    out = out.transpose(1, 2).flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


class CausalSelfAttnProcessor:
    """Self-attention that obeys the shared context: bidirectional, masked, or KV-cached."""

    def __init__(self, layer: int, context: AttentionContext):
        self.layer = layer
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.context
        query, key, value = _project_qkv(attn, hidden_states, hidden_states)
        query, key_now = apply_rotary(query, rotary_emb), apply_rotary(key, rotary_emb)
        cache = ctx.cache
        if ctx.global_tokens is not None:
            return self._attend_with_global_tokens(attn, query, key_now, value, ctx.global_tokens)
        if cache is None:
            return _attend(attn, query, key_now, value, ctx.mask)
        # The block attends to itself fully and to every cached frame before it.
        past_k, past_v = cache.keys[self.layer], cache.values[self.layer]
        if past_k is None:
            out = _attend(attn, query, key_now, value, None)
        else:
            past_k = cache.rotated_keys(self.layer, ctx.cache_rotation)
            out = _attend(attn, query, torch.cat([past_k, key_now], 1), torch.cat([past_v, value], 1), None)
        if ctx.write_cache:
            cache.append(self.layer, key, value)
        return out

    def _attend_with_global_tokens(self, attn, query, key, value, guide: GlobalTokens) -> torch.Tensor:
        if self.context.mask is not None or self.context.cache is not None:
            raise ValueError("global tokens join bidirectional attention only (no mask, no KV cache)")
        tokens = guide.tokens
        global_key = attn.norm_k(attn.to_k(tokens)).unflatten(2, (attn.heads, -1))
        global_value = attn.to_v(tokens).unflatten(2, (attn.heads, -1))
        gate = guide.logit_bias[self.layer].to(query.dtype).expand(tokens.shape[1])
        bias = torch.cat([torch.zeros(key.shape[1], device=query.device, dtype=query.dtype), gate])
        keys, values = torch.cat([key, global_key], 1), torch.cat([value, global_value], 1)
        return _attend(attn, query, keys, values, bias.view(1, 1, 1, -1))


class CachedCrossAttnProcessor:
    """Cross-attention to the prompt; K/V are cached per layer while a KV cache is active."""

    def __init__(self, layer: int, context: AttentionContext):
        self.layer = layer
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        cache = self.context.cache
        if cache is not None and cache.cross[self.layer] is not None:
            key, value = cache.cross[self.layer]
            query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        else:
            query, key, value = _project_qkv(attn, hidden_states, encoder_hidden_states)
            if cache is not None:
                cache.cross[self.layer] = (key, value)
        return _attend(attn, query, key, value, None)
