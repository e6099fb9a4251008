"""Word probe: captions with one attribute named wrongly, and the loss gap each one causes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from causvid.data.shapes import ObjectSpec, SceneSpec, canonical_caption
from causvid.eval.shapes_bench import BenchCase
from causvid.eval.word_probe import ATTRIBUTES, misnamed, probe_words

PAIR = SceneSpec("black", (ObjectSpec("circle", "red", "small", "left"), ObjectSpec("square", "blue", "large", "still")))
STILL = SceneSpec("gray", (ObjectSpec("triangle", "white", "large", "still"),))


def _changed(before: SceneSpec, after: SceneSpec) -> set[str]:
    fields = {"background"} if before.background != after.background else set()
    for old, new in zip(before.objects, after.objects):
        fields |= {f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)}
    return fields


def test_misnamed_changes_one_attribute_of_the_first_object_and_keeps_the_scene_valid():
    expected = {"colour": "colour", "shape": "shape", "size": "size", "motion": "motion", "direction": "motion",
                "background": "background"}
    for attribute in ATTRIBUTES:
        wrong = misnamed(PAIR, attribute)
        assert _changed(PAIR, wrong) == {expected[attribute]}
        assert wrong.objects[1] == PAIR.objects[1]
    assert misnamed(PAIR, "direction").objects[0].motion == "right"
    assert misnamed(PAIR, "motion").objects[0].motion == "still"
    assert misnamed(STILL, "motion").objects[0].motion == "bouncing"
    assert misnamed(STILL, "direction") is None  # a still object has no direction to reverse
    # White on gray: the next background, white, would hide the object, so it is skipped.
    assert misnamed(STILL, "background").background == "black"
    with pytest.raises(ValueError, match="unknown attribute"):
        misnamed(PAIR, "speed")


class _TextBlind(torch.nn.Module):
    """A denoiser that is handed an empty prompt whatever the caption says."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x, sigma, text, causal=False):
        return self.denoiser(x, sigma, torch.zeros_like(text), causal=causal)


def test_probe_finds_no_gap_for_a_model_blind_to_text_and_gaps_for_one_that_reads_it(tiny_pipeline):
    cases = [BenchCase(scene, canonical_caption(scene), "seen") for scene in (PAIR, STILL)]
    pipe = tiny_pipeline
    kwargs = dict(cases=cases, sigmas=(0.5, 0.9), clips_per_case=2, num_frames=5,
                  height=pipe.config.height, width=pipe.config.width)
    blind = probe_words(_TextBlind(pipe.teacher), pipe.text_encoder, pipe.autoencoder, **kwargs)
    reading = probe_words(pipe.teacher, pipe.text_encoder, pipe.autoencoder, **kwargs)
    for report in (blind, reading):
        assert set(report["gap_percent"]) == set(ATTRIBUTES)
        assert report["clips_per_attribute"]["direction"] == 2  # only PAIR's first object has a direction
        assert report["clips_per_attribute"]["colour"] == 4
        json.dumps(report)
    # Batches of different sizes round differently, so "no gap" means below 0.001%.
    assert all(abs(gap) < 1e-3 for gaps in blind["gap_percent"].values() for gap in gaps.values())
    assert all(abs(gap) > 1e-3 for gaps in reading["gap_percent"].values() for gap in gaps.values())


def test_eval_command_runs_the_word_probe(tiny_checkpoint, tmp_path, capsys):
    from causvid.cli import main

    out = tmp_path / "probe.json"
    for flags in (["--teacher"], []):
        assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--word-probe", *flags, "--frames", "5",
                     "--num-seen", "2", "--device", "cpu", "-o", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["causal"] == (not flags) and set(report["gap_percent"]) == set(ATTRIBUTES)
    assert "direction" in capsys.readouterr().out
