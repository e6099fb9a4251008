"""One stream's model state: its rollout (KV cache and RNG), prompt embedding and codec streams.

A `StreamState` is touched only by the engine's model thread. Each block is two calls, so
that the engine can batch the denoising of several streams in between:
`plan()` says what to denoise (text, starting latents, noise levels), the engine denoises it
(see `stream.batching`), `decode(clean)` yields its JPEG frames latent frame by latent frame,
the engine commits it to the KV cache, and `block_end()` reports the finished block.

Modes:
- t2v: pure noise every block; the rolling cache makes the stream unbounded.
- i2v: the uploaded image is encoded as latent frame 0 and committed at t=0 (prefill);
  the stream continues from it, and its first output frame is the decoded image.
- v2v: SDEdit on the causal student. Input frames are encoded as they arrive; each full
  block of latent frames is noised to `strength` and denoised from there. Output frame i is
  input frame i (the autoencoder maps 1 then 4 pixel frames to each latent frame both ways).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from causvid.models.autoencoder import TEMPORAL_FACTOR
from causvid.pipeline import CausVidPipeline
from causvid.schedule import add_noise
from stream.protocol import StartRequest, encode_jpeg


@dataclass
class BlockPlan:
    """The denoising one stream needs for its next block; plans of equal shape are batched."""

    stream: "StreamState"
    text: torch.Tensor  # [1, L, D]
    noise: torch.Tensor  # [1, C, k, h, w] at noise level sigmas[0]
    sigmas: torch.Tensor


@dataclass
class BlockOutput:
    """Part of a block, ready to send: decoded frames, events, or the block's end."""

    block: int
    first_index: int
    jpegs: list[bytes]
    t_origin: list[float]  # per frame
    t_ready: float
    cached_frames: int
    events: list[tuple[str, dict]] = field(default_factory=list)  # (event type, fields)
    done: bool = False
    more: bool = False  # v2v: another block is ready without new input
    block_end: bool = False  # the block is complete and committed (status goes out)


def v2v_sigmas(student: torch.Tensor, strength: float) -> torch.Tensor:
    """The student's noise levels at or below `strength` (e.g. 0.5 -> [.5, .25]); [strength] if none."""
    kept = student[student <= strength + 1e-6]
    return kept if len(kept) else torch.tensor([strength], dtype=student.dtype)


