"""Shapes world: an infinite, procedural dataset of short captioned RGB clips.

Each clip shows one or two flat-coloured shapes (circle, square, triangle) moving
left/right/up/down, bouncing diagonally off the walls, or standing still on a plain
background. Everything is a pure function of a numpy Generator, so item ``i`` of a
``ShapesWorld`` with seed ``s`` is always the same clip and caption.

A fixed list of (colour, shape, motion) combinations, ``HELD_OUT``, never appears in
training mode; the evaluator (``causvid.eval.shapes_bench``) prompts for them to test
compositional generalisation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from causvid.errors import UserError
from causvid.frames import clip_to_tensor


BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "bouncing", "still")

# Every colour but one, every shape and every motion appears at least once, so the
# held-out set tests recombination rather than never-seen attribute values.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "up"),
    ("green", "circle", "bouncing"),
    ("blue", "square", "still"),
    ("yellow", "circle", "left"),
    ("magenta", "square", "right"),
    ("cyan", "triangle", "down"),
    ("orange", "square", "bouncing"),
    ("white", "triangle", "left"),
)

# Object radius in pixels at 64 px resolution; everything scales with min(H, W) / 64.
RADIUS_AT_64 = {"small": 6.0, "large": 11.0}
SPEED_RANGE_AT_64 = (1.0, 1.5)  # pixels per frame
REFERENCE_SIZE = 64
# Square half-side relative to the radius: makes square and circle areas nearly equal.
SQUARE_HALF_SIDE = 0.9

# Unit vector (axis, sign) of each directional motion; image y grows downwards.
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}
# Phrasings of each clip's caption an item carries: a latent bank keeps them all, so one encoded
# clip is described in different words on different passes.
CAPTION_PHRASINGS = 8


@dataclass(frozen=True)
class ObjectSpec:
    """One object in a scene."""

    shape: str
    colour: str
    size: str
    motion: str

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)
        _check_choice("motion", self.motion, MOTIONS)


@dataclass(frozen=True)
class SceneSpec:
    """A background and one or more objects with distinct colours that differ from it."""

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        _check_choice("background", self.background, BACKGROUNDS)
        if not self.objects:
            raise UserError("a scene needs at least one object")
        colours = [obj.colour for obj in self.objects]
        if len(set(colours)) != len(colours):
            raise UserError(f"object colours must be distinct, got {colours}")
        for obj in self.objects:
            if COLOURS[obj.colour] == BACKGROUNDS[self.background]:
                raise UserError(f"a {obj.colour} object is invisible on a {self.background} background")


def _check_choice(attribute: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {attribute} {value!r}; expected one of {tuple(allowed)}")


def check_num_frames(num_frames: int) -> None:
    """Clips have 1 + 4k frames (the video autoencoder compresses time by 4)."""
    if num_frames < 1 or num_frames % 4 != 1:
        raise UserError(f"num_frames must be 1 + 4k (e.g. 17, 33), got {num_frames}")


def is_held_out(obj: ObjectSpec) -> bool:
    """Whether the object's (colour, shape, motion) is one of the held-out combinations."""
    return (obj.colour, obj.shape, obj.motion) in HELD_OUT


def scene_to_json(scene: SceneSpec) -> str:
    """Serialise a scene to a JSON string (collate-friendly, unlike the dataclass)."""
    return json.dumps(dataclasses.asdict(scene), sort_keys=True)


def scene_from_json(text: str) -> SceneSpec:
    """Inverse of ``scene_to_json``."""
    data = json.loads(text)
    return SceneSpec(data["background"], tuple(ObjectSpec(**obj) for obj in data["objects"]))


# ---------------------------------------------------------------------------
# Sampling


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "motion": MOTIONS,
}


