"""A Python client for the stream server: `StreamClient` (async) and `record` (sync, the CLI's).

    async with await StreamClient.connect("ws://127.0.0.1:8765/ws") as client:
        await client.start("a red circle moving right")
        for frame in await client.frames(16):
            frame.image()  # uint8 [H, W, 3]
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from stream.protocol import FrameHeader, encode_jpeg, unpack_frame


class StreamError(Exception):
    """The server sent an error event where the client expected something else."""

    def __init__(self, event: dict):
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.event = event


@dataclass
class Frame:
    header: FrameHeader
    jpeg: bytes
    received: float  # client clock, seconds since the epoch

    def image(self) -> np.ndarray:
        with Image.open(io.BytesIO(self.jpeg)) as image:
            return np.asarray(image.convert("RGB"))


def with_token(url: str, token: str | None) -> str:
    if token is None:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode({'token': token})}" if parts.query else urlencode({"token": token})
    return urlunsplit(parts._replace(query=query))


# How a switch treats the KV cache: keep it (new cross-attention only), re-cache its frames under
# the new prompt, or cut to a new stream of the new prompt.
SWITCH_MODES = {"keep": {"recache": False, "cut": False}, "recache": {"recache": True, "cut": False},
                "cut": {"recache": False, "cut": True}}


class StreamClient:
    """One websocket connection to the stream server. Events are kept in `events`."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.events: list[dict] = []
        self.hello: dict = {}

    @classmethod
    async def connect(cls, url: str, token: str | None = None, **kwargs) -> "StreamClient":
        """Connect and wait for the server's hello. `kwargs` go to `websockets.asyncio.client.connect`."""
        kwargs.setdefault("max_size", 2**24)
        ws = await connect(with_token(url, token), compression=None, **kwargs)
        client = cls(ws)
        client.hello = await client.wait_event("hello")
        return client

    async def __aenter__(self) -> "StreamClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()

    # -- sending -----------------------------------------------------------------------------

    async def send(self, kind: str, **fields) -> None:
        await self.ws.send(json.dumps({"type": kind, **fields}))

    async def start(self, prompt: str, mode: str = "t2v", image: np.ndarray | bytes | None = None, **options) -> dict:
        """Start a stream and return the server's "started" event. `options`: see docs/protocol.md."""
        if image is not None:
            raw = image if isinstance(image, bytes) else encode_jpeg(np.asarray(image), 95)
            options["image"] = base64.b64encode(raw).decode()
        await self.send("start", mode=mode, prompt=prompt, **options)
        return await self.wait_event("started")

    async def switch_prompt(self, prompt: str, interpolate_blocks: int | None = None,
                            recache: bool | None = None, cut: bool | None = None) -> None:
        fields = {name: value for name, value in
                  (("interpolate_blocks", interpolate_blocks), ("recache", recache), ("cut", cut)) if value is not None}
        await self.send("prompt", prompt=prompt, **fields)

    async def send_frame(self, frame: np.ndarray | bytes) -> None:
        """v2v: one input frame (uint8 [H, W, 3], or JPEG bytes)."""
        await self.ws.send(frame if isinstance(frame, bytes) else encode_jpeg(frame, 90))

    async def end_input(self) -> None:
        await self.send("end_input")

    async def stop(self) -> dict:
        await self.send("stop")
        return await self.wait_event("stopped")

    # -- receiving ---------------------------------------------------------------------------

    async def recv(self, timeout: float | None = 30.0) -> Frame | dict:
        """The next frame or event (events are also appended to `events`)."""
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(raw, bytes):
            header, jpeg = unpack_frame(raw)
            return Frame(header, jpeg, time.time())
        message = json.loads(raw)
        self.events.append(message)
        return message

    async def wait_event(self, kind: str, timeout: float = 30.0) -> dict:
        """The next event of type `kind`; frames meanwhile are discarded. An error event raises."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.0, deadline - time.monotonic()))
            if isinstance(message, Frame):
                continue
            if message["type"] == kind:
                return message
            if message["type"] == "error":
                raise StreamError(message)

    async def frames(self, count: int, timeout: float = 60.0) -> list[Frame]:
        """The next `count` frames (fewer if the stream ends). An error event raises."""
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        while len(frames) < count:
            message = await self.recv(max(0.0, deadline - time.monotonic()))
            if isinstance(message, Frame):
                frames.append(message)
            elif message["type"] == "error":
                raise StreamError(message)
            elif message["type"] == "done":
                break
        return frames


# -- recording (the `causvid client` command) ------------------------------------------------


@dataclass
class RecordStats:
    frames: int
    seconds: float  # first frame to last
    fps: float
    first_frame_s: float  # start sent -> first frame received
    latency_ms: dict = field(default_factory=dict)  # p50 / p95 / max
    dropped: int = 0


def percentiles(values: list[float]) -> dict:
    """p50 / p95 / max of `values` (empty dict if none)."""
    if not values:
        return {}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)), "max": float(array.max())}


async def record_async(
    url: str,
    prompt: str,
    output: str | Path | None = None,
    frames: int = 33,
    seed: int = 0,
    switch_at: tuple[int, str] | None = None,
    switch_mode: str | None = None,
    image: np.ndarray | None = None,
    video: np.ndarray | None = None,
    token: str | None = None,
    **options,
) -> RecordStats:
    """Stream from a server into an mp4 (if `output`): t2v, i2v with `image`, v2v with `video` frames.
    `switch_at` = (frame, prompt) switches once, as `switch_mode` says (a key of SWITCH_MODES;
    None: the server's default).

    Latency is per frame: for v2v from sending input frame i to receiving output frame i (the
    client's clock); otherwise from the server starting the frame's block (the server's clock,
    so only meaningful when both run on one machine).
    """
    from causvid.video_io import Mp4Writer

    async with await StreamClient.connect(url, token) as client:
        mode = "v2v" if video is not None else "i2v" if image is not None else "t2v"
        if video is not None:
            frames = len(video)
        else:
            options["max_frames"] = frames
        sent_at: dict[int, float] = {}
        t_start = time.time()
        started = await client.start(prompt, mode, image=image, seed=seed, **options)
        feeder = asyncio.create_task(_feed(client, video, started["fps"], sent_at)) if video is not None else None
        writer = Mp4Writer(output, round(started["fps"])) if output is not None else None
        received: list[Frame] = []
        switched = switch_at is None
        try:
            while len(received) < frames:
                message = await client.recv(60.0)
                if isinstance(message, dict):
                    if message["type"] == "error":
                        raise StreamError(message)
                    if message["type"] == "done":
                        break
                    continue
                received.append(message)
                if writer is not None:
                    writer.write(message.image())
                if not switched and message.header.index + 1 >= switch_at[0]:
                    await client.switch_prompt(switch_at[1], **SWITCH_MODES.get(switch_mode, {}))
                    switched = True
        finally:
            if feeder is not None:
                feeder.cancel()
            if writer is not None and writer.frames:
                writer.close()
    if not received:
        raise StreamError({"code": "no_frames", "message": "the server sent no frames"})
    if video is not None:
        latencies = [(f.received - sent_at[f.header.index]) * 1000 for f in received if f.header.index in sent_at]
    else:
        latencies = [(f.received - f.header.t_origin) * 1000 for f in received]
    span = received[-1].received - received[0].received
    return RecordStats(
        frames=len(received),
        seconds=span,
        fps=(len(received) - 1) / span if span > 0 else 0.0,
        first_frame_s=received[0].received - t_start,
        latency_ms=percentiles(latencies),
        dropped=received[-1].header.dropped,
    )


async def _feed(client: StreamClient, video: np.ndarray, fps: float, sent_at: dict[int, float]) -> None:
    """Send input frames at the stream's fps, like a camera would, then end the input."""
    t0 = time.time()
    for i, frame in enumerate(video):
        await asyncio.sleep(max(0.0, t0 + i / fps - time.time()))
        sent_at[i] = time.time()
        await client.send_frame(frame)
    await client.end_input()


def record(url: str, prompt: str, output: str | Path | None = None, **kwargs) -> RecordStats:
    """`record_async` for synchronous callers."""
    return asyncio.run(record_async(url, prompt, output, **kwargs))
