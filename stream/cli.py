"""`causvid serve`, `causvid client`, `causvid bench stream` and `causvid bench live` (registered through setup.cfg)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

from causvid.cli import add_checkpoint_args
from causvid.errors import UserError
from causvid.eval.long_bench import ABLATIONS, METHODS
from causvid.text import check_prompt
from stream.client import SWITCH_MODES

# Frames a text- or image-to-video recording keeps by default; video-to-video follows its input.
DEFAULT_CLIENT_FRAMES = 33


def _serve(args: argparse.Namespace) -> None:
    from causvid.pipeline import load_pipeline
    from stream.protocol import Limits
    from stream.server import ServerConfig

    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535 (0 picks a free port), got {args.port}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pipe = load_pipeline(args.checkpoint, args.device, with_teacher=False)
    config = ServerConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, token=args.token, model_threads=args.threads,
        allowed_origins=tuple(args.allow_origin), max_queue_frames=args.max_queue_frames,
        batching=not args.no_batching, limits=Limits(max_message_bytes=args.max_message_bytes),
    )
    asyncio.run(_serve_until_signal(pipe, config))


async def _serve_until_signal(pipe, config) -> None:
    from stream.server import StreamServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with StreamServer(pipe, config) as server:
        print(f"serving on {server.url} (websocket {server.ws_url})", flush=True)
        await stop.wait()
        print("shutting down", flush=True)


def _client(args: argparse.Namespace) -> None:
    from stream.client import record
    from stream.protocol import Limits, ProtocolError, decode_image

    if args.output is None and not args.no_output:
        raise UserError("give -o OUT.mp4 to record the stream, or --no-output to only measure it")
    if args.output is not None:
        if args.output.suffix.lower() != ".mp4":
            raise UserError(f"{args.output}: the client records .mp4")
        if not args.output.parent.is_dir():
            raise UserError(f"{args.output}: folder {args.output.parent} does not exist; create it first")
    image = video = None
    if args.image is not None:
        if not args.image.is_file():
            raise UserError(f"{args.image}: file not found")
        try:
            image = decode_image(args.image.read_bytes(), Limits())
        except ProtocolError as error:
            raise UserError(f"{args.image}: {error}") from None
    if args.video is not None:
        from causvid.video_io import read_video

        video = read_video(args.video)[: args.frames]
    switch = (args.switch_at[0], args.switch_at[1]) if args.switch_at else None
    options = {k: v for k, v in (("steps", args.steps), ("strength", args.strength)) if v is not None}
    with _server_errors(args.url):
        stats = record(
            args.url, check_prompt(args.prompt), args.output, frames=args.frames or DEFAULT_CLIENT_FRAMES,
            seed=args.seed, switch_at=switch, switch_mode=args.switch_mode, image=image, video=video, token=args.token,
            pacing=args.pacing, **options,
        )
    if args.output is not None:
        print(f"wrote {args.output}: {stats.frames} frames")
    latency = stats.latency_ms
    print(f"{stats.frames} frames, {stats.fps:.1f} fps, first frame after {stats.first_frame_s * 1000:.0f} ms, "
          f"latency p50 {latency['p50']:.0f} ms p95 {latency['p95']:.0f} ms, dropped {stats.dropped}")


@contextlib.contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """What goes wrong between the client and a server, as one line each."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    from stream.client import StreamError

    try:
        yield
    except InvalidURI:
        raise UserError(f"{url}: not a websocket URL; use ws://HOST:PORT/ws (wss:// behind TLS)") from None
    except InvalidHandshake as error:
        raise UserError(f"{url}: the server refused the connection ({error})") from None
    except StreamError as error:
        raise UserError(f"the server reported {error}") from None
    except ConnectionClosed as error:
        raise UserError(f"{url}: the server closed the connection ({error})") from None
    except TimeoutError:
        raise UserError(f"{url}: the server stopped answering (timed out)") from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot connect to {url}: {reason}; is `causvid serve` running there?") from None


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _bench_stream(args: argparse.Namespace) -> None:
    from stream.bench import run_stream_bench

    _set_threads(args.threads)
    record = run_stream_bench(
        args.checkpoint, args.device, seconds=args.seconds, single_seconds=args.single_seconds, clients=tuple(args.clients),
        teacher_frames=args.teacher_frames, prompts=args.prompt or None, server_threads=args.server_threads,
    )
    print(json.dumps(record))


