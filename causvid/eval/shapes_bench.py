"""shapes-bench: score generated videos against the shapes-world scene they were asked for.

Every pixel is classified to a palette colour (blurred edges are split between the
background and the colour they blend into). Each requested object is then tracked as
the largest connected blob of its colour, which gives colour adherence, shape
(IoU against shape templates fitted to the blob's box), motion direction and travel
(the label and the signed speed along the named direction, from the centroid
trajectory), subject consistency (blob area stability) and trajectory jerk.
Scene-level metrics are background consistency, flicker of background pixels and a
MAWE-style optical-flow warp error. The same analysis on ground-truth clips from
``render_clip`` gives the ceiling.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from causvid.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    REFERENCE_SIZE,
    SIZES,
    ObjectSpec,
    SceneSpec,
    canonical_caption,
    is_held_out,
    object_radius,
    render_clip,
    restricted_values,
    scene_to_json,
)
from causvid.errors import UserError


# Metric name -> whether higher is better. Only these are averaged into split means.
METRICS: dict[str, bool] = {
    "colour": True,
    "shape": True,
    "direction": True,
    "travel": True,
    "subject_consistency": True,
    "background_consistency": True,
    "mawe": False,
    "jerk": False,
    "flicker": False,
}

# Palette: the object colours plus the backgrounds that are not also object colours
# (white is both), so every pixel gets one colour name.
PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS) + tuple(
    name for name, rgb in BACKGROUNDS.items() if rgb not in COLOURS.values()
)
PALETTE = np.array([COLOURS.get(name, BACKGROUNDS.get(name)) for name in PALETTE_NAMES], dtype=np.float32)
UNCLASSIFIED = -1
# A pixel within this RGB distance of a palette colour is that colour (the closest
# palette pair, yellow/orange, is 82 apart). Other pixels within BLEND_DISTANCE_THRESHOLD
# of a mix of the background and a colour go to the end of the mix they are closer to;
# the rest are unclassified.
COLOUR_DISTANCE_THRESHOLD = 60.0
BLEND_DISTANCE_THRESHOLD = 40.0
# Pixels are classified through a table of colours quantised to this step; the error
# (at most 1.5 per channel) is negligible against the thresholds above.
LOOKUP_STEP = 4

# An object is present when its largest blob covers this fraction of a small circle.
MIN_BLOB_FRACTION = 0.3
# A frame is an artefact when its named background covers under half of it, or when more than
# this share of its pixels is near no palette or background colour (stripes, smears, floods).
ARTEFACT_MIN_BACKGROUND = 0.5
ARTEFACT_MAX_UNCLASSIFIED = 0.08
MIN_SHAPE_IOU = 0.6
# Trajectory: an axis "moves" when its extent exceeds this many pixels per frame
# (at 64 px) over the clip; ground truth moves at >= 1 px/frame (0.5 worst case after a bounce).
MOVE_PX_PER_FRAME = 0.3
MIN_MOVE_PX = 3.0
# An axis that moves but ends up less than this fraction of its extent from where it
# started has reversed: a bounce.
REVERSAL_FRACTION = 0.5
# The usual Farneback settings from the OpenCV examples; a 15 px window suits 64 px frames.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# Flow magnitudes below this (pixels at 64 px) are treated as this, so static videos
# do not divide by ~0 in MAWE.
MIN_FLOW_PX = 0.1


@dataclass(frozen=True)
class BenchCase:
    """One prompt of the bench: the scene asked for, its canonical caption and split."""

    scene: SceneSpec
    prompt: str
    split: str  # "seen" or "held_out"


# ---------------------------------------------------------------------------
# Prompt set


def default_prompt_set(
    num_seen: int = 16, seed: int = 0, num_pairs: int = 2, restrict: Mapping[str, Sequence[str]] | None = None
) -> list[BenchCase]:
    """``num_seen`` seen single-object scenes, ``num_pairs`` seen two-object scenes and
    every held-out combination once (alternating sizes, on a background it is visible on).

    ``restrict`` narrows the set to a world made with the same restriction (``ShapesWorld``):
    held-out combinations outside it are left out, and scenes drawn twice are kept once.
    """
    values = restricted_values(restrict, include_held_out=True)
    scenes = list(dict.fromkeys(_seen_scenes(num_seen, num_pairs, seed, values)))
    seen = [BenchCase(scene, canonical_caption(scene), "seen") for scene in scenes]
    held_out = []
    for index, (colour, shape, motion) in enumerate(HELD_OUT):
        if colour not in values["colour"] or shape not in values["shape"] or motion not in values["motion"]:
            continue
        size = SIZES[index % 2] if SIZES[index % 2] in values["size"] else values["size"][0]
        visible_on = [name for name in values["background"] if BACKGROUNDS[name] != COLOURS[colour]]
        if not visible_on:
            continue
        scene = SceneSpec(visible_on[index % len(visible_on)], (ObjectSpec(shape, colour, size, motion),))
        held_out.append(BenchCase(scene, canonical_caption(scene), "held_out"))
    return seen + held_out


# Give up on a restriction that cannot fill a scene (e.g. one colour for a two-object scene).
MAX_SCENE_ATTEMPTS = 200


def _seen_scenes(num_single: int, num_pairs: int, seed: int, values: dict[str, tuple[str, ...]]) -> list[SceneSpec]:
    """Seen scenes whose attribute values are spread evenly: each is drawn among the least used so far."""
    rng = np.random.default_rng(seed)
    shapes, colours, sizes, motions, backgrounds = (
        _EvenDraw(values[name], rng) for name in ("shape", "colour", "size", "motion", "background")
    )
    scenes = []
    for num_objects in [1] * num_single + [2] * num_pairs:
        for attempt in range(MAX_SCENE_ATTEMPTS):
            # The least used values may only form invalid scenes; widen the choice as attempts fail.
            slack = attempt // 5
            objects = tuple(
                ObjectSpec(shapes.draw(slack), colours.draw(slack), sizes.draw(slack), motions.draw(slack))
                for _ in range(num_objects)
            )
            scene = _valid_seen_scene(backgrounds.draw(slack), objects)
            if scene is not None:
                break
        else:
            raise UserError(f"no valid seen scene of {num_objects} objects in this restricted world; ask for fewer")
        for obj in scene.objects:
            for draws, value in ((shapes, obj.shape), (colours, obj.colour), (sizes, obj.size), (motions, obj.motion)):
                draws.use(value)
        backgrounds.use(scene.background)
        scenes.append(scene)
    return scenes


def _valid_seen_scene(background: str, objects: tuple[ObjectSpec, ...]) -> SceneSpec | None:
    """The scene, or None if it is invalid (invisible or repeated colour) or has a held-out object."""
    if any(is_held_out(obj) for obj in objects):
        return None
    try:
        return SceneSpec(background, objects)
    except ValueError:
        return None


class _EvenDraw:
    """Draws values of one attribute at random among those used least so far."""

    def __init__(self, values: Sequence[str], rng: np.random.Generator) -> None:
        self.counts = dict.fromkeys(values, 0)
        self.rng = rng

    def draw(self, slack: int = 0) -> str:
        """A value used at most ``slack`` times more than the least used one."""
        limit = min(self.counts.values()) + slack
        return str(self.rng.choice([value for value, count in self.counts.items() if count <= limit]))

    def use(self, value: str) -> None:
        self.counts[value] += 1


# ---------------------------------------------------------------------------
# Per-video analysis


@dataclass(frozen=True)
class Blob:
    """The largest connected region of one colour in one frame."""

    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    crop: np.ndarray  # bool mask of the blob inside its bounding box


def classify_colours(pixels: np.ndarray, background: int) -> np.ndarray:
    """Index into PALETTE_NAMES of each [N, 3] colour, or UNCLASSIFIED; int8 [N].

    A colour near a palette colour is that colour. Otherwise it may be a blend of the
    background and a colour (a blurred edge): it goes to whichever end it is closer to.
    """
    pixels = pixels.astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, without materialising [N, P, 3] differences.
    distances = (pixels**2).sum(1, keepdims=True) - 2 * pixels @ PALETTE.T + (PALETTE**2).sum(1)
    labels = distances.argmin(1).astype(np.int8)
    near = distances.min(1) <= COLOUR_DISTANCE_THRESHOLD**2

    # Project each pixel onto every segment background -> colour: p ~ bg + alpha * (c - bg).
    offsets = pixels - PALETTE[background]
    directions = PALETTE - PALETTE[background]
    lengths = np.maximum((directions**2).sum(1), 1e-6)  # the background's own segment has length 0
    alpha = np.clip(offsets @ directions.T / lengths, 0.0, 1.0)
    residuals = (offsets**2).sum(1, keepdims=True) - 2 * alpha * (offsets @ directions.T) + alpha**2 * lengths
    closest = residuals.argmin(1)
    rows = np.arange(len(pixels))
    blend = ~near & (residuals[rows, closest] <= BLEND_DISTANCE_THRESHOLD**2)
    labels[blend] = np.where(alpha[rows, closest] >= 0.5, closest, background)[blend]
    labels[~near & ~blend] = UNCLASSIFIED
    return labels


@functools.lru_cache(maxsize=len(BACKGROUNDS))
def _colour_table(background: int) -> np.ndarray:
    """classify_colours of every colour quantised to LOOKUP_STEP, as an int8 [B, B, B] table."""
    centres = np.arange(0, 256, LOOKUP_STEP, dtype=np.float32) + (LOOKUP_STEP - 1) / 2
    grid = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), axis=-1).reshape(-1, 3)
    return classify_colours(grid, background).reshape(len(centres), len(centres), len(centres))


def classify_pixels(frames: np.ndarray, background: int) -> np.ndarray:
    """``classify_colours`` of every pixel of uint8 [T, H, W, 3] frames; int8 [T, H, W]."""
    quantised = frames // LOOKUP_STEP  # the lookup is ~50x faster than classifying every pixel
    return _colour_table(background)[quantised[..., 0], quantised[..., 1], quantised[..., 2]]


def palette_index(rgb: tuple[int, int, int]) -> int:
    """Palette index of an exact palette colour."""
    return int(np.flatnonzero((PALETTE == np.array(rgb, dtype=np.float32)).all(1))[0])


def largest_blob(mask: np.ndarray) -> Blob | None:
    """Largest 8-connected component of a boolean mask on a torus, or None when the mask is empty.

    Objects that wrap around show at two opposite edges at once; where a colour touches both, the
    mask is rolled by half the frame first, which joins the halves (objects are under half a frame
    wide), and the centroid rolled back.
    """
    height, width = mask.shape
    shift = (height // 2 if mask[0].any() and mask[-1].any() else 0,
             width // 2 if mask[:, 0].any() and mask[:, -1].any() else 0)
    blob = _largest_component(np.roll(mask, shift, axis=(0, 1)) if any(shift) else mask)
    if blob is None or not any(shift):
        return blob
    x, y = blob.centroid
    return Blob(blob.area, ((x - shift[1]) % width, (y - shift[0]) % height), blob.crop)


def _largest_component(mask: np.ndarray) -> Blob | None:
    count, components, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    best = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    x, y, w, h, area = (int(v) for v in stats[best])
    return Blob(area, (float(centroids[best][0]), float(centroids[best][1])), components[y : y + h, x : x + w] == best)


def classify_shape(crop: np.ndarray) -> str:
    """Best-matching shape (by IoU with templates stretched to the crop), or "unknown"."""
    height, width = crop.shape
    v = ((np.arange(height) + 0.5) / height)[:, None]
    u = ((np.arange(width) + 0.5) / width)[None, :]
    templates = {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones_like(crop),
        "triangle": np.abs(u - 0.5) <= v / 2,  # apex at the top, as rendered
    }
    ious = {shape: (crop & mask).sum() / (crop | mask).sum() for shape, mask in templates.items()}
    best = max(ious, key=ious.get)
    return best if ious[best] >= MIN_SHAPE_IOU else "unknown"


def track_steps(track: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Steps [T - 1, 2] between the rows of a centroid track, wrap-arounds undone: a jump of over
    half the frame is an object leaving one edge and entering at the other, so it counts as the
    short step the other way (``frame_size`` is (width, height)). NaN rows give NaN steps."""
    size = np.asarray(frame_size, dtype=np.float64)
    steps = np.diff(track, axis=0)
    return steps - np.where(np.abs(steps) > size / 2, np.sign(steps) * size, 0.0)


