"""The wire protocol: validated client messages, server events, and the binary frame format.

Everything a client sends passes through `parse_message` or `decode_image` before the server
acts on it; both raise `ProtocolError` (a code and a message for the client) and never assert.
docs/protocol.md is the prose version of this file.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image

from causvid.errors import UserError
from causvid.text import MAX_PROMPT_CHARS, check_prompt

MODES = ("t2v", "i2v", "v2v")
PACINGS = ("realtime", "fast")

# Output frames: a 32-byte little-endian header, then JPEG bytes.
#   magic b"CVF1", frame index (u32), block index (u32), frames dropped so far (u32),
#   t_origin (f64: server clock, seconds since the epoch, when this frame's work began:
#   the block's start for t2v/i2v, the input frame's arrival for v2v), t_ready (f64: encoded).
FRAME_MAGIC = b"CVF1"
FRAME_HEADER = struct.Struct("<4sIIIdd")


class ProtocolError(Exception):
    """A client message the server refuses; `code` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What one client may send. The defaults suit a public demo on a small machine."""

    max_message_bytes: int = 2 * 2**20  # larger messages get a "too_large" error and are dropped
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_image_side: int = 4096  # uploads are resized to the model's size; this bounds decoding work
    max_seed: int = 2**63 - 1
    max_steps: int = 8
    max_fps: float = 60.0
    max_interpolate_blocks: int = 2


@dataclass(frozen=True)
class StartRequest:
    """Begin a stream. `image` (i2v) is decoded RGB uint8 [H, W, 3]; v2v frames come as binary messages."""

    mode: str
    prompt: str
    seed: int = 0
    pacing: str = "realtime"
    fps: float | None = None  # None: the model's fps
    steps: int | None = None  # None: the student's configured steps
    strength: float = 0.5  # v2v: noise level the input is pushed to before denoising
    interpolate_blocks: int = 0  # default for prompt switches
    max_frames: int | None = None  # None: unbounded (t2v/i2v), or until end_input (v2v)
    image: np.ndarray | None = None


@dataclass(frozen=True)
class PromptSwitch:
    prompt: str
    interpolate_blocks: int | None = None  # None: the stream's default
    recache: bool | None = None  # None: the model's default (PipelineConfig.switch_recache)
    cut: bool | None = None  # None: the model's default (PipelineConfig.switch_cut)


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class EndInput:
    pass


@dataclass(frozen=True)
class Auth:
    token: str


Message = Union[StartRequest, PromptSwitch, Stop, EndInput, Auth]


# -- validation helpers ----------------------------------------------------------------------


def _field(data: dict, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    if name not in data or data[name] is None:
        if required:
            raise ProtocolError("bad_message", f"missing field {name!r}")
        return default
    value = data[name]
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError("bad_message", f"field {name!r} must be {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise ProtocolError("bad_message", f"field {name!r} must be {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _number(data: dict, name: str, low: float, high: float, default: float | None) -> float | None:
    value = _field(data, name, (int, float), default)
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise ProtocolError("bad_message", f"field {name!r} must lie in [{low}, {high}], got {value}")
    return value


def _integer(data: dict, name: str, low: int, high: int, default: int | None) -> int | None:
    value = _field(data, name, int, default)
    if value is not None and not low <= value <= high:
        raise ProtocolError("bad_message", f"field {name!r} must lie in [{low}, {high}], got {value}")
    return value


def _prompt(data: dict, limits: Limits) -> str:
    try:
        return check_prompt(_field(data, "prompt", str, required=True), limits.max_prompt_chars)
    except UserError as error:
        raise ProtocolError("bad_prompt", str(error)) from None


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> RGB uint8 [H, W, 3]. Sizes are checked from the header before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max(width, height) > limits.max_image_side or min(width, height) < 1:
                raise ProtocolError(
                    "bad_image", f"image is {width}x{height}; each side must be 1..{limits.max_image_side} pixels"
                )
            return np.asarray(image.convert("RGB"))
    except ProtocolError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ProtocolError("bad_image", f"cannot decode image: {error}") from None


def _start(data: dict, limits: Limits) -> StartRequest:
    mode = _field(data, "mode", str, "t2v")
    if mode not in MODES:
        raise ProtocolError("bad_message", f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    pacing = _field(data, "pacing", str, "realtime")
    if pacing not in PACINGS:
        raise ProtocolError("bad_message", f"pacing must be one of {', '.join(PACINGS)}, got {pacing!r}")
    image = None
    encoded = _field(data, "image", str)
    if mode == "i2v":
        if encoded is None:
            raise ProtocolError("bad_message", "mode i2v needs an 'image' (base64 JPEG or PNG, or a data: URL)")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_image", "field 'image' is not valid base64") from None
        image = decode_image(raw, limits)
    elif encoded is not None:
        raise ProtocolError("bad_message", f"field 'image' is only for mode i2v, not {mode}")
    return StartRequest(
        mode=mode,
        prompt=_prompt(data, limits),
        seed=_integer(data, "seed", 0, limits.max_seed, 0),
        pacing=pacing,
        fps=_number(data, "fps", 1.0, limits.max_fps, None),
        steps=_integer(data, "steps", 1, limits.max_steps, None),
        strength=_number(data, "strength", 0.01, 1.0, 0.5),
        interpolate_blocks=_integer(data, "interpolate_blocks", 0, limits.max_interpolate_blocks, 0),
        max_frames=_integer(data, "max_frames", 1, 2**31 - 1, None),
        image=image,
    )


def check_size(raw: str | bytes, limits: Limits) -> None:
    """Refuse a message (text or binary) over `limits.max_message_bytes`."""
    size = len(raw.encode()) if isinstance(raw, str) else len(raw)
    if size > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")


def parse_message(raw: str | bytes, limits: Limits) -> Message:
    """A text message from a client -> a validated message. Raises `ProtocolError`."""
    check_size(raw, limits)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ProtocolError("bad_json", f"message is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise ProtocolError("bad_json", "message nests too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    kind = data.get("type")
    if kind == "start":
        return _start(data, limits)
    if kind == "prompt":
        return PromptSwitch(_prompt(data, limits), _integer(data, "interpolate_blocks", 0, limits.max_interpolate_blocks, None),
                            _field(data, "recache", bool), _field(data, "cut", bool))
    if kind == "stop":
        return Stop()
    if kind == "end_input":
        return EndInput()
    if kind == "auth":
        return Auth(_field(data, "token", str, required=True))
    raise ProtocolError("unknown_type", f"unknown message type {kind!r} (expected start, prompt, stop, end_input or auth)")


# -- server -> client ------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> str:
    """A JSON event for the client."""
    return json.dumps({"type": kind, **fields})


def error_event(code: str, message: str, fatal: bool = False) -> str:
    """An error; `fatal` means the server closes the connection after sending it."""
    return event("error", code=code, message=message, fatal=fatal)


def encode_jpeg(frame: np.ndarray, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class FrameHeader:
    index: int
    block: int
    dropped: int
    t_origin: float
    t_ready: float


def pack_frame(header: FrameHeader, jpeg: bytes) -> bytes:
    """One binary output message: header + JPEG."""
    return FRAME_HEADER.pack(FRAME_MAGIC, header.index, header.block, header.dropped, header.t_origin, header.t_ready) + jpeg


def unpack_frame(message: bytes) -> tuple[FrameHeader, bytes]:
    """A binary output message -> (header, JPEG bytes). Raises ValueError if it is not one."""
    if len(message) < FRAME_HEADER.size:
        raise ValueError(f"frame message of {len(message)} bytes is shorter than its header")
    magic, index, block, dropped, t_origin, t_ready = FRAME_HEADER.unpack_from(message)
    if magic != FRAME_MAGIC:
        raise ValueError(f"bad frame magic {magic!r}")
    return FrameHeader(index, block, dropped, t_origin, t_ready), bytes(message[FRAME_HEADER.size :])
