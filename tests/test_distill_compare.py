"""Ablation and drift harness on shapes-bench: reports, tables and the CLI (tiny pipeline)."""

from __future__ import annotations

import copy
import json

from causvid.cli import main
from causvid.eval.shapes_bench import METRICS, default_prompt_set, run_bench
from distill.compare import ablation_table, bench, drift, drift_table

CASES = default_prompt_set(num_seen=2, num_pairs=0)[:2]


def test_drift_segments_are_consecutive_pieces_of_one_stream(tiny_pipeline):
    report = drift(tiny_pipeline, CASES, seeds=(0,), total_frames=15, segment_frames=8)
    assert report["total_frames"] == 16 and [s["start_frame"] for s in report["segments"]] == [0, 8]
    # Segment 0 is the first 8 frames of the stream, segment 1 the next 8: as one generate() call.
    first = bench(tiny_pipeline, CASES, (0,), 8)
    second = run_bench(lambda prompt, seed, n: tiny_pipeline.generate(prompt, 2 * n, seed)[n:], CASES, 8, (0,), 32, 32)
    assert report["segments"][0]["splits"] == first["splits"]
    assert report["segments"][1]["splits"] == second["splits"]
    table = drift_table(report)
    assert "| frames 0+ |" in table and "| frames 8+ |" in table


def test_ablation_table_has_a_row_per_run_and_a_column_per_metric(tiny_pipeline):
    report = bench(tiny_pipeline, CASES[:1], (0,), 5)
    lines = ablation_table({"DMD": report, "no ODE init": report}).splitlines()
    assert len(lines) == 4 and all(name in lines[0] for name in METRICS)
    assert lines[2].startswith("| DMD |") and lines[3].startswith("| no ODE init |")
    # A record from before a metric existed (e.g. travel) still tabulates, with "-" for it.
    older = copy.deepcopy(report)
    del older["splits"]["all"]["travel"]
    row = ablation_table({"older": older}).splitlines()[2].split(" | ")
    assert row[list(METRICS).index("travel") + 1] == "-"


def test_compare_and_drift_commands_print_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["distill", "compare", f"student={tiny_checkpoint}", "--teacher", str(tiny_checkpoint),
                 "--teacher-steps", "2", "--ground-truth", "--frames", "9", "--seeds", "0", "--max-cases", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["ground truth", "teacher (CFG)", "teacher, 2 steps (CFG)", "student"]
    assert summary["teacher (CFG)"] != summary["teacher, 2 steps (CFG)"]
    assert set(summary["student"]) == set(METRICS)
    assert json.loads(out.read_text())["student"]["source"] == "model"
    assert main(["distill", "compare"]) == 2  # nothing to compare

    assert main(["distill", "drift", "--checkpoint", str(tiny_checkpoint), "--frames", "16", "--segment-frames", "8",
                 "--max-cases", "1", "--device", "cpu"]) == 0
    segments = json.loads(capsys.readouterr().out)
    assert list(segments) == ["0", "8"] and set(segments["8"]) == set(METRICS)