def unwrap_track(track: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """A [T, 2] centroid track (no NaN rows) as one continuous path, wrap-arounds undone."""
    return np.concatenate([track[:1], track[:1] + np.cumsum(track_steps(track, frame_size), axis=0)])


def classify_motion(centroids: np.ndarray, scale: float, frame_size: tuple[int, int]) -> str:
    """Motion label from a [T, 2] centroid trajectory (NaN rows = object missing).

    A wrap-around counts as motion the way it went (``unwrap_track``). Returns one of
    MOTIONS, or "unknown" when the object is missing in half the frames.
    """
    num_frames = len(centroids)
    track = unwrap_track(centroids[~np.isnan(centroids[:, 0])], frame_size)
    if len(track) < max(2, num_frames / 2):
        return "unknown"
    track = _median_filter3(track)  # a single misdetected frame should not look like motion
    threshold = max(MIN_MOVE_PX, MOVE_PX_PER_FRAME * (num_frames - 1)) * scale
    extent = track.max(0) - track.min(0)
    net = track[-1] - track[0]
    moving = extent >= threshold
    if not moving.any():
        return "still"
    reversed_axis = moving & (np.abs(net) < REVERSAL_FRACTION * extent)
    if moving.all() or reversed_axis.any():
        return "bouncing"
    axis = int(np.flatnonzero(moving)[0])
    return {(0, False): "left", (0, True): "right", (1, False): "up", (1, True): "down"}[(axis, bool(net[axis] > 0))]


def named_travel(centroids: np.ndarray, motion: str, scale: float, frame_size: tuple[int, int]) -> float | None:
    """Mean speed along the named direction (pixels per frame at 64 px), negative the other way.

    Unlike the motion label it grades a wobbling object that still heads the named way. None
    for still and bouncing objects, and for an object tracked in fewer than two frames.
    """
    tracked = np.flatnonzero(~np.isnan(centroids[:, 0]))
    if motion not in DIRECTIONS or len(tracked) < 2:
        return None
    axis, sign = DIRECTIONS[motion]
    track = _median_filter3(unwrap_track(centroids[tracked], frame_size))
    return float(sign * (track[-1, axis] - track[0, axis]) / (tracked[-1] - tracked[0]) / scale)


def _median_filter3(track: np.ndarray) -> np.ndarray:
    padded = np.concatenate([track[:1], track, track[-1:]])
    return np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def object_blobs(labels: np.ndarray, colour: int) -> list[Blob | None]:
    """Per frame of int8 [T, H, W] pixel labels, the largest blob of palette colour `colour`, or
    None where there is none big enough to be an object (a fraction of the smallest one)."""
    min_area = MIN_BLOB_FRACTION * np.pi * object_radius("small", *labels.shape[1:]) ** 2
    blobs = [largest_blob(frame_labels == colour) for frame_labels in labels]
    return [blob if blob is not None and blob.area >= min_area else None for blob in blobs]


def analyze_object(labels: np.ndarray, obj: ObjectSpec, distractors: Sequence[int], scale: float) -> dict:
    """Colour, shape, motion, subject consistency and jerk of one requested object; `colour_frames`
    says per frame whether its colour test passed."""
    colour = palette_index(COLOURS[obj.colour])
    blobs = object_blobs(labels, colour)
    num_frames = len(labels)
    colour_ok = np.zeros(num_frames, dtype=bool)
    shapes = ["none"] * num_frames
    areas = np.zeros(num_frames)
    centroids = np.full((num_frames, 2), np.nan)
    for t, (frame_labels, blob) in enumerate(zip(labels, blobs)):
        if blob is None:
            continue
        # Shift labels by one so UNCLASSIFIED (-1) lands in bin 0, then drop that bin.
        counts = np.bincount(frame_labels.ravel() + 1, minlength=len(PALETTE) + 1)[1:]
        # Present and not outnumbered by a colour the scene does not contain.
        colour_ok[t] = all(counts[colour] >= counts[other] for other in distractors)
        shapes[t] = classify_shape(blob.crop)
        areas[t] = blob.area
        centroids[t] = blob.centroid
    frame_size = (labels.shape[2], labels.shape[1])
    motion = classify_motion(centroids, scale, frame_size)
    return {
        "colour": float(colour_ok.mean()),
        "shape": float(np.mean([shape == obj.shape for shape in shapes])),
        "direction": float(motion == obj.motion),
        "travel": named_travel(centroids, obj.motion, scale, frame_size),
        "subject_consistency": _stability(areas),
        "jerk": _jerk(centroids, scale, frame_size),
        "predicted_shape": Counter(shapes).most_common(1)[0][0],
        "predicted_motion": motion,
        "colour_frames": colour_ok,
    }


def _stability(values: np.ndarray) -> float:
    """1 - coefficient of variation, clipped to [0, 1]; 0 for an all-zero series."""
    mean = values.mean()
    return float(np.clip(1.0 - values.std() / mean, 0.0, 1.0)) if mean > 0 else 0.0


def _jerk(centroids: np.ndarray, scale: float, frame_size: tuple[int, int]) -> float | None:
    """Mean |third difference| of the centroid (pixels at 64 px); None if never tracked 4 frames in a row."""
    third = np.linalg.norm(np.diff(track_steps(centroids, frame_size), n=2, axis=0), axis=1)
    third = third[np.isfinite(third)]
    return float(third.mean() / scale) if len(third) else None


def background_consistency(labels: np.ndarray, background: int, object_colours: Sequence[int]) -> float:
    """Mean fraction of non-object pixels that are the requested background, minus its std over frames."""
    non_object = ~np.isin(labels, object_colours)
    matches = ((labels == background) & non_object).sum((1, 2)) / np.maximum(non_object.sum((1, 2)), 1)
    return float(np.clip(matches.mean() - matches.std(), 0.0, 1.0))


def flicker(frames: np.ndarray, labels: np.ndarray, background: int) -> float:
    """Mean absolute change (in [0, 1]) of pixels that are background in consecutive frames.

    Falls back to all pixels when no pixel stays background (a video with no background).
    """
    change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(-1) / 255.0
    steady = (labels[1:] == background) & (labels[:-1] == background)
    return float(change[steady].mean() if steady.any() else change.mean())


def motion_aware_warp_error(frames: np.ndarray, scale: float) -> float:
    """MAWE-style score: mean |warp(frame t) - frame t+1| (in [0, 1]) / mean flow magnitude (px).

    Frame t is warped with Farneback flow computed backwards from t+1 to t.
    """
    gray = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    height, width = gray[0].shape
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    errors, magnitudes = [], []
    for t in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, **FARNEBACK)
        warped = cv2.remap(
            frames[t], grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        errors.append(np.abs(warped.astype(np.float32) - frames[t + 1]).mean() / 255.0)
        magnitudes.append(np.linalg.norm(flow, axis=-1).mean())
    return float(np.mean(errors) / max(np.mean(magnitudes), MIN_FLOW_PX * scale))


def analyze_video(frames: np.ndarray, scene: SceneSpec) -> dict:
    """Metrics of one uint8 [T, H, W, 3] video against the scene it should show.

    Object metrics are averaged over the scene's objects. Higher is better except
    for ``mawe``, ``jerk`` and ``flicker``. ``jerk`` is None when no object was tracked, and
    ``travel`` when no object has a direction (still or bouncing) or none was tracked.
    ``artefact_frames`` counts the frames `frame_checks` calls artefacts.
    """
    _check_video(frames)
    labels, background, object_colours, objects = _analyze_objects(frames, scene)
    scale = min(frames.shape[1:3]) / REFERENCE_SIZE
    result = {
        name: float(np.mean([obj[name] for obj in objects]))
        for name in ("colour", "shape", "direction", "subject_consistency")
    }
    result.update(
        background_consistency=background_consistency(labels, background, object_colours),
        mawe=motion_aware_warp_error(frames, scale),
        travel=_mean_present([obj["travel"] for obj in objects]),
        jerk=_mean_present([obj["jerk"] for obj in objects]),
        flicker=flicker(frames, labels, background),
        artefact_frames=int(_frame_checks(labels, background, objects)["artefact"].sum()),
        predicted_shape=[obj["predicted_shape"] for obj in objects],
        predicted_motion=[obj["predicted_motion"] for obj in objects],
    )
    return result


def _analyze_objects(frames: np.ndarray, scene: SceneSpec) -> tuple[np.ndarray, int, list[int], list[dict]]:
    """Pixel labels, the background's and objects' palette indices, and `analyze_object` per object."""
    scale = min(frames.shape[1:3]) / REFERENCE_SIZE
    background = palette_index(BACKGROUNDS[scene.background])
    labels = classify_pixels(frames, background)
    object_colours = [palette_index(COLOURS[obj.colour]) for obj in scene.objects]
    distractors = [i for i in range(len(PALETTE)) if i != background and i not in object_colours]
    return labels, background, object_colours, [analyze_object(labels, obj, distractors, scale) for obj in scene.objects]


def frame_checks(frames: np.ndarray, scene: SceneSpec) -> dict[str, np.ndarray]:
    """Per-frame tests of uint8 [T, H, W, 3] frames against a scene, each a [T] array:

    - `objects`: every object passes the colour test (its blob is there, no absent colour has more pixels);
    - `background`: the fraction of the picture in the named background colour;
    - `unclassified`: the fraction of pixels near no palette or background colour;
    - `artefact`: the background covers under half the picture, or over 8% of pixels are unclassified.
    """
    _check_video(frames)
    labels, background, _, objects = _analyze_objects(frames, scene)
    return _frame_checks(labels, background, objects)


def _frame_checks(labels: np.ndarray, background: int, objects: list[dict]) -> dict[str, np.ndarray]:
    pixels = labels.reshape(len(labels), -1)
    checks = {
        "objects": np.all([obj["colour_frames"] for obj in objects], axis=0),
        "background": (pixels == background).mean(1),
        "unclassified": (pixels == UNCLASSIFIED).mean(1),
    }
    checks["artefact"] = (checks["background"] < ARTEFACT_MIN_BACKGROUND) | (checks["unclassified"] > ARTEFACT_MAX_UNCLASSIFIED)
    return checks


def _mean_present(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return float(np.mean(present)) if present else None


def _check_video(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        description = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise UserError(f"expected a uint8 [T, H, W, 3] array, got {description}")
    if len(frames) < 2:
        raise UserError(f"need at least 2 frames to measure motion, got {len(frames)}")


# ---------------------------------------------------------------------------
# Running the bench


def run_bench(
    generate: Callable[[str, int, int], np.ndarray] | None,
    cases: Sequence[BenchCase],
    num_frames: int = 33,
    seeds: Sequence[int] = (0, 1, 2, 3),
    height: int = 64,
    width: int = 64,
    on_video: Callable[[BenchCase, int, np.ndarray], None] | None = None,
    transform: Callable[[np.ndarray, BenchCase, int], np.ndarray] | None = None,
) -> dict:
    """Score ``generate(prompt, seed, num_frames) -> uint8 [T, H, W, 3]`` on every case and seed.

    With ``generate=None`` the ground-truth clips are scored instead (the ceiling).
    ``on_video`` sees every video, e.g. to collect some for a contact sheet.
    ``transform(frames, case, seed)`` maps each video before scoring, e.g. an autoencoder's
    reconstruction of the ground truth, which scores the autoencoder with the same colour, shape
    and motion judge, or the teacher's partial denoising of it.
    Returns a JSON-serialisable report with per-split means and per-case details.
    """
    started = time.perf_counter()
    generate_seconds = 0.0
    details = []
    for index, case in enumerate(cases):
        runs = []
        for seed in seeds:
            generate_start = time.perf_counter()
            if generate is None:
                frames = render_clip(case.scene, num_frames, height, width, np.random.default_rng([seed, index]))
            else:
                frames = generate(case.prompt, seed, num_frames)
            if transform is not None:
                frames = transform(frames, case, seed)
            generate_seconds += time.perf_counter() - generate_start
            runs.append({"seed": seed, **analyze_video(frames, case.scene)})
            if on_video is not None:
                on_video(case, seed, frames)
        details.append(
            {
                "prompt": case.prompt,
                "split": case.split,
                "scene": json.loads(scene_to_json(case.scene)),
                "metrics": _mean_metrics(runs),
                "runs": runs,
            }
        )
    total_seconds = time.perf_counter() - started
    num_videos = len(cases) * len(seeds)
    return {
        "source": "ground_truth" if generate is None else "model",
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "seeds": list(seeds),
        "splits": {
            split: _mean_metrics([d["metrics"] for d in details if split in ("all", d["split"])])
            for split in ("seen", "held_out", "all")
        },
        "cases": details,
        "timing": {
            "total_s": total_seconds,
            "generate_s": generate_seconds,
            "analyze_s": total_seconds - generate_seconds,
            "videos": num_videos,
            "s_per_video": total_seconds / max(num_videos, 1),
        },
    }


def _mean_metrics(results: Sequence[dict]) -> dict:
    """Mean of each metric over results, skipping None; None when no result has a value."""
    means = {name: _mean_present([r.get(name) for r in results]) for name in METRICS}
    means["count"] = len(results)
    return means


def format_table(report: dict) -> str:
    """Readable text table of a ``run_bench`` report's split means."""
    timing = report["timing"]
    splits = ("seen", "held_out", "all")
    lines = [
        f"shapes-bench ({report['source']}): {timing['videos']} videos, {report['num_frames']} frames at "
        f"{report['height']}x{report['width']}, {timing['total_s']:.1f} s",
        f"{'metric':<38}" + "".join(f"{split:>10}" for split in splits),
    ]
    for name, higher_is_better in METRICS.items():
        label = f"{name} {'(higher better)' if higher_is_better else '(lower better)'}"
        lines.append(f"{label:<38}" + "".join(_format_cell(report["splits"][split][name]) for split in splits))
    lines.append(f"{'cases':<38}" + "".join(f"{report['splits'][split]['count']:>10}" for split in splits))
    return "\n".join(lines)


def _format_cell(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.3f}"


def contact_sheet(
    videos: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, frames_per_video: int = 6
) -> Path:
    """Write a PNG grid: one row per video (evenly spaced frames), each under its label."""
    if len(videos) != len(labels) or not videos:
        raise UserError(f"need one label per video and at least one video, got {len(videos)} and {len(labels)}")
    label_height, gap = 12, 2
    tile_h, tile_w = videos[0].shape[1:3]
    sheet_w = frames_per_video * (tile_w + gap) + gap
    row_h = label_height + tile_h + gap
    sheet = Image.new("RGB", (sheet_w, len(videos) * row_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    max_chars = max(1, sheet_w // 6)  # the default bitmap font is about 6 px per character
    for row, (video, label) in enumerate(zip(videos, labels)):
        top = row * row_h + gap
        draw.text((gap, top), label[:max_chars], fill=(0, 0, 0))
        for column, t in enumerate(np.linspace(0, len(video) - 1, frames_per_video).round().astype(int)):
            tile = Image.fromarray(video[t]).resize((tile_w, tile_h), Image.NEAREST)
            sheet.paste(tile, (gap + column * (tile_w + gap), top + label_height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