def _bench_real(args: argparse.Namespace) -> None:
    from stream.real_bench import run_real_bench

    _set_threads(args.threads)
    record = run_real_bench(args.preset, args.device, args.blocks, tuple(args.variant or ["sdpa"]))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def _bench_live(args: argparse.Namespace) -> None:
    from stream.live_bench import run_live_bench

    _set_threads(args.threads)
    record = run_live_bench(
        args.checkpoint, args.device, seconds=args.seconds, switch_seconds=args.switch_seconds,
        i2v_seconds=args.i2v_seconds, segment_seconds=args.segment_seconds, num_long=args.streams, seed=args.seed,
        switch=args.switch, sheet=args.sheet,
    )
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def _bench_long(args: argparse.Namespace) -> None:
    from causvid.eval.long_bench import format_table, run_long_bench
    from causvid.eval.shapes_bench import default_prompt_set
    from causvid.pipeline import load_pipeline

    _set_threads(args.threads)
    pipe = load_pipeline(args.checkpoint, args.device)
    cases = [case for case in default_prompt_set(args.cases, seed=0, num_pairs=args.pairs) if case.split == "seen"]
    record = run_long_bench(pipe, cases, args.chunks, args.seeds, args.method or METHODS,
                            args.teacher_max_chunks, args.steps, args.sheet)
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2))
    if args.table is not None:
        args.table.write_text(format_table(record) + "\n")
    print(json.dumps(record))


class _SwitchAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, (int(values[0]), values[1]))
        except ValueError:
            parser.error(f"{option_string} takes a frame number and a prompt, got {values[0]!r}")


