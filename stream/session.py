"""One client's stream as the event loop sees it: controls in, a bounded outbox out, a clock.

`Session` lives on the event loop. The model state (`StreamState`) lives on the engine's
model thread; the two meet only when the engine hands the session's pending controls to the
model thread and delivers the resulting block back here, so neither side needs locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from stream.state import StreamState, BlockOutput
from stream.protocol import FrameHeader, PromptSwitch, StartRequest, error_event, event, pack_frame


@dataclass
class OutFrame:
    send_at: float  # wall-clock time the pacer wants it sent (0: at once)
    header: FrameHeader
    jpeg: bytes


class Outbox:
    """What a connection has to send, bounded however slow the client is.

    Two lanes: replies to the client's own messages (errors, acks) go out first; the stream's
    frames and the events that belong between them (status, prompt applied, done) go out in
    order, each frame at its pacing slot. Past `max_frames` queued frames the oldest frame is
    dropped and counted; past `max_events` queued events of a lane, the oldest event.
    """

    def __init__(self, max_frames: int = 32, max_events: int = 64):
        self.replies: deque[str] = deque()
        self.stream: deque[OutFrame | str] = deque()
        self.max_frames = max_frames
        self.max_events = max_events
        self.dropped = 0
        self._frames = 0
        self._changed = asyncio.Event()

    @property
    def queued_frames(self) -> int:
        return self._frames

    def put_frame(self, frame: OutFrame) -> None:
        self.stream.append(frame)
        self._frames += 1
        if self._frames > self.max_frames:
            self._drop_first(OutFrame)
            self._frames -= 1
            self.dropped += 1
        self._changed.set()

    def put_event(self, message: str, in_stream: bool = False) -> None:
        """Queue a JSON event: a reply (default) or a stream event ordered with the frames."""
        lane = self.stream if in_stream else self.replies
        lane.append(message)
        if in_stream and len(self.stream) - self._frames > self.max_events:
            self._drop_first(str)
        elif not in_stream and len(self.replies) > self.max_events:
            self.replies.popleft()
        self._changed.set()

    def _drop_first(self, kind: type) -> None:
        for i, item in enumerate(self.stream):
            if isinstance(item, kind):
                del self.stream[i]
                return

    def clear_stream(self) -> None:
        """A new stream starts: forget the old one's frames, events and drop count."""
        self.stream.clear()
        self._frames = 0
        self.dropped = 0

    async def next_message(self) -> str | bytes:
        """The next message to send: replies first, then the stream in order, paced."""
        while True:
            delay = None
            if self.replies:
                return self.replies.popleft()
            if self.stream:
                item = self.stream[0]
                if isinstance(item, str):
                    return self.stream.popleft()
                delay = item.send_at - time.time()
                if delay <= 0:
                    self.stream.popleft()
                    self._frames -= 1
                    return pack_frame(replace(item.header, dropped=self.dropped), item.jpeg)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), delay)
            except TimeoutError:
                pass


class Pacer:
    """A stream's clock: output frame i is due at t0 + i / fps (realtime), or at once (fast).

    If generation falls behind, the clock is moved rather than letting the stream burst to
    catch up: a late block's first frame becomes due now.
    """

    def __init__(self, fps: float, realtime: bool):
        self.fps = fps
        self.realtime = realtime
        self.t0: float | None = None

    def slot(self, index: int) -> float:
        return 0.0 if not self.realtime or self.t0 is None else self.t0 + index / self.fps

    def wants_block(self, next_index: int, lookahead_s: float, now: float) -> bool:
        """Start the next block once its first frame is due within `lookahead_s`."""
        return not self.realtime or self.t0 is None or self.slot(next_index) - now < lookahead_s

    def on_block(self, first_index: int, now: float) -> None:
        if self.realtime and (self.t0 is None or self.slot(first_index) < now):
            self.t0 = now - first_index / self.fps


