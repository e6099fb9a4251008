"""The engine: one model thread shared by every session, and the loop that feeds it.

The loop runs on the event loop. Each round it takes the sessions that want a block (their
pacer says so, or v2v input arrived) and hands their pending controls to the model thread in
one call. Inside that call, the blocks of streams with matching shapes are denoised as one
batch; each block's frames reach its session's outbox as each latent frame is decoded, before
the pass that commits the block to the KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from causvid.pipeline import CausVidPipeline
from stream.batching import commit, denoise, group_plans
from stream.state import StreamState, BlockOutput
from stream.protocol import StartRequest
from stream.session import Controls, Session

log = logging.getLogger("stream.engine")
T = TypeVar("T")

StepResult = tuple[StreamState | None, BlockOutput | Exception]


class Engine:
    """Schedules the blocks of all sessions onto one model thread."""

    def __init__(self, pipe: CausVidPipeline, batching: bool = True, jpeg_quality: int = 85):
        self.pipe = pipe
        self.batching = batching
        self.jpeg_quality = jpeg_quality
        # One thread, because the denoiser's attention context is per-model state (forwards must
        # not overlap), and concurrent torch forwards gain nothing on a few CPU cores anyway.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="causvid-model")
        self.sessions: dict[str, Session] = {}
        self.blocks = 0  # blocks generated, over all sessions
        self.batches = 0  # groups of blocks denoised together (== blocks without batching)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    def add(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.wake()

    def remove(self, session: Session) -> None:
        """Forget a session; a block of it still on the model thread is discarded when it returns."""
        session.closed = True
        self.sessions.pop(session.id, None)

    def wake(self) -> None:
        self._wake.set()

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run other model work (e.g. the benchmark's teacher) on the model thread, in turn."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        while True:
            now = time.time()
            due = [s for s in self.sessions.values() if s.wants_block(now)]
            if not due:
                await self._sleep(now)
                continue
            work = []
            for session in due:
                session.busy = True
                work.append((session, session.take_controls()))
            emit = self._emitter([session for session, _ in work])
            try:
                results = await self.call(self._step, [(s.state, s.request, c) for s, c in work], emit)
            finally:
                for session, _ in work:
                    session.busy = False
            for (session, _), (state, result) in zip(work, results):
                session.state = state
                if isinstance(result, Exception):
                    if not session.closed:
                        session.fail("generation_failed", f"{type(result).__name__}: {result}")
                else:
                    self._deliver(session, result)
                if session.done:
                    self.sessions.pop(session.id, None)

    def _emitter(self, sessions: list[Session]) -> Callable[[int, BlockOutput], None]:
        """For the model thread: hand session i a part now; parts arrive in the order emitted."""
        loop = asyncio.get_running_loop()
        return lambda i, part: loop.call_soon_threadsafe(self._deliver, sessions[i], part)

    @staticmethod
    def _deliver(session: Session, part: BlockOutput) -> None:
        if not session.closed:
            session.deliver(part)

    async def _sleep(self, now: float) -> None:
        """Until a session's control changes (wake) or a realtime session's next block is due."""
        deadlines = [d for s in self.sessions.values() if (d := s.next_due(now)) is not None]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    # -- on the model thread -----------------------------------------------------------------

    def _step(self, work: list[tuple[StreamState | None, StartRequest, Controls]],
              emit: Callable[[int, BlockOutput], None]) -> list[StepResult]:
        """Apply controls, then plan, denoise (batched), decode and commit one block per session.

        Decoded frames go to `emit(work index, part)` as they exist, before the commit pass;
        the result per session is its block's end, an idle step's events, or an error.
        """
        states: list[StreamState | None] = []
        results: list[BlockOutput | Exception | None] = [None] * len(work)
        plans, owners = [], []
        with torch.inference_mode():
            for i, (state, request, controls) in enumerate(work):
                try:
                    state = state or StreamState(self.pipe, request, self.jpeg_quality)
                    states.append(state)
                    self._apply(state, request, controls)
                    plan = state.plan()
                except Exception as error:  # one stream's failure must not stop the others
                    log.exception("session step failed")
                    if len(states) == i:
                        states.append(None)
                    results[i] = error
                    continue
                if plan is None:
                    results[i] = state.idle_output()
                else:
                    plans.append(plan)
                    owners.append(i)
            groups = group_plans(plans, self.batching)
            try:
                clean = denoise(plans, groups)
                for i, plan, block in zip(owners, plans, clean):
                    try:
                        for part in plan.stream.decode(block):
                            emit(i, part)
                    except Exception as error:
                        log.exception("decoding failed")
                        results[i] = error
                commit(plans, groups, clean)
            except Exception as error:
                log.exception("denoising or committing failed")
                for i in owners:
                    results[i] = error
                return list(zip(states, results))
            self.blocks += len(plans)
            self.batches += len(groups)
            for i, plan in zip(owners, plans):
                if results[i] is None:
                    results[i] = plan.stream.block_end()
        return list(zip(states, results))

    @staticmethod
    def _apply(state: StreamState, request: StartRequest, controls: Controls) -> None:
        if controls.switch is not None:
            switch = controls.switch
            blocks = request.interpolate_blocks if switch.interpolate_blocks is None else switch.interpolate_blocks
            state.switch_prompt(switch.prompt, blocks, switch.recache, switch.cut)
        if state.mode == "v2v":
            state.feed(controls.inputs, controls.arrivals)
            if controls.end_input:
                state.end_input()