def register(subparsers) -> None:
    """Add serve, client and bench (stream, real, live and long)."""
    serve = subparsers.add_parser("serve", help="serve live generation over websockets, with a web page")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--max-sessions", type=int, default=4, help="concurrent clients; more are refused")
    serve.add_argument("--token", default=None, help="require this token (?token= or an auth message)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser pages from this origin too (repeatable; '*' for any)")
    serve.add_argument("--max-queue-frames", type=int, default=32, help="frames queued per client before dropping")
    serve.add_argument("--max-message-bytes", type=int, default=2 * 2**20, help="largest client message accepted")
    serve.add_argument("--no-batching", action="store_true", help="one forward pass per stream")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for the model (default: all cores but one, left to the event loop)")
    add_checkpoint_args(serve)
    serve.set_defaults(func=_serve)

    client = subparsers.add_parser("client", help="record a stream from a server into an mp4")
    client.add_argument("url", help="ws://HOST:PORT/ws")
    client.add_argument("--prompt", required=True, help="what the stream shows")
    client.add_argument("-o", "--output", type=Path, default=None, help="record the stream into this .mp4")
    client.add_argument("--no-output", action="store_true", help="record nothing, only print the stream's statistics")
    client.add_argument("--frames", type=int, default=None,
                        help=f"frames to record (default: {DEFAULT_CLIENT_FRAMES}; v2v: every input frame, or the first N)")
    client.add_argument("--seed", type=int, default=0, help="noise seed")
    client.add_argument("--switch-at", nargs=2, metavar=("FRAME", "PROMPT"), action=_SwitchAction, default=None,
                        help="switch to PROMPT once FRAME frames have arrived")
    client.add_argument("--switch-mode", choices=tuple(SWITCH_MODES), default=None,
                        help="the switch keeps the KV cache, re-caches it under the new prompt, or cuts to a new "
                             "stream (default: the server's model's)")
    client.add_argument("--image", type=Path, default=None, help="image to video from this image")
    client.add_argument("--video", type=Path, default=None, help="video to video from this file")
    client.add_argument("--strength", type=float, default=None, help="v2v noise level (default 0.5)")
    client.add_argument("--steps", type=int, default=None, help="student steps per block (default: the server's)")
    client.add_argument("--pacing", choices=("realtime", "fast"), default="realtime",
                        help="realtime: the server paces frames at the video's fps; fast: as soon as made")
    client.add_argument("--token", default=None, help="the server's --token, if it has one")
    client.set_defaults(func=_client)

    bench = subparsers.add_parser("bench", help="benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    stream = benches.add_parser("stream", help="end-to-end streaming benchmark (one JSON record)")
    stream.add_argument("--seconds", type=float, default=10.0, help="length of each measured stream")
    stream.add_argument("--single-seconds", type=float, default=None,
                        help="length of the one-client stream (first frame, latency, flatness; default: --seconds)")
    stream.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="concurrency levels")
    stream.add_argument("--teacher-frames", type=int, default=81,
                        help="clip length for student vs teacher (81: Wan's 5 s clip)")
    stream.add_argument("--prompt", action="append", default=[], help="prompts (repeatable)")
    stream.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the direct student and teacher runs (default: torch's choice)")
    stream.add_argument("--server-threads", type=int, default=None,
                        help="the server's torch threads (default: one fewer, as `causvid serve` does)")
    add_checkpoint_args(stream)
    stream.set_defaults(func=_bench_stream)

    real = benches.add_parser("real", help="the streaming loop at Wan2.1-1.3B's size (480x832) on random weights")
    real.add_argument("--preset", choices=("wan-1.3b", "tiny"), default="wan-1.3b",
                      help="model size: Wan2.1-T2V-1.3B's, or a tiny one that runs the same code on a CPU")
    real.add_argument("--blocks", type=int, default=8, help="blocks of 3 latent frames (12 video frames) streamed")
    real.add_argument("--variant", action="append", choices=("sdpa", "flash", "compile"), default=None,
                      help="measure these (repeatable): SDPA's default kernels, its flash kernel, torch.compile "
                           "(default: sdpa)")
    real.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    real.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    real.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    real.set_defaults(func=_bench_real)

    live = benches.add_parser("live", help="long streams, switch chains and image-to-video, judged per segment")
    live.add_argument("--seconds", type=float, default=600.0, help="length of each single-prompt stream")
    live.add_argument("--streams", type=int, default=2, help="how many single-prompt streams (1-4)")
    live.add_argument("--switch-seconds", type=float, default=6.0, help="time on each prompt of the switch chain")
    live.add_argument("--i2v-seconds", type=float, default=20.0, help="length of each image-to-video stream")
    live.add_argument("--segment-seconds", type=float, default=10.0, help="scored segment length")
    live.add_argument("--seed", type=int, default=0, help="noise seed of every stream")
    live.add_argument("--switch", choices=tuple(SWITCH_MODES), default=None,
                      help="the chain's switches keep the KV cache, re-cache it under the new prompt, or cut to a "
                           "new stream (default: the model's switch_recache / switch_cut)")
    live.add_argument("--sheet", type=Path, default=None, help="write a contact sheet (PNG) here")
    live.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    live.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_checkpoint_args(live)
    live.set_defaults(func=_bench_live)

    long = benches.add_parser("long", help="long videos: full-attention teacher, parallel chunks, VIN, causal student")
    long.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16], help="video lengths, in chunks")
    long.add_argument("--cases", type=int, default=4, help="seen single-object scenes")
    long.add_argument("--pairs", type=int, default=2, help="seen two-object scenes (colours that must not swap)")
    long.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds of every case")
    long.add_argument("--method", action="append", choices=METHODS + ABLATIONS, default=None,
                      help=f"measure these (repeatable; default: {', '.join(METHODS)})")
    long.add_argument("--teacher-max-chunks", type=int, default=16,
                      help="longest video the full-attention teacher runs (its cost grows with the square)")
    long.add_argument("--steps", type=int, default=None, help="steps of the bidirectional methods (default: the teacher's)")
    long.add_argument("--sheet", type=Path, default=None, help="write a contact sheet (PNG) of the longest videos here")
    long.add_argument("--table", type=Path, default=None, help="also write a markdown table here")
    long.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    long.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_checkpoint_args(long)
    long.set_defaults(func=_bench_long)
