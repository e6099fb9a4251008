"""Everyday mistakes end in one line that names the problem and the fix; bugs keep their tracebacks."""

from __future__ import annotations

import errno
import shutil
import socket

import numpy as np
import pytest

from causvid import cli
from causvid.cli import main
from causvid.errors import UserError
from causvid.video_io import read_video, write_video
from stream.protocol import Limits, ProtocolError, parse_message
from stream.server import ServerConfig, ServerThread, bind_error


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"causvid {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    with ServerThread(tiny_pipeline, ServerConfig(port=0)) as running:
        yield running.server


def test_serve_on_a_busy_port_a_bad_port_or_an_unknown_host(tiny_checkpoint, capsys):
    base = ["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line_error(capsys, [*base, "--port", str(port)], f"127.0.0.1:{port}", "in use", "--port")
    _one_line_error(capsys, [*base, "--port", "99999"], "--port must be 0-65535")
    _one_line_error(capsys, [*base, "--host", "no-such-host.invalid", "--port", "0"], "cannot resolve host")


def test_bind_errors_name_the_fix():
    assert "ports below 1024 need privileges" in bind_error("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied"))
    assert "not an address of this machine" in bind_error("10.9.9.9", 80, OSError(errno.EADDRNOTAVAIL, "Cannot assign"))


def test_client_without_a_server_or_with_a_wrong_url(tmp_path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    out = str(tmp_path / "out.mp4")
    _one_line_error(capsys, ["client", f"ws://127.0.0.1:{port}/ws", "--prompt", "x", "-o", out],
                    "cannot connect", "causvid serve")
    _one_line_error(capsys, ["client", f"http://127.0.0.1:{port}/ws", "--prompt", "x", "-o", out], "ws://")


def test_client_input_mistakes(server, tmp_path, capsys):
    url = server.ws_url
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    _one_line_error(capsys, ["client", url, "--prompt", "x", "--image", str(not_image), "-o", str(tmp_path / "o.mp4")],
                    "notes.png", "cannot decode image")
    _one_line_error(capsys, ["client", url, "--prompt", "x", "-o", str(tmp_path / "no" / "such" / "o.mp4")],
                    str(tmp_path / "no" / "such"), "does not exist")
    _one_line_error(capsys, ["client", url, "--prompt", "x"], "-o", "--no-output")
    _one_line_error(capsys, ["client", url, "--prompt", "   ", "--no-output"], "prompt is empty")


def test_client_shows_a_server_error_as_one_line(server, capsys):
    # The client accepts any --steps; the server allows 1-8 and answers with an error event.
    _one_line_error(capsys, ["client", server.ws_url, "--prompt", "a red circle", "--steps", "50", "--no-output"],
                    "the server reported bad_message", "steps")


def test_client_video_to_video_records_every_input_frame(server, tmp_path, capsys):
    source, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_video(source, np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8), fps=16)
    assert main(["client", server.ws_url, "--prompt", "a red circle", "--video", str(source), "-o", str(out),
                 "--pacing", "fast"]) == 0
    assert read_video(out).shape[0] == 40  # not the t2v default of 33


def test_generate_validates_prompts_as_the_server_does(tiny_checkpoint, tmp_path, capsys):
    base = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "-o", str(tmp_path / "x.npy"), "--frames", "5"]
    _one_line_error(capsys, ["generate", "", *base], "prompt is empty")
    _one_line_error(capsys, ["generate", "x" * 10_000, *base], "10000 characters", "limit is 500")
    with pytest.raises(ProtocolError) as refused:
        parse_message('{"type": "start", "prompt": ""}', Limits())
    assert refused.value.code == "bad_prompt"


def test_a_device_this_build_lacks(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _one_line_error(capsys, ["generate", "a red circle", "-o", str(tmp_path / "x.npy"), "--checkpoint",
                             str(tiny_checkpoint), "--device", "cuda"], "'cuda' is not available", "use cpu")
    _one_line_error(capsys, ["info", "--checkpoint", str(tiny_checkpoint), "--device", "tpu9"], "unknown device")


def test_the_student_loads_without_reading_a_corrupt_teacher(tiny_checkpoint, tmp_path, capsys):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "teacher" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "x.npy"
    assert main(["generate", "a red circle", "-o", str(out), "--frames", "5", "--checkpoint", str(copy),
                 "--device", "cpu"]) == 0
    _one_line_error(capsys, ["generate", "a red circle", "-o", str(out), "--frames", "5", "--teacher", "--steps", "2",
                             "--checkpoint", str(copy), "--device", "cpu"], "teacher")


def test_a_prompt_switch_may_ask_for_a_cut_or_a_recache_as_booleans():
    switch = parse_message('{"type": "prompt", "prompt": "a blue square", "cut": true}', Limits())
    assert (switch.cut, switch.recache) == (True, None)
    with pytest.raises(ProtocolError) as refused:
        parse_message('{"type": "prompt", "prompt": "a blue square", "cut": "yes"}', Limits())
    assert "cut" in str(refused.value)


def test_deeply_nested_json_is_bad_json_not_a_crash():
    with pytest.raises(ProtocolError) as refused:
        parse_message("[" * 50_000 + "]" * 50_000, Limits())
    assert refused.value.code == "bad_json"


def test_an_internal_bug_keeps_its_traceback(monkeypatch, tiny_checkpoint):
    def broken(args):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(cli, "_info", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["info", "--checkpoint", str(tiny_checkpoint)])
    assert issubclass(UserError, ValueError)  # library callers that catch ValueError still do


def test_every_option_has_help():
    import argparse

    for parser in cli.subcommand_parsers(cli.build_parser()):
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest} has no help"