def restricted_values(
    restrict: Mapping[str, Sequence[str]] | None = None, include_held_out: bool = False
) -> dict[str, tuple[str, ...]]:
    """The values each attribute may take: all of them, or the subsets ``restrict`` names.

    A narrowed world (say one colour and only the four directions) isolates what a model
    can learn; worlds with no scene to draw, such as white objects on white alone or only
    held-out combinations, are rejected here.
    """
    values = dict(ATTRIBUTE_VALUES)
    for attribute, allowed in (restrict or {}).items():
        if attribute not in values:
            raise UserError(f"cannot restrict {attribute!r}; expected one of {tuple(values)}")
        if isinstance(allowed, str) or not allowed:
            raise UserError(f"restrict[{attribute!r}] must be a non-empty list of values, got {allowed!r}")
        for value in allowed:
            _check_choice(attribute, value, values[attribute])
        values[attribute] = tuple(v for v in values[attribute] if v in allowed)  # keep the canonical order
    for background in values["background"]:
        if all(COLOURS[colour] == BACKGROUNDS[background] for colour in values["colour"]):
            raise UserError(f"no allowed object colour is visible on a {background} background")
    combinations = itertools.product(values["colour"], values["shape"], values["motion"])
    if not include_held_out and all(combination in HELD_OUT for combination in combinations):
        raise UserError("every allowed (colour, shape, motion) is held out; set include_held_out to draw them")
    return values


def sample_scene(
    rng: np.random.Generator,
    include_held_out: bool = False,
    max_objects: int = 2,
    restrict: Mapping[str, Sequence[str]] | None = None,
) -> SceneSpec:
    """Sample a random scene; held-out combinations are excluded unless asked for.

    ``restrict`` narrows attributes to the listed values (``restricted_values``).
    """
    # Seven colours are always visible on a background, and object colours must differ.
    if not 1 <= max_objects <= len(COLOURS) - 1:
        raise UserError(f"max_objects must be between 1 and {len(COLOURS) - 1}, got {max_objects}")
    values = restricted_values(restrict, include_held_out)
    background = str(rng.choice(list(values["background"])))
    num_objects = int(rng.integers(1, max_objects + 1))
    objects: list[ObjectSpec] = []
    while len(objects) < num_objects:
        taken = {BACKGROUNDS[background]} | {COLOURS[obj.colour] for obj in objects}
        colours = [name for name in values["colour"] if COLOURS[name] not in taken]
        if not colours:  # a narrowed palette can run out before the second object
            break
        obj = ObjectSpec(
            shape=str(rng.choice(list(values["shape"]))),
            colour=str(rng.choice(colours)),
            size=str(rng.choice(list(values["size"]))),
            motion=str(rng.choice(list(values["motion"]))),
        )
        if include_held_out or not is_held_out(obj):
            objects.append(obj)
    return SceneSpec(background, tuple(objects))


# ---------------------------------------------------------------------------
# Rendering


def object_radius(size: str, height: int, width: int) -> float:
    """Object radius in pixels at the given resolution."""
    return RADIUS_AT_64[size] * min(height, width) / REFERENCE_SIZE