class StreamState:
    """Generates one stream block by block on a shared pipeline. Model thread only."""

    def __init__(self, pipe: CausVidPipeline, request: StartRequest, jpeg_quality: int = 85):
        self.pipe = pipe
        self.request = request
        self.mode = request.mode
        self.jpeg_quality = jpeg_quality
        self.block_frames = pipe.config.block_frames
        self.rollout = pipe.new_rollout(request.seed, request.steps)
        self.decoder = pipe.autoencoder.new_decoder_stream()
        self.text = pipe.encode_prompt(request.prompt)
        self._upcoming: list[torch.Tensor] = []  # embeddings of the next blocks during a prompt switch
        self._recache = pipe.config.switch_recache
        self._cut = False  # the next block starts a new stream (a switch with a scene cut)
        self._events: list[tuple[str, dict]] = []
        self.blocks = 0
        self.frames = 0
        self._origin = 0.0
        self._prefix: torch.Tensor | None = None  # i2v: the image's latent, decoded with the first block
        if self.mode == "i2v":
            self._prefix = self._prefill(request.image)
        if self.mode == "v2v":
            self.encoder = pipe.autoencoder.new_encoder_stream()
            self.sigmas = v2v_sigmas(self.rollout.sigmas, request.strength)
            self._latents: list[torch.Tensor] = []  # encoded input latent frames not yet denoised
            self._arrivals: deque[float] = deque()  # arrival time of each input frame not yet output
            self._last_input: torch.Tensor | None = None
            self.inputs = 0
            self.input_ended = False

    # -- inputs --------------------------------------------------------------------------------

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images of any size -> [1, 3, n, H, W] in [-1, 1] at the model's size."""
        height, width = self.pipe.config.height, self.pipe.config.width
        frames = [
            np.asarray(Image.fromarray(image).convert("RGB").resize((width, height), Image.BILINEAR))
            if image.shape[:2] != (height, width) else image
            for image in images
        ]
        video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
        return video[None].to(self.pipe.device)

    def _prefill(self, image: np.ndarray) -> torch.Tensor:
        latent = self.pipe.autoencoder.encode_stream(self.pipe.autoencoder.new_encoder_stream(), self._to_tensor([image]))
        self.rollout.commit(latent, self.text)
        return latent

    def switch_prompt(self, prompt: str, interpolate_blocks: int, recache: bool | None = None,
                      cut: bool | None = None) -> None:
        """Use `prompt` from the next block, after `interpolate_blocks` blocks of lerped embeddings.

        With `recache` (default: the pipeline's `switch_recache`) each new embedding first
        recomputes the cached frames' K/V under it (`CausalRollout.recache`). With `cut` (default:
        the pipeline's `switch_cut`) the next block starts a new stream of the new prompt instead:
        no interpolation, an empty cache, and the decoder's first frame, as a scene cut.
        """
        target = self.pipe.encode_prompt(prompt)
        self._cut = self.pipe.config.switch_cut if cut is None else cut
        n = 0 if self._cut else interpolate_blocks
        self._upcoming = [torch.lerp(self.text, target, j / (n + 1)) for j in range(1, n + 1)] + [target]
        self._recache = self.pipe.config.switch_recache if recache is None else recache
        self._events.append(("prompt", {"prompt": prompt, "block": self.blocks, "interpolate_blocks": n,
                                        "recache": self._recache, "cut": self._cut}))

    def feed(self, images: list[np.ndarray], arrivals: list[float]) -> None:
        """v2v: encode input frames; complete latent frames queue up for denoising."""
        if not images:
            return
        video = self._to_tensor(images)
        self._last_input = video[:, :, -1:]
        self.inputs += len(images)
        self._arrivals.extend(arrivals)
        self._encode(video)

    def _encode(self, video: torch.Tensor) -> None:
        latents = self.pipe.autoencoder.encode_stream(self.encoder, video)
        if latents is not None:
            self._latents.extend(latents.split(1, dim=2))

    def end_input(self) -> None:
        """v2v: no more input. Pad the last chunk with copies of the last frame; the padding is trimmed."""
        if self.input_ended:
            return
        self.input_ended = True
        leftover = (self.inputs - 1) % TEMPORAL_FACTOR if self.inputs else 0
        if leftover:
            self._encode(self._last_input.expand(-1, -1, TEMPORAL_FACTOR - leftover, -1, -1))

    # -- blocks --------------------------------------------------------------------------------

    def _ready(self) -> bool:
        if self.mode != "v2v":
            return True
        return len(self._latents) >= self.block_frames or (self.input_ended and bool(self._latents))

    def plan(self) -> BlockPlan | None:
        """What to denoise next, or None when a v2v stream waits for input."""
        if not self._ready():
            return None
        if self._upcoming:
            self.text = self._upcoming.pop(0)
            if self._cut:
                self.rollout.restart()
                self.decoder = self.pipe.autoencoder.new_decoder_stream()
                self._cut = False
            elif self._recache:
                self.rollout.recache(self.text)
        self._origin = time.time()
        k = self.block_frames
        if self.mode != "v2v":
            return BlockPlan(self, self.text, self.rollout.noise(k), self.rollout.sigmas)
        block = self._latents[:k]
        del self._latents[:k]
        block += [block[-1]] * (k - len(block))  # the tail of the input: output past it is trimmed
        clean = torch.cat(block, dim=2)
        return BlockPlan(self, self.text, add_noise(clean, self.rollout.noise(k), self.sigmas[:1]), self.sigmas)

    def decode(self, clean: torch.Tensor) -> Iterator[BlockOutput]:
        """Decode a denoised block to JPEG frames, one latent frame (1 or 4 pixel frames) at a time.

        Each part is yielded as soon as it exists; `block_end` follows once the block is committed.
        """
        latents = clean if self._prefix is None else torch.cat([self._prefix, clean], dim=2)
        self._prefix = None
        limit = self.inputs if self.mode == "v2v" else self.request.max_frames
        remaining = None if limit is None else limit - self.frames
        for frames in self.pipe.autoencoder.iter_decode_frames(self.decoder, latents, remaining):
            if self.mode == "v2v":
                origins = [self._arrivals.popleft() for _ in frames]
            else:
                origins = [self._origin] * len(frames)
            yield BlockOutput(
                block=self.blocks,
                first_index=self.frames,
                jpegs=[encode_jpeg(frame, self.jpeg_quality) for frame in frames],
                t_origin=origins,
                t_ready=time.time(),
                cached_frames=self.rollout.cache.cached_frames,
                events=self._events,
            )
            self._events = []
            self.frames += len(frames)

    def block_end(self) -> BlockOutput:
        """After a block is decoded and committed: its status, and whether the stream is done."""
        out = BlockOutput(self.blocks, self.frames, [], [], time.time(), self.rollout.cache.cached_frames,
                          self._events, block_end=True)
        self._events = []
        self.blocks += 1
        out.done = self.is_done()
        out.more = self.mode == "v2v" and self._ready()
        return out

    def idle_output(self) -> BlockOutput:
        """Events (and completion) for a step in which no block was ready."""
        out = BlockOutput(self.blocks, self.frames, [], [], time.time(), self.rollout.cache.cached_frames, self._events)
        self._events = []
        out.done = self.is_done()
        return out

    def is_done(self) -> bool:
        if self.mode == "v2v":
            return self.input_ended and not self._latents and self.frames >= self.inputs
        return self.request.max_frames is not None and self.frames >= self.request.max_frames
