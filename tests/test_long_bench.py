"""`causvid bench long`: chunk borders, the cut detector, FLOP counting, and the record."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from causvid.cli import main
from causvid.data import COLOURS, ObjectSpec, SceneSpec, render_clip
from causvid.eval.cost import PeakMemory, flop_counter
from causvid.eval.long_bench import border_cuts, border_frames
from causvid.eval.shapes_bench import BenchCase
from causvid.parallel import ChunkLayout


def test_borders_are_the_first_frames_each_chunk_owns():
    # 4 chunks of 5 after 1 context frame: chunk 1 owns latent frames 6..10, from pixel frame 21.
    assert border_frames(ChunkLayout(4, 5, 1)) == [21, 41, 61]
    assert border_frames(ChunkLayout(1, 5, 1)) == []


def _case(motion: str, objects: int = 1) -> BenchCase:
    specs = (ObjectSpec("circle", "red", "large", motion), ObjectSpec("square", "blue", "large", "still"))[:objects]
    return BenchCase(SceneSpec("black", specs), "prompt", "seen")


def test_ground_truth_has_no_cuts_and_a_splice_is_one():
    borders = border_frames(ChunkLayout(4, 5, 1))
    for motion, objects in (("right", 1), ("bouncing", 1), ("still", 2), ("down", 2)):
        case = _case(motion, objects)
        clip = render_clip(case.scene, 81, 64, 64, np.random.default_rng(1))
        # Wraps and bounces inside chunks and across borders are motion, not cuts.
        assert border_cuts(clip, case, borders) == 0, motion
        moved = np.roll(clip, 16, axis=2)  # the same scene 16 px to the right from the border on
        spliced = np.concatenate([clip[:41], moved[41:]])
        assert border_cuts(spliced, case, borders) == 1, motion
    # Two objects whose colours swap at a border: both jump.
    case = _case("still", 2)
    clip = render_clip(case.scene, 81, 64, 64, np.random.default_rng(1))
    swapped = clip.copy()
    red, blue = (clip == COLOURS["red"]).all(-1), (clip == COLOURS["blue"]).all(-1)
    assert red.any() and blue.any()
    swapped[red], swapped[blue] = COLOURS["blue"], COLOURS["red"]
    assert border_cuts(np.concatenate([clip[:21], swapped[21:]]), case, borders) == 1


def test_flops_count_attention_on_the_cpu():
    q = torch.randn(1, 2, 32, 8)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 32 * 32 * 8)  # QK^T and AV, 2 FLOPs a multiply-add


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as small:
        torch.zeros(1024).sum()
    with PeakMemory(torch.device("cpu")) as large:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        large.sample()  # now, not at the thread's next tick
        del block
    assert large.peak_mb is not None and large.peak_mb > small.peak_mb + 40


def test_bench_long_record(tmp_path, tiny_checkpoint, capsys):
    # The tiny checkpoint has no VIN: the bench runs the others; a record per chunk count and method.
    out, table = tmp_path / "long.json", tmp_path / "long.md"
    assert main(["bench", "long", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--chunks", "2", "3",
                 "--cases", "1", "--pairs", "0", "--steps", "2", "--method", "teacher", "--method", "parallel",
                 "--method", "student", "--teacher-max-chunks", "2", "--out", str(out), "--table", str(table)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(out.read_text())
    two, three = record["chunks"]["2"], record["chunks"]["3"]
    assert two["borders"] == 1 and three["borders"] == 2
    assert "skipped" in three["methods"]["teacher"]
    for method in ("teacher", "parallel", "student"):
        figures = two["methods"][method]
        assert figures["flops"] > 0 and figures["seconds_per_video"] > 0 and 0 <= figures["colour"] <= 1
        assert len(figures["cuts"]) == 1
    assert two["methods"]["teacher"]["flops_vs_teacher"] == 1.0
    assert "| 2 (" in table.read_text() and "skipped" in table.read_text()
    # At Wan2.1-1.3B's size, counted on the meta device: chunks cost less than full attention, and
    # the VIN adds to the chunks.
    wan = record["wan_1_3b_flops_per_step"]["3"]
    assert wan["latent_frames"] == 3 * 5 + 1
    assert wan["parallel"] < wan["vin"] < wan["teacher"]
