"""Word probe: how much a denoiser's prediction depends on each word of the caption.

shapes-bench scores samples; this looks one level down, at single predictions. Ground-truth
clips of the bench's scenes are encoded, noised at a fixed level, and denoised once with the
true caption and once with a caption that names one attribute wrongly: the first object's
colour, shape, size, motion (moving or not) or direction, or the background. A model that uses the word predicts worse
with the wrong one; a model that ignores it does equally well with either (gap 0). The loss
is taken on the latent cells an object covers (`latent_object_mask`), where the attributes
show; a wrong background shows there too, at the object's edges. No sampling is involved, so
a probe takes about a minute on a CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from causvid.data.masks import latent_object_mask
from causvid.data.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SceneSpec, canonical_caption, render_clip
from causvid.errors import UserError
from causvid.eval.shapes_bench import BenchCase
from causvid.models.autoencoder import VideoAutoencoder
from causvid.models.denoiser import WanDenoiser
from causvid.schedule import add_noise, velocity_target
from causvid.text import TextEncoder


ATTRIBUTES = ("colour", "shape", "size", "motion", "direction", "background")
# "motion" asks whether the object moves at all: a moving object is called still, a still one
# bouncing. "direction" asks which way, for objects with one: it names the opposite way.
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def misnamed(scene: SceneSpec, attribute: str) -> SceneSpec | None:
    """`scene` with one attribute named wrongly, or None where it does not apply ("direction"
    of an object without one).

    The attribute is the first object's colour, shape, size, motion or direction, or the
    background. Colour, shape, size and background take the next value in order that keeps
    the scene valid (colours distinct and unlike the background).
    """
    if attribute not in ATTRIBUTES:
        raise UserError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
    first, *rest = scene.objects

    def with_first(**change) -> SceneSpec:
        return dataclasses.replace(scene, objects=(dataclasses.replace(first, **change), *rest))

    if attribute == "motion":
        return with_first(motion="bouncing" if first.motion == "still" else "still")
    if attribute == "direction":
        return with_first(motion=OPPOSITE[first.motion]) if first.motion in OPPOSITE else None
    values = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "background": tuple(BACKGROUNDS)}[attribute]
    current = scene.background if attribute == "background" else getattr(first, attribute)
    start = values.index(current)
    for offset in range(1, len(values)):
        value = values[(start + offset) % len(values)]
        try:
            if attribute == "background":
                return dataclasses.replace(scene, background=value)
            return with_first(**{attribute: value})
        except ValueError:  # e.g. a colour equal to the background's
            continue
    raise UserError(f"no valid scene names {attribute} differently from {scene}")


@torch.inference_mode()
def probe_words(
    denoiser: WanDenoiser,
    text_encoder: TextEncoder,
    autoencoder: VideoAutoencoder,
    cases: Sequence[BenchCase],
    sigmas: Sequence[float] = (0.5, 0.8, 0.95),
    clips_per_case: int = 2,
    num_frames: int = 21,
    height: int = 64,
    width: int = 64,
    causal: bool = False,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Loss with the true caption and with each attribute named wrongly, per noise level.

    `causal=True` runs one forward under the block-causal mask (a student); otherwise
    bidirectional (a teacher). Returns a JSON-serialisable report whose "gap_percent" maps
    attribute -> noise level -> 100 * (loss wrong - loss true) / loss true, over the clips
    the attribute applies to.
    """
    device = next(denoiser.parameters()).device
    scenes = [case.scene for case in cases for _ in range(clips_per_case)]
    videos = torch.stack([
        torch.from_numpy(render_clip(case.scene, num_frames, height, width, np.random.default_rng([seed, i, j])))
        for i, case in enumerate(cases) for j in range(clips_per_case)
    ]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    masks = latent_object_mask(videos, autoencoder.spatial_factor)[:, None].to(device)
    dtype = next(autoencoder.parameters()).dtype
    latents = torch.cat([autoencoder.encode(videos[i : i + batch_size].to(device, dtype))
                         for i in range(0, len(videos), batch_size)]).float()
    # Per caption variant, the clips it applies to and their captions.
    variants = {"true": (list(range(len(scenes))), [canonical_caption(s) for s in scenes])}
    for attribute in ATTRIBUTES:
        wrong = [(i, misnamed(s, attribute)) for i, s in enumerate(scenes)]
        wrong = [(i, w) for i, w in wrong if w is not None]
        variants[attribute] = ([i for i, _ in wrong], [canonical_caption(w) for _, w in wrong])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    target = velocity_target(latents, noise)
    model_dtype = next(denoiser.parameters()).dtype
    # Squared error and cell count per clip, per variant and level.
    errors = {name: {} for name in variants}
    for level in sigmas:
        for name, (clips, captions) in variants.items():
            squared, cells = torch.zeros(len(scenes)), torch.zeros(len(scenes))
            for start in range(0, len(clips), batch_size):
                part = clips[start : start + batch_size]
                sigma = torch.full((len(part),), float(level), device=device)
                text = text_encoder.encode(captions[start : start + batch_size]).to(device, model_dtype)
                noisy = add_noise(latents[part], noise[part], sigma).to(model_dtype)
                velocity = denoiser(noisy, sigma, text, causal=causal).float()
                mask = masks[part].expand_as(velocity)
                squared[part] = ((velocity - target[part]).square() * mask).sum((1, 2, 3, 4)).cpu()
                cells[part] = mask.sum((1, 2, 3, 4)).float().cpu()
            errors[name][str(level)] = (squared, cells)

    def loss(name: str, level: str, clips: list[int]) -> float:
        squared, cells = errors[name][level]
        return float(squared[clips].sum() / cells[clips].sum())

    gaps, losses = {}, {}
    for attribute in ATTRIBUTES:
        clips = variants[attribute][0]
        if not clips:
            continue
        losses[attribute] = {level: {"true": loss("true", level, clips), "wrong": loss(attribute, level, clips)}
                             for level in errors["true"]}
        gaps[attribute] = {level: 100 * (v["wrong"] - v["true"]) / v["true"] for level, v in losses[attribute].items()}
    return {
        "sigmas": [float(s) for s in sigmas],
        "clips": len(scenes),
        "clips_per_attribute": {a: len(variants[a][0]) for a in gaps},
        "num_frames": num_frames,
        "causal": causal,
        "loss": losses,
        "gap_percent": gaps,
    }


def format_probe(report: dict) -> str:
    """The gaps as a table: one row per attribute, one column per noise level."""
    levels = [str(s) for s in report["sigmas"]]
    header = "attribute   " + "".join(f"σ={s:<8}" for s in levels)
    lines = ["loss gap when the word is wrong (%), on object cells", header]
    for attribute, gaps in report["gap_percent"].items():
        lines.append(f"{attribute:<12}" + "".join(f"{gaps[s]:<+10.2f}" for s in levels))
    return "\n".join(lines)
