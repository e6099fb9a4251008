"""`causvid bench live`: the per-frame judge on ground truth, and a whole run through the server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from causvid.data.shapes import (
    SWITCH_ATTRIBUTES,
    block_first_frame,
    is_held_out,
    render_clip,
    render_segments,
)
from causvid.errors import UserError
from causvid.eval.shapes_bench import frame_checks
from stream.live_bench import (
    LONG_SCENES,
    SWITCH_CHAIN,
    hold_frame,
    run_live_bench,
    segment_scores,
    switch_chain,
)


def test_the_switch_chain_changes_one_attribute_at_a_time_through_valid_seen_scenes():
    scenes = switch_chain(LONG_SCENES[0])
    assert len(scenes) == 9 and {attribute for attribute, _ in SWITCH_CHAIN} == set(SWITCH_ATTRIBUTES)
    for before, after in zip(scenes, scenes[1:]):
        changed = (before.background != after.background) + sum(
            getattr(before.objects[0], name) != getattr(after.objects[0], name) for name in ("colour", "shape", "motion")
        )
        assert changed == 1 and not any(is_held_out(obj) for obj in after.objects)


def test_ground_truth_streams_score_full_marks_and_no_artefacts():
    scene = LONG_SCENES[0]  # a large red circle moving right: it wraps around in 160 frames
    frames = render_clip(scene, 321, 64, 64, np.random.default_rng(0))
    for segment in segment_scores(frames, scene, 160):
        assert segment["colour"] == segment["direction"] == 1.0 and segment["artefact_frames"] == 0
        assert segment["shape"] > 0.95 and segment["background_consistency"] > 0.95
    noisy = frames.copy()
    noisy[100:110] = np.random.default_rng(1).integers(0, 256, noisy[100:110].shape, dtype=np.uint8)
    artefact = frame_checks(noisy, scene)["artefact"]
    assert artefact[100:110].all() and artefact.sum() == 10
    assert segment_scores(noisy, scene, 160)[0]["artefact_frames"] == 10  # what the bench counts


def test_a_ground_truth_switch_holds_at_once_and_the_old_scene_never_does():
    before, after = switch_chain(LONG_SCENES[0])[:2]  # black -> white background
    first = block_first_frame(3, 3)
    frames = render_segments([(before, 0), (after, first)], 93, 64, 64, np.random.default_rng(0))
    assert hold_frame(frames[first:], after) == 0
    assert hold_frame(frames[first:], before) is None
    # A stream that keeps the old scene for two blocks, then cuts over, holds after those blocks.
    late = render_segments([(before, 0), (after, first + 24)], 93, 64, 64, np.random.default_rng(0))
    assert hold_frame(late[first:], after) == 24


def test_a_live_run_through_the_server(tiny_checkpoint, tmp_path):
    sheet = tmp_path / "live.png"
    record = run_live_bench(tiny_checkpoint, "cpu", seconds=2.0, switch_seconds=2.0, i2v_seconds=2.0,
                            segment_seconds=1.0, num_long=1, sheet=sheet)
    json.dumps(record, allow_nan=False)
    fps, k = record["config"]["fps"], record["config"]["block_frames"]
    assert len(record["long"]) == 1 and record["long"][0]["frames"] >= 2 * fps
    assert len(record["long"][0]["segments"]) == 2 and len(record["i2v"]) == 2
    switches = record["switch_chain"]["switches"]
    assert len(switches) == len(SWITCH_CHAIN)
    blocks = [s["block"] for s in switches]
    assert blocks == sorted(set(blocks)) and all(s["first_frame"] == block_first_frame(s["block"], k) for s in switches)
    # Each prompt runs at least switch_seconds before the next switch is sent.
    assert all(b - a >= fps for a, b in zip([0] + [s["first_frame"] for s in switches],
                                            [s["first_frame"] for s in switches]))
    assert record["switch"] == "recache" and sheet.exists()  # the tiny preset's switch_recache
    assert set(record["summary"]) == {"long", "i2v", "switch_chain"}
    chain = record["summary"]["switch_chain"]
    for name in ("colour", "shape"):
        assert chain["mean"][name] == pytest.approx(sum(s[name] for s in switches) / len(switches))
        assert chain["mean_fresh"][name] == pytest.approx(sum(s["fresh"][name] for s in switches) / len(switches))
    with pytest.raises(ValueError, match="segment_seconds"):
        run_live_bench(tiny_checkpoint, "cpu", seconds=1.0, segment_seconds=2.0)
    with pytest.raises(ValueError, match="switch_seconds"):
        run_live_bench(tiny_checkpoint, "cpu", seconds=1.0, switch_seconds=0.5, segment_seconds=1.0)


def test_cut_switches_restart_the_stream_and_are_found_where_they_applied(tiny_checkpoint):
    record = run_live_bench(tiny_checkpoint, "cpu", seconds=1.0, switch_seconds=2.0, i2v_seconds=1.0,
                            segment_seconds=1.0, num_long=1, switch="cut")
    k = record["config"]["block_frames"]
    switches = record["switch_chain"]["switches"]
    assert record["switch"] == "cut" and len(switches) == len(SWITCH_CHAIN)
    # A cut's first block starts with a lone frame, as a stream's first: 3 frames fewer than a
    # block, so each switch starts 3 frames earlier per cut before it.
    assert [s["first_frame"] for s in switches] == [block_first_frame(s["block"], k) - 3 * j
                                                     for j, s in enumerate(switches)]
    with pytest.raises(UserError, match="unknown switch"):
        run_live_bench(tiny_checkpoint, "cpu", switch="reset")
