"""The websocket server: one port for the web page (HTTP), /healthz and the stream endpoint /ws.

One coroutine per connection: a receiver task validates and applies client messages, a sender
task drains the connection's outbox; whichever ends first ends the connection, and the
`finally` frees its session. Every refusal is a JSON error event; only authentication and
capacity failures close the connection.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import itertools
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.resources import files
from urllib.parse import parse_qs, urlsplit

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from causvid.errors import UserError
from causvid.pipeline import CausVidPipeline
from stream.engine import Engine
from stream.protocol import (
    Auth,
    EndInput,
    Limits,
    PromptSwitch,
    ProtocolError,
    StartRequest,
    Stop,
    check_size,
    decode_image,
    error_event,
    event,
    parse_message,
)
from stream.session import Outbox, Session


log = logging.getLogger("stream.server")

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the server runs a model for anyone who connects
    port: int = 8765  # 0: any free port
    max_sessions: int = 4  # concurrent connections; more are refused with an error event
    token: str | None = None  # required as ?token= on /ws or in a first {"type": "auth"} message
    allowed_origins: tuple[str, ...] = ()  # besides same-origin and localhost; "*" allows any
    limits: Limits = field(default_factory=Limits)
    max_queue_frames: int = 32  # per client; a slower client loses the oldest frames
    write_limit: int = 2**15  # bytes buffered in the socket's transport before the sender waits
    batching: bool = True
    jpeg_quality: int = 85
    auth_timeout_s: float = 10.0
    # torch CPU threads while serving. None: all but one, which the event loop (websocket, JPEG
    # hand-off) needs: with every core in torch, each small parallel op stalls on the thread the
    # loop preempted: half the FPS on 2 cores (`causvid bench stream --server-threads 2`).
    model_threads: int | None = None


def bind_error(host: str, port: int, error: OSError) -> str:
    """Why a server cannot listen on host:port, with the fix, as one line."""
    where = f"{host}:{port}"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host {host!r}; use an address such as 127.0.0.1"
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use; choose another --port (0 picks a free one)"
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); use a port >= 1024"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine"
    return f"cannot listen on {where}: {error.strerror or error}"


class StreamServer:
    """Serves a loaded pipeline to websocket clients. Use as `async with StreamServer(...) as server`."""

    def __init__(self, pipe: CausVidPipeline, config: ServerConfig | None = None):
        self.pipe = pipe
        self.config = config or ServerConfig()
        block = 1 + 4 * pipe.config.block_frames  # the most frames one block queues at once
        if self.config.model_threads is not None and self.config.model_threads < 1:
            raise UserError(f"model_threads must be >= 1, got {self.config.model_threads}")
        if self.config.max_queue_frames < block:
            raise UserError(f"max_queue_frames must hold a whole block ({block} frames), got {self.config.max_queue_frames}")
        self.engine = Engine(pipe, self.config.batching, self.config.jpeg_quality)
        self.connections: set[ServerConnection] = set()
        self._threads_before: int | None = None
        self._ids = itertools.count(1)
        self._web = {path: ((files("stream") / "web" / name).read_bytes(), kind) for path, (name, kind) in WEB_FILES.items()}
        self._server: Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> "StreamServer":
        if self.pipe.device.type == "cpu":
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.config.model_threads or max(1, self._threads_before - 1))
        self.engine.start()
        limit = self.config.limits.max_message_bytes
        try:
            self._server = await serve(
                self._handle, self.config.host, self.config.port,
                process_request=self._process_request,
                # Messages up to twice our limit are read and refused with an error event; beyond
                # that the library closes the connection (1009) without buffering them.
                max_size=2 * limit + 1024,
                max_queue=16,
                write_limit=self.config.write_limit,
                compression=None,  # JPEG does not compress; deflate would only cost CPU
            )
        except OSError as error:
            await self.close()
            raise UserError(bind_error(self.config.host, self.config.port, error)) from None
        return self


    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (1001 going away), then stop the engine."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.engine.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    @property
    def active_sessions(self) -> int:
        return len(self.engine.sessions)

    # -- HTTP --------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, query = _split(request.path)
        if path in self._web:
            body, kind = self._web[path]
            return _response(HTTPStatus.OK, body, kind)
        if path == "/healthz":
            health = {"status": "ok", "sessions": self.active_sessions, "connections": len(self.connections),
                      "max_sessions": self.config.max_sessions}
            return _response(HTTPStatus.OK, json.dumps(health).encode(), "application/json")
        if path != "/ws":
            return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        if not self._origin_allowed(request.headers):
            return _response(HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain")
        token = query.get("token", [None])[0]
        if token is not None and not self._token_ok(token):
            return _response(HTTPStatus.UNAUTHORIZED, b"bad token\n", "text/plain")
        return None

    def _origin_allowed(self, headers: Headers) -> bool:
        """Browsers send Origin: allow the page's own origin, localhost and configured ones."""
        origin = headers.get("Origin")
        if origin is None:  # not a browser
            return True
        if "*" in self.config.allowed_origins or origin in self.config.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.hostname in LOCAL_HOSTS or parts.netloc == headers.get("Host")

    def _token_ok(self, token: str) -> bool:
        return self.config.token is None or hmac.compare_digest(token.encode(), self.config.token.encode())

    # -- websocket ---------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if not await self._authenticate(ws):
            return
        if len(self.connections) >= self.config.max_sessions:
            message = f"server is full ({self.config.max_sessions} sessions); try again later"
            await ws.send(error_event("server_full", message, fatal=True))
            await ws.close(1013, "server full")
            return
        self.connections.add(ws)
        connection = _Connection(ws, Outbox(self.config.max_queue_frames))
        try:
            cfg = self.pipe.config
            connection.outbox.put_event(event(
                "hello", width=cfg.width, height=cfg.height, fps=cfg.fps, block_frames=cfg.block_frames,
                max_message_bytes=self.config.limits.max_message_bytes,
                max_prompt_chars=self.config.limits.max_prompt_chars,
            ))
            tasks = [asyncio.create_task(self._receive(connection)), asyncio.create_task(self._send(connection))]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                error = task.exception()
                if error is not None and not isinstance(error, ConnectionClosed):
                    log.error("connection failed", exc_info=error)
        finally:
            self._end_session(connection)
            self.connections.discard(ws)

    async def _authenticate(self, ws: ServerConnection) -> bool:
        """True if no token is needed or the query had it; else the first message must be auth."""
        token = _split(ws.request.path)[1].get("token", [None])[0]
        if self.config.token is None or token is not None:  # a wrong query token was refused at HTTP
            return True
        try:
            raw = await asyncio.wait_for(ws.recv(), self.config.auth_timeout_s)
            message = parse_message(raw, self.config.limits) if isinstance(raw, str) else None
        except ProtocolError:
            message = None
        except (TimeoutError, ConnectionClosed):
            await ws.close(1008, "no auth")
            return False
        if isinstance(message, Auth) and self._token_ok(message.token):
            return True
        await ws.send(error_event("unauthorized", "the first message must be {\"type\": \"auth\", \"token\": ...}", fatal=True))
        await ws.close(1008, "unauthorized")
        return False

    async def _send(self, connection: "_Connection") -> None:
        while True:
            await connection.ws.send(await connection.outbox.next_message())

    async def _receive(self, connection: "_Connection") -> None:
        outbox = connection.outbox
        async for raw in connection.ws:
            try:
                if isinstance(raw, bytes):
                    await self._on_frame(connection, raw)
                else:
                    # Off the event loop: a start message may carry an image to decode.
                    self._on_message(connection, await asyncio.to_thread(parse_message, raw, self.config.limits))
            except ProtocolError as error:
                outbox.put_event(error_event(error.code, str(error)))

    def _on_message(self, connection: "_Connection", message) -> None:
        session = connection.session
        running = session is not None and not session.done
        if isinstance(message, StartRequest):
            if running:
                raise ProtocolError("already_started", "a stream is running on this connection; send stop first")
            self._start(connection, message)
        elif isinstance(message, PromptSwitch):
            if not running:
                raise ProtocolError("not_started", "no stream is running; send start first")
            session.switch_prompt(message)
            connection.outbox.put_event(event("prompt_ack", session=session.id, prompt=message.prompt))
            self.engine.wake()
        elif isinstance(message, Stop):
            stopped = self._end_session(connection)
            connection.outbox.put_event(event("stopped", session=stopped))
        elif isinstance(message, EndInput):
            if not running or session.request.mode != "v2v":
                raise ProtocolError("wrong_mode", "end_input is only for a running v2v stream")
            session.end_input()
            self.engine.wake()
        elif isinstance(message, Auth):
            raise ProtocolError("bad_message", "already authenticated")

    def _start(self, connection: "_Connection", request: StartRequest) -> None:
        cfg = self.pipe.config
        fps = request.fps or cfg.fps
        # Frames per block after the first: each latent frame decodes to 4 pixel frames.
        block_seconds = 4 * cfg.block_frames / fps
        connection.outbox.clear_stream()
        session = Session(f"s{next(self._ids)}", request, connection.outbox, fps, block_seconds,
                          max_pending_inputs=8 * cfg.block_frames)
        connection.session = session
        self.engine.add(session)
        connection.outbox.put_event(event(
            "started", session=session.id, mode=request.mode, prompt=request.prompt, seed=request.seed,
            fps=fps, pacing="realtime" if session.pacer.realtime else "fast", width=cfg.width, height=cfg.height,
        ))

    async def _on_frame(self, connection: "_Connection", raw: bytes) -> None:
        check_size(raw, self.config.limits)
        session = connection.session
        if session is None or session.done or session.request.mode != "v2v":
            raise ProtocolError("wrong_mode", "binary input frames are only accepted by a running v2v stream")
        arrival = time.time()
        # Decoding is CPU work: keep it off the event loop (and off the model thread).
        image = await asyncio.to_thread(decode_image, raw, self.config.limits)
        if session is connection.session and not session.closed:
            await session.add_input(image, arrival)
            self.engine.wake()

    def _end_session(self, connection: "_Connection") -> str | None:
        session, connection.session = connection.session, None
        if session is None:
            return None
        self.engine.remove(session)
        connection.outbox.clear_stream()
        return session.id


class ServerThread:
    """A `StreamServer` on its own event loop in a background thread, for synchronous callers.

        with ServerThread(pipe, ServerConfig(port=0)) as running:
            running.server.url
    """

    def __init__(self, pipe: CausVidPipeline, config: ServerConfig | None = None):
        self.server = StreamServer(pipe, config)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="stream-server", daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with self.server:
                self._ready.set()
                await self._stop.wait()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

@dataclass
class _Connection:
    ws: ServerConnection
    outbox: Outbox
    session: Session | None = None


def _split(path: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(path)
    return parts.path, parse_qs(parts.query)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status.value, status.phrase, headers, body)
