"""Memory per GPU of distillation: the live-bytes counter and the measured DMD step on the meta device."""

from __future__ import annotations

import pytest
import torch

from causvid.presets import PRESETS
from distill.memory import GIB, LiveBytes, measure_dmd_step


def test_live_bytes_counts_what_is_created_and_freed_not_views_or_existing_tensors():
    weight = torch.empty(256, 256, device="meta")  # made outside: not counted
    with LiveBytes() as live:
        a = torch.empty(1024, 1024, device="meta")  # 4 MiB
        view = a.t()[:10]  # shares a's storage
        a.add_(1)  # in place
        b = weight @ weight.t()  # 256 KiB; the transpose is a view of a tensor made outside
        assert live.live == 4 * 2**20 + 256 * 1024
        del a, view
        assert live.live == 256 * 1024
        c = torch.empty(512, 1024, device="meta", dtype=torch.bfloat16)  # 1 MiB
    del b, c
    assert live.peak == 4 * 2**20 + 256 * 1024 and live.live == 0


def test_the_dmd_step_is_measured_stage_by_stage_and_grows_with_the_window():
    config = PRESETS["tiny"]["transformer"]
    short = measure_dmd_step(config, (4, 8, 8), text_tokens=8, window_frames=4, block_frames=2)
    long = measure_dmd_step(config, (4, 8, 8), text_tokens=8, window_frames=8, block_frames=2)
    stages = list(short["stages_gib"].values())
    assert stages == sorted(stages) and stages[0] > 0  # each stage keeps what came before
    assert short["peak_gib"] >= stages[-1]
    assert long["peak_gib"] > short["peak_gib"]  # a longer window: more cache and more graph
    assert long["peak_gib"] < 0.01  # tiny: megabytes, not gigabytes
    assert short["peak_gib"] * GIB > 1e5


def test_the_measured_step_refuses_masked_attention():
    from distill.memory import _flash_attention

    q = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="without masks"):
        _flash_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool, device="meta"))
