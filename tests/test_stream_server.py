"""The websocket server over loopback with the tiny random-weight pipeline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stream.client import StreamClient, StreamError
from stream.protocol import Limits
from stream.server import ServerConfig, StreamServer


def run(scenario, timeout: float = 90.0):
    """Run an async scenario with a hard time bound."""
    return asyncio.run(asyncio.wait_for(scenario, timeout))


@contextlib.asynccontextmanager
async def serving(pipe, **config):
    async with StreamServer(pipe, ServerConfig(port=0, **config)) as server:
        yield server


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_t2v_stream_sends_frames_in_order_with_headers(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            assert client.hello["width"] == 32 and client.hello["block_frames"] == 2
            started = await client.start("a red circle moving right", seed=1, pacing="fast")
            assert started["mode"] == "t2v" and started["pacing"] == "fast"
            frames = await client.frames(14)
            return frames, client.events

    frames, events = run(scenario())
    assert [f.header.index for f in frames] == list(range(14))
    assert [f.header.block for f in frames] == [0] * 5 + [1] * 8 + [2]  # 1 + 4 frames, then 4 per latent frame
    assert all(f.header.t_origin <= f.header.t_ready <= f.received + 1 for f in frames)
    assert frames[0].image().shape == (32, 32, 3)
    statuses = [e for e in events if e["type"] == "status"]
    assert statuses[0]["cached_frames"] == 2 and statuses[0]["frames"] == 5


def test_realtime_pacing_follows_the_model_fps(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            await client.start("a red circle", fps=8)  # slow enough for a busy CPU to keep up
            return await client.frames(21)

    frames = run(scenario())
    span = frames[-1].received - frames[5].received  # from the second block on, frames are paced
    assert 15 / 8 * 0.8 < span < 15 / 8 * 4  # never faster than real time; slower only on a very busy CPU


def test_prompt_switch_is_acknowledged_applied_and_frames_keep_coming(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            await client.start("a red circle moving right", pacing="fast")
            await client.frames(3)
            await client.switch_prompt("a blue square bouncing on gray", interpolate_blocks=1)
            ack = await client.wait_event("prompt_ack")
            applied = await client.wait_event("prompt")
            after = await client.frames(10)
            return ack, applied, after

    ack, applied, after = run(scenario())
    assert ack["prompt"] == applied["prompt"] == "a blue square bouncing on gray"
    assert applied["interpolate_blocks"] == 1 and applied["block"] >= 1
    indices = [f.header.index for f in after]
    assert indices == list(range(indices[0], indices[0] + 10))
    assert after[0].header.block == applied["block"]  # the switch starts exactly at that block


def test_i2v_prefills_the_cache_and_streams(tiny_pipeline):
    image = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)

    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            started = await client.start("a red circle", mode="i2v", image=image, pacing="fast")
            status = await client.wait_event("status")
            frames = await client.frames(8)
            return started, status, frames

    started, status, frames = run(scenario())
    assert started["mode"] == "i2v"
    assert status["cached_frames"] == 1 + 2 and status["frames"] == 1 + 4 * 2  # image frame + one block
    assert frames[0].header.block == 1


def test_v2v_output_frames_match_input_frames(tiny_pipeline):
    inputs = np.random.default_rng(2).integers(0, 255, (11, 32, 32, 3), dtype=np.uint8)

    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            await client.start("a red circle", mode="v2v", strength=0.5)
            sent = []
            for frame in inputs:
                sent.append(time.time())
                await client.send_frame(frame)
            await client.end_input()
            frames = await client.frames(100)
            done = next(e for e in client.events if e["type"] == "done")
            return sent, frames, done

    sent, frames, done = run(scenario())
    assert [f.header.index for f in frames] == list(range(11))
    assert done["frames"] == 11
    # Each output frame's origin is its input frame's arrival at the server.
    assert all(s <= f.header.t_origin <= f.received for s, f in zip(sent, frames))


def test_bad_messages_get_error_events_and_everyone_keeps_being_served(tiny_pipeline):
    limits = Limits(max_message_bytes=64 * 1024, max_image_side=1024, max_prompt_chars=100)
    garbage = base64.b64encode(b"not an image at all").decode()
    huge = base64.b64encode(_png(2000, 1)).decode()
    cases = [
        ("{not json", "bad_json"),
        ("[" * 20_000 + "]" * 20_000, "bad_json"),  # nested past the parser's recursion limit
        ('{"type": "dance"}', "unknown_type"),
        ("[1, 2]", "bad_message"),
        ('{"type": "start", "prompt": "x", "seed": "abc"}', "bad_message"),
        ('{"type": "start", "prompt": "x", "steps": 100}', "bad_message"),
        ('{"type": "start", "prompt": "x", "mode": "x2v"}', "bad_message"),
        (json.dumps({"type": "start", "prompt": "p" * 101}), "bad_prompt"),
        (json.dumps({"type": "start", "prompt": "x", "mode": "i2v", "image": "%%%"}), "bad_image"),
        (json.dumps({"type": "start", "prompt": "x", "mode": "i2v", "image": garbage}), "bad_image"),
        (json.dumps({"type": "start", "prompt": "x", "mode": "i2v", "image": huge}), "bad_image"),
        (json.dumps({"type": "prompt", "prompt": "x", "recache": "yes"}), "bad_message"),
        (json.dumps({"type": "prompt", "prompt": "x"}), "not_started"),
        ("x" * (70 * 1024), "too_large"),
        (b"\xff\xd8 binary without a v2v stream", "wrong_mode"),
    ]

    async def scenario():
        async with serving(tiny_pipeline, limits=limits) as server:
            async with await StreamClient.connect(server.ws_url) as bystander, await StreamClient.connect(server.ws_url) as bad:
                await bystander.start("a red circle", pacing="fast")
                codes = []
                for message, _ in cases:
                    await bad.ws.send(message)
                    codes.append((await bad.wait_event("error"))["code"])
                await bad.start("a red circle", pacing="fast")
                await bad.ws.send(b"\xff\xd8 binary in a t2v stream")
                codes.append((await bad.wait_event("error"))["code"])
                await bad.send("start", prompt="again")
                codes.append((await bad.wait_event("error"))["code"])
                assert len(await bad.frames(3)) == 3  # the bad client itself still streams
                # Past twice the limit the library closes the connection (1009) without reading it.
                await bad.ws.send("x" * (3 * limits.max_message_bytes))
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await bad.recv(10.0)
                assert closed.value.rcvd.code == 1009
                before = (await bystander.frames(1))[0].header.index
                after = await bystander.frames(5)
                assert after[-1].header.index > before
                return codes

    codes = run(scenario())
    assert codes == [code for _, code in cases] + ["wrong_mode", "already_started"]


def test_max_sessions_refuses_extra_clients_politely(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline, max_sessions=1) as server:
            async with await StreamClient.connect(server.ws_url):
                with pytest.raises(StreamError) as refused:
                    await StreamClient.connect(server.ws_url)
                assert refused.value.event["code"] == "server_full" and refused.value.event["fatal"]
            await _until(lambda: not server.connections)
            async with await StreamClient.connect(server.ws_url) as client:  # room again
                assert client.hello["type"] == "hello"

    run(scenario())


def test_token_auth_by_query_or_first_message(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline, token="s3cret") as server:
            async with await StreamClient.connect(server.ws_url, token="s3cret") as client:
                assert client.hello["type"] == "hello"
            with pytest.raises(InvalidStatus) as wrong:
                await StreamClient.connect(server.ws_url, token="guess")
            assert wrong.value.response.status_code == 401
            async with connect(server.ws_url) as ws:
                await ws.send(json.dumps({"type": "auth", "token": "s3cret"}))
                assert json.loads(await ws.recv())["type"] == "hello"
            async with connect(server.ws_url) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "x"}))
                assert json.loads(await ws.recv())["code"] == "unauthorized"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 1008
            assert server.active_sessions == 0

    run(scenario())


def test_origin_checking(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline, allowed_origins=("https://app.example",)) as server:
            with pytest.raises(InvalidStatus) as refused:
                await StreamClient.connect(server.ws_url, origin="https://evil.example")
            assert refused.value.response.status_code == 403
            for origin in ("http://localhost:9999", f"http://127.0.0.1:{server.port}", "https://app.example"):
                async with await StreamClient.connect(server.ws_url, origin=origin):
                    pass

    run(scenario())


def test_disconnect_mid_stream_frees_the_session(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server:
            client = await StreamClient.connect(server.ws_url)
            await client.start("a red circle", pacing="fast")
            await client.frames(2)
            assert server.active_sessions == 1
            client.ws.transport.abort()  # no closing handshake, as when a browser tab dies
            await _until(lambda: server.active_sessions == 0 and not server.connections)
            blocks = server.engine.blocks
            await asyncio.sleep(0.5)
            assert server.engine.blocks - blocks <= 1  # at most the block in flight finished

    run(scenario())


def test_slow_client_gets_frames_dropped_and_counted(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline, max_queue_frames=9, write_limit=1024) as server:
            # A small receive buffer and queue make "not reading" hit the server quickly.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            async with await StreamClient.connect(server.ws_url, sock=sock, max_queue=1) as client:
                (connection,) = server.connections
                connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                await client.start("a red circle", pacing="fast")
                client.ws.transport.pause_reading()  # the client stops reading
                session = next(iter(server.engine.sessions.values()))
                await _until(lambda: session.outbox.dropped > 10, timeout=40)
                assert session.outbox.queued_frames <= 9  # bounded, however slow the client
                client.ws.transport.resume_reading()
                frames = await client.frames(60)
                return frames, session.outbox.dropped

    frames, dropped = run(scenario())
    indices = [f.header.index for f in frames]
    assert indices == sorted(indices) and indices[-1] - indices[0] >= len(frames)  # gaps where frames dropped
    assert frames[-1].header.dropped > 10 and frames[-1].header.dropped <= dropped


def test_concurrent_streams_are_batched(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server:
            clients = [await StreamClient.connect(server.ws_url) for _ in range(2)]
            for seed, client in enumerate(clients):
                await client.send("start", prompt="a red circle", seed=seed, pacing="fast")
            # Streams batch when their caches hold equal frame counts: at the latest once both are full.
            results = await asyncio.gather(*(client.frames(45) for client in clients))
            for client in clients:
                await client.close()
            return results, server.engine.blocks, server.engine.batches

    results, blocks, batches = run(scenario())
    assert all([f.header.index for f in frames] == list(range(45)) for frames in results)
    assert batches < blocks  # some blocks of the two streams shared forward passes
    assert not np.array_equal(results[0][-1].image(), results[1][-1].image())  # still separate streams


def test_stop_then_start_again_on_one_connection(tiny_pipeline):
    async def scenario():
        async with serving(tiny_pipeline) as server, await StreamClient.connect(server.ws_url) as client:
            await client.start("a red circle", pacing="fast", max_frames=6)
            first = await client.frames(100)  # returns at the "done" event
            assert client.events[-1]["type"] == "done" and client.events[-1]["frames"] == 6
            await client.start("a blue square", pacing="fast")
            await client.frames(2)
            stopped = await client.stop()
            await _until(lambda: server.active_sessions == 0)
            return first, stopped

    first, stopped = run(scenario())
    assert [f.header.index for f in first] == list(range(6))
    assert stopped["session"] == "s2"


def test_http_page_healthz_and_404(tiny_pipeline):
    def get(url: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()

    async def scenario():
        async with serving(tiny_pipeline) as server:
            return [await asyncio.to_thread(get, server.url + path) for path in ("/", "/app.js", "/healthz", "/nope")]

    page, script, health, missing = run(scenario())
    assert page[0] == 200 and page[1].startswith("text/html") and b'<canvas id="view"' in page[2]
    assert script[0] == 200 and b"CVF1" in script[2]
    assert health[0] == 200 and json.loads(health[2]) == {"status": "ok", "sessions": 0, "connections": 0, "max_sessions": 4}
    assert missing[0] == 404


def test_server_leaves_one_core_to_the_event_loop_and_restores_threads(tiny_pipeline):
    import torch

    async def threads_while_serving(**config) -> int:
        async with serving(tiny_pipeline, **config):
            return torch.get_num_threads()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert run(threads_while_serving()) == 1  # default: all cores but one
        assert torch.get_num_threads() == 2  # restored on close
        assert run(threads_while_serving(model_threads=2)) == 2
        torch.set_num_threads(1)
        assert run(threads_while_serving()) == 1  # never fewer than one
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="model_threads"):
        StreamServer(tiny_pipeline, ServerConfig(port=0, model_threads=0))