@dataclass
class Controls:
    """What the client asked for since the model thread last saw this session."""

    switch: PromptSwitch | None = None
    inputs: list[np.ndarray] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    end_input: bool = False


class Session:
    """One stream: its request, pending controls, clock and the connection's outbox."""

    def __init__(self, session_id: str, request: StartRequest, outbox: Outbox, fps: float,
                 block_seconds: float, max_pending_inputs: int = 64):
        self.id = session_id
        self.request = request
        self.outbox = outbox
        # v2v is paced by its input: each output frame goes out as soon as it exists.
        self.pacer = Pacer(request.fps or fps, realtime=request.pacing == "realtime" and request.mode != "v2v")
        self.block_seconds = block_seconds
        self.state: StreamState | None = None  # made on the model thread by the first step
        self.controls = Controls()
        self.max_pending_inputs = max_pending_inputs
        self._input_space = asyncio.Event()
        self._input_space.set()
        self.busy = False  # a step for this session is on the model thread
        self.more = True  # the last step left work that needs no new input
        self.closed = False
        self.done = False
        self.frames_out = 0
        self.blocks_out = 0

    # -- from the client --------------------------------------------------------------------

    def switch_prompt(self, switch: PromptSwitch) -> None:
        """Applied at the next block; a newer switch replaces one not yet applied."""
        self.controls.switch = switch

    async def add_input(self, image: np.ndarray, arrival: float) -> None:
        """v2v: queue an input frame; waits while the model thread is behind (backpressure)."""
        await self._input_space.wait()
        self.controls.inputs.append(image)
        self.controls.arrivals.append(arrival)
        if len(self.controls.inputs) >= self.max_pending_inputs:
            self._input_space.clear()

    def end_input(self) -> None:
        self.controls.end_input = True

    # -- for the engine ---------------------------------------------------------------------

    def wants_block(self, now: float) -> bool:
        if self.closed or self.done or self.busy:
            return False
        if self.request.mode == "v2v":
            c = self.controls
            return bool(c.inputs or c.switch or c.end_input or self.more)
        return self.pacer.wants_block(self.frames_out, self.block_seconds, now)

    def next_due(self, now: float) -> float | None:
        """When a realtime stream will next want a block (for the engine's sleep)."""
        if self.closed or self.done or self.busy or not self.pacer.realtime or self.pacer.t0 is None:
            return None
        return self.pacer.slot(self.frames_out) - self.block_seconds

    def take_controls(self) -> Controls:
        controls, self.controls = self.controls, Controls()
        self._input_space.set()
        return controls

    def deliver(self, out: BlockOutput) -> None:
        """Queue part of a block on the connection's outbox: its frames and events, or its end."""
        if out.jpegs:
            self.pacer.on_block(out.first_index, time.time())
        for kind, fields in out.events:
            self.outbox.put_event(event(kind, session=self.id, **fields), in_stream=True)
        for i, (jpeg, origin) in enumerate(zip(out.jpegs, out.t_origin)):
            index = out.first_index + i
            header = FrameHeader(index, out.block, 0, origin, out.t_ready)
            self.outbox.put_frame(OutFrame(self.pacer.slot(index), header, jpeg))
        self.frames_out = out.first_index + len(out.jpegs)
        if out.block_end:
            self.blocks_out = out.block + 1
            status = {"frames": self.frames_out, "blocks": self.blocks_out, "dropped": self.outbox.dropped,
                      "cached_frames": out.cached_frames}
            self.outbox.put_event(event("status", session=self.id, **status), in_stream=True)
        self.more = out.more
        if out.done:
            self.done = True
            self.outbox.put_event(event("done", session=self.id, frames=self.frames_out, dropped=self.outbox.dropped),
                                  in_stream=True)

    def fail(self, code: str, message: str) -> None:
        """End the stream with an error; the connection stays open for a new start."""
        self.done = True
        self.outbox.put_event(error_event(code, message), in_stream=True)