def render_clip(scene: SceneSpec, num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Render a scene as uint8 [T, H, W, 3]; ``rng`` picks start positions and speeds.

    Shapes have hard edges, so every pixel is exactly the background colour or an
    object colour (later objects are drawn on top of earlier ones).
    """
    return render_segments([(scene, 0)], num_frames, height, width, rng)


def render_segments(
    segments: Sequence[tuple[SceneSpec, int]], num_frames: int, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Render scenes one after another as uint8 [T, H, W, 3]: ``(scene, first_frame)`` pairs, in order.

    The frame is a torus: what crosses one edge shows at the opposite one (only directional
    movers ever reach an edge). Each scene takes over at its first frame, as a cut. Object i of a scene continues where
    object i of the scene before it was (same place, speed and bounce direction) under its new
    colour, shape, size or motion, so a switch changes what it names and nothing else.
    """
    check_num_frames(num_frames)
    if min(height, width) < 16:
        raise UserError(f"resolution must be at least 16x16, got {height}x{width}")
    starts = [first for _, first in segments]
    if not segments or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_frames:
        raise UserError(f"segment first frames must start at 0 and increase within {num_frames} frames, got {starts}")
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    # Pixel centres, broadcastable against per-frame object centres of shape [T, 1, 1].
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    placements: list[Placement] = []
    for index, (scene, first) in enumerate(segments):
        last = starts[index + 1] if index + 1 < len(segments) else num_frames
        part = frames[first:last]
        part[:] = BACKGROUNDS[scene.background]
        for i, obj in enumerate(scene.objects):
            radius = object_radius(obj.size, height, width)
            if i == len(placements):
                placements.append(sample_placement(obj.motion, height, width, radius, rng))
            cx, cy = object_path(obj.motion, placements[i], last - first + 1, height, width, radius)
            placements[i] = placement_at(placements[i], cx, cy)  # where the next scene picks it up
            dx = _wrapped(xs - cx[:-1, None, None], width)
            dy = _wrapped(ys - cy[:-1, None, None], height)
            mask = shape_mask(obj.shape, dx, dy, radius)
            part[mask] = COLOURS[obj.colour]
    return frames


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a filled shape given pixel offsets from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = SQUARE_HALF_SIDE * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Triangle pointing up: apex at dy = -radius, base 2 * radius wide at dy = +radius.
    return (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)


@dataclass(frozen=True)
class Placement:
    """An object's state at the first frame of a path: centre (x, y) in pixels, speed in pixels
    per frame, and the signs of a bouncing velocity."""

    x: float
    y: float
    speed: float
    signs: tuple[float, float]


def sample_placement(motion: str, height: int, width: int, radius: float, rng: np.random.Generator) -> Placement:
    """A random start: fully in frame, and for directional movers anywhere along their axis."""
    scale = min(height, width) / REFERENCE_SIZE
    speed = float(rng.uniform(*SPEED_RANGE_AT_64) * scale)
    # Centres live in [radius, size - radius] when fully in frame.
    x, y = radius + rng.uniform(0.0, 1.0, size=2) * (np.array([width, height]) - 2 * radius)
    signs = tuple(float(s) for s in rng.choice([-1.0, 1.0], size=2))
    if motion in DIRECTIONS:
        axis = DIRECTIONS[motion][0]
        along = rng.uniform(0.0, 1.0) * (width, height)[axis]
        x, y = (along, y) if axis == 0 else (x, along)
    return Placement(float(x), float(y), speed, signs)


def object_path(
    motion: str, placement: Placement, num_frames: int, height: int, width: int, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame float centre (x, y) of an object over ``num_frames`` frames from ``placement``.

    Still objects stay put and bouncing ones reflect off the walls, both fully in frame.
    Directional movers go at a steady speed and wrap around: what leaves one edge comes back in
    at the opposite one, so the centre lives in [0, size).
    """
    t = np.arange(num_frames, dtype=np.float64)
    sizes = np.array([width, height], dtype=np.float64)
    spans = sizes - 2 * radius
    inside = radius + np.clip(np.array([placement.x, placement.y]) - radius, 0.0, spans)
    if motion == "still":
        return np.full(num_frames, inside[0]), np.full(num_frames, inside[1])
    if motion == "bouncing":
        velocity = placement.speed * np.array(placement.signs)
        x = radius + _reflect(inside[0] - radius + velocity[0] * t, spans[0])
        y = radius + _reflect(inside[1] - radius + velocity[1] * t, spans[1])
        return x, y
    axis, sign = DIRECTIONS[motion]
    position = [np.full(num_frames, inside[0]), np.full(num_frames, inside[1])]
    start = (placement.x, placement.y)[axis]
    position[axis] = np.mod(start + sign * placement.speed * t, sizes[axis])
    return position[0], position[1]


def placement_at(placement: Placement, x: np.ndarray, y: np.ndarray) -> Placement:
    """The placement a path reaches at its last frame, heading the way it was going."""
    step = np.array([x[-1] - x[-2], y[-1] - y[-2]]) if len(x) > 1 else np.zeros(2)
    signs = tuple(float(np.sign(d)) if abs(d) > 1e-9 else s for d, s in zip(step, placement.signs))
    return Placement(float(x[-1]), float(y[-1]), placement.speed, signs)


def _wrapped(offset: np.ndarray, size: int) -> np.ndarray:
    """Pixel offsets from a centre on a torus of ``size``: the shortest way round, in [-size/2, size/2)."""
    return np.mod(offset + size / 2, size) - size / 2


def _reflect(offset: np.ndarray, span: float) -> np.ndarray:
    """Fold an unbounded 1-D path into [0, span] as if it bounced off both ends."""
    folded = np.mod(offset, 2 * span)
    return np.where(folded > span, 2 * span - folded, folded)


# ---------------------------------------------------------------------------
# Scene switches

# What a switch may change: the background, or the first object's colour, shape or motion.
SWITCH_ATTRIBUTES = ("background", "colour", "shape", "motion")
# Pixel frames per latent frame after the first (the video autoencoder compresses time by 4).
FRAMES_PER_LATENT = 4


def block_first_frame(block: int, block_frames: int) -> int:
    """The first pixel frame of latent block ``block``: latent frame 0 is one pixel frame, later ones four."""
    latent = block * block_frames
    return 0 if latent == 0 else 1 + FRAMES_PER_LATENT * (latent - 1)


def switched_scene(
    scene: SceneSpec,
    attribute: str,
    rng: np.random.Generator,
    include_held_out: bool = False,
    restrict: Mapping[str, Sequence[str]] | None = None,
) -> SceneSpec:
    """``scene`` with one attribute changed to another allowed value at random (``SWITCH_ATTRIBUTES``)."""
    _check_choice("switch attribute", attribute, SWITCH_ATTRIBUTES)
    values = restricted_values(restrict, include_held_out)
    current = scene.background if attribute == "background" else getattr(scene.objects[0], attribute)
    for value in rng.permutation([v for v in values[attribute] if v != current]):
        if attribute == "background":
            candidate = (str(value), scene.objects)
        else:
            first = dataclasses.replace(scene.objects[0], **{attribute: str(value)})
            candidate = (scene.background, (first, *scene.objects[1:]))
        try:
            switched = SceneSpec(*candidate)
        except ValueError:  # a colour clash with the background or the other object
            continue
        if include_held_out or not any(is_held_out(obj) for obj in switched.objects):
            return switched
    raise UserError(f"no allowed {attribute} to switch to in {scene_to_json(scene)}")


# ---------------------------------------------------------------------------
# Captions

SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "magenta": ("magenta", "fuchsia"),
    "cyan": ("cyan", "aqua"),
    "orange": ("orange",),
    "white": ("white",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
MOTION_PHRASES = {
    "left": ("moving left", "drifting leftwards", "sliding to the left", "heading left", "travelling left"),
    "right": ("moving right", "drifting rightwards", "sliding to the right", "heading right", "travelling right"),
    "up": ("moving up", "drifting upwards", "rising", "floating up", "heading up"),
    "down": ("moving down", "drifting downwards", "falling", "sinking", "heading down"),
    "bouncing": ("bouncing", "bouncing around", "ricocheting", "bouncing off the walls", "ricocheting around"),
    "still": ("standing still", "not moving", "staying put", "at rest", "sitting still"),
}
# Still objects can also be described with an adjective before the colour.
STILL_ADJECTIVES = ("still", "static", "stationary", "motionless")
BACKGROUND_WORDS = {"black": ("black", "dark"), "gray": ("gray", "grey"), "white": ("white", "light")}
CAPTION_TEMPLATES = (
    "{objects} on a {background} background",
    "{objects} on {background}",
    "{objects} against a {background} backdrop",
    "{objects}, {background} backdrop",
    "{objects} over a {background} background",
    "{objects}, {background} background",
    "a {background} background with {objects}",
    "{background} backdrop: {objects}",
)
CANONICAL_MOTION = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing around",
    "still": "standing still",
}


def random_caption(scene: SceneSpec, rng: np.random.Generator) -> str:
    """A caption drawn from many templates and synonyms."""
    objects = " and ".join(_random_object_phrase(obj, rng) for obj in scene.objects)
    background = str(rng.choice(BACKGROUND_WORDS[scene.background]))
    return str(rng.choice(CAPTION_TEMPLATES)).format(objects=objects, background=background)


def _random_object_phrase(obj: ObjectSpec, rng: np.random.Generator) -> str:
    still_as_adjective = obj.motion == "still" and rng.random() < 0.5
    words = []
    if rng.random() < 0.5:
        words.append(str(rng.choice(SIZE_WORDS[obj.size])))
    if still_as_adjective:
        words.append(str(rng.choice(STILL_ADJECTIVES)))
    words += [str(rng.choice(COLOUR_WORDS[obj.colour])), str(rng.choice(SHAPE_WORDS[obj.shape]))]
    if not still_as_adjective:
        words.append(str(rng.choice(MOTION_PHRASES[obj.motion])))
    phrase = " ".join(words)
    return _with_article(phrase) if rng.random() < 0.7 else phrase


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def canonical_caption(scene: SceneSpec) -> str:
    """The single fixed-template caption used as the evaluation prompt."""
    objects = " and ".join(
        f"a {obj.size} {obj.colour} {obj.shape} {CANONICAL_MOTION[obj.motion]}" for obj in scene.objects
    )
    return f"{objects} on a {scene.background} background"


# ---------------------------------------------------------------------------
# Dataset


class ShapesWorld(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is a pure function of ``(seed, i)``.

    Items are ``{"video": float32 [3, T, H, W] in [-1, 1], "caption": str, "captions": the caption
    and other phrasings of it, "scene": JSON string}``; resuming training at data position ``i`` is
    exact. Objects lie on a flat background (`flat_background`), so masks of them can be found.

    With ``switch_probability`` > 0 that share of clips switches scene (``switched_scene``) at
    the start of a random latent block after the first (``block_frames`` latent frames a block),
    and every item also has ``"switch_caption"``, ``"switch_scene"`` and ``"switch_frame"``, the
    first pixel frame of the new scene (``num_frames`` when the clip does not switch).
    """

    flat_background = True

    def __init__(
        self,
        num_frames: int = 33,
        height: int = 64,
        width: int = 64,
        seed: int = 0,
        include_held_out: bool = False,
        length: int = 10**9,
        max_objects: int = 2,
        restrict: Mapping[str, Sequence[str]] | None = None,
        switch_probability: float = 0.0,
        block_frames: int = 3,
    ) -> None:
        check_num_frames(num_frames)
        restricted_values(restrict, include_held_out)  # a bad restriction fails here, not mid-training
        if not 0.0 <= switch_probability <= 1.0:
            raise UserError(f"switch_probability must be in [0, 1], got {switch_probability}")
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.seed = seed
        self.include_held_out = include_held_out
        self.length = length
        self.max_objects = max_objects
        self.restrict = restrict
        self.switch_probability = switch_probability
        self.block_frames = block_frames
        latent_frames = 1 + (num_frames - 1) // FRAMES_PER_LATENT
        self.num_blocks = -(-latent_frames // block_frames)
        if switch_probability > 0 and self.num_blocks < 2:
            raise UserError(f"a scene switch needs clips of at least 2 blocks; {num_frames} frames are one")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesWorld of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng, self.include_held_out, self.max_objects, self.restrict)
        segments = [(scene, 0)]
        if self.switch_probability > 0 and rng.random() < self.switch_probability:
            attribute = str(rng.choice(SWITCH_ATTRIBUTES))
            first = block_first_frame(int(rng.integers(1, self.num_blocks)), self.block_frames)
            segments.append((switched_scene(scene, attribute, rng, self.include_held_out, self.restrict), first))
        clip = render_segments(segments, self.num_frames, self.height, self.width, rng)
        item = {"video": clip_to_tensor(clip), "caption": random_caption(scene, rng), "scene": scene_to_json(scene)}
        if self.switch_probability > 0:
            after, first = segments[-1] if len(segments) > 1 else (scene, self.num_frames)
            item.update(switch_caption=random_caption(after, rng), switch_scene=scene_to_json(after),
                        switch_frame=first)
        # Other phrasings of the caption, from a stream of their own so the rest stays as it was.
        phrasings = np.random.default_rng([self.seed, index, 2])
        item["captions"] = [item["caption"]] + [random_caption(scene, phrasings) for _ in range(CAPTION_PHRASINGS - 1)]
        return item
