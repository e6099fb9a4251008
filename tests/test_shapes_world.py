"""Tests for the procedural shapes world (causvid.data.shapes)."""

import json
import time

import numpy as np
import pytest
import torch

from causvid.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT,
    MOTIONS,
    SHAPES,
    SIZES,
    STILL_ADJECTIVES,
    SWITCH_ATTRIBUTES,
    ObjectSpec,
    SceneSpec,
    ShapesWorld,
    canonical_caption,
    is_held_out,
    random_caption,
    block_first_frame,
    render_clip,
    sample_scene,
    scene_from_json,
    scene_to_json,
    switched_scene,
)


def single(shape="circle", colour="red", size="large", motion="left", background="black") -> SceneSpec:
    return SceneSpec(background, (ObjectSpec(shape, colour, size, motion),))


def colour_centroids(clip: np.ndarray, colour: str) -> np.ndarray:
    """[T, 2] (x, y) centroid of the pixels of one colour in each frame."""
    mask = (clip == np.array(COLOURS[colour])).all(-1)
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    area = mask.sum((1, 2))
    assert (area > 0).all(), "object left the frame"
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], axis=1)


def test_held_out_list_is_valid_and_spread():
    assert 6 <= len(HELD_OUT) <= 8
    assert len(set(HELD_OUT)) == len(HELD_OUT)
    for colour, shape, motion in HELD_OUT:
        assert colour in COLOURS and shape in SHAPES and motion in MOTIONS
    assert {shape for _, shape, _ in HELD_OUT} == set(SHAPES)
    assert {motion for _, _, motion in HELD_OUT} == set(MOTIONS)


def test_training_scenes_never_contain_held_out_combinations():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(3000)]
    assert not any(is_held_out(obj) for scene in scenes for obj in scene.objects)
    assert {len(scene.objects) for scene in scenes} == {1, 2}
    for scene in scenes:
        assert all(COLOURS[obj.colour] != BACKGROUNDS[scene.background] for obj in scene.objects)
    # Every attribute value still occurs.
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {obj.colour for obj in objects} == set(COLOURS)
    assert {obj.motion for obj in objects} == set(MOTIONS)
    assert {obj.size for obj in objects} == set(SIZES)


def test_held_out_combinations_appear_when_included():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, include_held_out=True, max_objects=1) for _ in range(3000)]
    assert any(is_held_out(scene.objects[0]) for scene in scenes)
    assert all(len(scene.objects) == 1 for scene in scenes)


def test_restricted_world_draws_only_the_allowed_values():
    restrict = {"colour": ["blue", "red"], "motion": ["left", "right", "up", "down"], "background": ["white"]}
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, restrict=restrict) for _ in range(500)]
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {scene.background for scene in scenes} == {"white"}
    assert {obj.colour for obj in objects} == {"red", "blue"}
    assert {obj.motion for obj in objects} == {"left", "right", "up", "down"}
    assert {obj.shape for obj in objects} == set(SHAPES)  # unrestricted attributes keep every value
    assert not any(is_held_out(obj) for obj in objects)  # ("red", "triangle", "up") is still held out
    # One allowed colour cannot fill a two-object scene: scenes then hold one object.
    rng = np.random.default_rng(0)
    assert {len(sample_scene(rng, restrict={"colour": ["red"]}).objects) for _ in range(50)} == {1}
    world = ShapesWorld(num_frames=5, length=20, max_objects=1, restrict={"shape": ["square"], "size": ["small"]})
    assert {(obj.shape, obj.size) for item in world for obj in scene_from_json(item["scene"]).objects} == {
        ("square", "small")
    }


@pytest.mark.parametrize(
    "restrict, message",
    [
        ({"speed": ["fast"]}, "cannot restrict 'speed'"),
        ({"colour": ["purple"]}, "unknown colour 'purple'"),
        ({"colour": "red"}, "non-empty list"),
        ({"motion": []}, "non-empty list"),
        ({"colour": ["white"], "background": ["white", "black"]}, "visible on a white background"),
        ({"colour": ["red"], "shape": ["triangle"], "motion": ["up"]}, "held out"),
    ],
)
def test_impossible_restrictions_are_rejected_when_the_world_is_made(restrict, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorld(restrict=restrict)


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError, match="invisible"):
        single(colour="white", background="white")
    with pytest.raises(ValueError, match="distinct"):
        SceneSpec("black", (ObjectSpec("circle", "red", "small", "left"), ObjectSpec("square", "red", "large", "up")))
    with pytest.raises(ValueError, match="unknown shape"):
        ObjectSpec("hexagon", "red", "small", "left")


def test_render_uses_only_scene_colours_and_keeps_bouncing_and_still_objects_whole():
    scene = SceneSpec(
        "gray", (ObjectSpec("triangle", "cyan", "small", "bouncing"), ObjectSpec("square", "orange", "large", "still"))
    )
    clip = render_clip(scene, 33, 64, 64, np.random.default_rng(1))
    assert clip.shape == (33, 64, 64, 3) and clip.dtype == np.uint8
    allowed = {BACKGROUNDS["gray"], COLOURS["cyan"], COLOURS["orange"]}
    assert {tuple(int(v) for v in rgb) for rgb in np.unique(clip.reshape(-1, 3), axis=0)} == allowed
    # The top object is never occluded and never leaves the frame: its area is constant.
    area = (clip == np.array(COLOURS["orange"])).all(-1).sum((1, 2))
    assert area.min() == area.max() > 0


def torus_steps(clip: np.ndarray, colour: str, axis: int) -> np.ndarray:
    """Per-frame steps [T - 1] along an axis of the centre of one colour's bounding box on the
    torus the frame is (while an object wraps, it shows at both edges), unwrapped."""
    occupied = (clip == np.array(COLOURS[colour])).all(-1).any(axis=1 + axis)  # [T, size along the axis]
    size = occupied.shape[1]
    centres = []
    for row in occupied:
        cells = np.flatnonzero(row)
        gaps = np.diff(np.concatenate([cells, cells[:1] + size]))
        last = int(np.argmax(gaps))  # the box ends before the widest empty run...
        first = cells[(last + 1) % len(cells)]  # ...and starts after it
        centres.append(first + ((cells[last] - first) % size) / 2)
    steps = np.diff(np.array(centres))
    return np.where(np.abs(steps) > size / 2, steps - np.sign(steps) * size, steps)


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_directional_movers_wrap_around_at_steady_speed(motion):
    axis, sign = DIRECTIONS[motion]
    for seed in range(4):
        # 97 frames at 1-1.5 px/frame travel more than the 64 px frame: at least one wrap.
        clip = render_clip(single(motion=motion), 97, 64, 64, np.random.default_rng(seed))
        mask = (clip == np.array(COLOURS["red"])).all(-1)
        area = mask.sum((1, 2))
        assert area.min() > 0.9 * area.max()  # what leaves one edge is back in at the other
        edges = mask.any(axis=1 + axis)[:, [0, -1]]  # [T, 2]: touches the first / last row or column
        assert edges.all(1).any()  # a frame where it shows at both edges: a wrap
        steps = sign * torus_steps(clip, "red", axis)  # whole pixels, so 0 to 2 a frame
        assert np.all(steps >= 0) and np.all(steps <= 2) and 0.95 < steps.mean() < 1.55
        assert np.all(torus_steps(clip, "red", 1 - axis) == 0)  # no drift across the axis


def test_directional_clips_start_anywhere_so_short_clips_often_wrap():
    starts, wraps = [], 0
    for seed in range(200):
        clip = render_clip(single(size="small", motion="right"), 21, 64, 64, np.random.default_rng(seed))
        columns = (clip == np.array(COLOURS["red"])).all(-1).any(1)  # [T, W]
        starts.append(np.flatnonzero(columns[0]).mean())
        wraps += int((columns[:, 0] & columns[:, -1]).any())
    assert min(starts) < 8 and max(starts) > 56 and 20 < np.median(starts) < 44  # starts anywhere
    assert 80 < wraps < 150  # about (travel + object width) / frame width: (25 + 12) / 64 of the clips


def test_still_stays_still():
    clip = render_clip(single(motion="still"), 45, 64, 64, np.random.default_rng(0))
    assert (clip == clip[:1]).all()


def test_clips_of_any_length():
    for frames in (1, 5, 21, 93, 241):
        assert ShapesWorld(num_frames=frames, length=2)[1]["video"].shape == (3, frames, 64, 64)


def test_bouncing_moves_diagonally_and_reflects_off_walls():
    clip = render_clip(single(size="small", motion="bouncing"), 65, 64, 64, np.random.default_rng(0))
    track = colour_centroids(clip, "red")
    velocity = np.diff(track, axis=0)
    assert (np.abs(velocity) > 0.5).mean() > 0.9  # moving on both axes nearly every frame
    assert (np.diff(np.sign(velocity), axis=0) != 0).any()  # at least one reflection


def test_sizes_scale_with_resolution_and_non_square_frames_work():
    small = (render_clip(single(size="small", motion="still"), 1, 64, 64, np.random.default_rng(0)) != 10).any(-1)
    large = (render_clip(single(size="large", motion="still"), 1, 64, 64, np.random.default_rng(0)) != 10).any(-1)
    assert large.sum() > 2.5 * small.sum()
    wide = render_clip(single(size="large", motion="right"), 17, 48, 96, np.random.default_rng(0))
    assert wide.shape == (17, 48, 96, 3)
    big = render_clip(single(size="large", motion="still"), 1, 128, 128, np.random.default_rng(0))
    assert (big != 10).any(-1).sum() == pytest.approx(4 * large.sum(), rel=0.1)


def test_num_frames_must_be_one_plus_multiple_of_four():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        render_clip(single(), 32, 64, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ShapesWorld(num_frames=16)


def test_random_captions_vary_and_name_the_attributes():
    scene = SceneSpec(
        "black", (ObjectSpec("circle", "red", "small", "left"), ObjectSpec("square", "blue", "large", "still"))
    )
    rng = np.random.default_rng(0)
    captions = [random_caption(scene, rng) for _ in range(100)]
    assert len(set(captions)) > 50
    for caption in captions:
        assert "red" in caption and "blue" in caption and " and " in caption
        assert any(word in caption for word in ("circle", "ball", "disc", "dot"))
        assert any(word in caption for word in ("black", "dark"))
        assert any(word in caption for word in ("still", "not moving", "at rest", "staying put", *STILL_ADJECTIVES))
    assert any("small" in c or "tiny" in c or "little" in c for c in captions)
    assert any(not any(w in c for w in ("small", "tiny", "little", "large", "big")) for c in captions)


def test_canonical_caption_is_fixed():
    assert canonical_caption(single(size="small", motion="bouncing", background="gray")) == (
        "a small red circle bouncing around on a gray background"
    )
    pair = SceneSpec(
        "white", (ObjectSpec("triangle", "cyan", "large", "up"), ObjectSpec("square", "blue", "small", "still"))
    )
    assert canonical_caption(pair) == (
        "a large cyan triangle moving up and a small blue square standing still on a white background"
    )


def test_dataset_items_are_pure_functions_of_seed_and_index():
    world = ShapesWorld(num_frames=9, seed=3)
    first, again = world[5], ShapesWorld(num_frames=9, seed=3)[5]
    assert torch.equal(first["video"], again["video"]) and first["caption"] == again["caption"]
    assert not torch.equal(first["video"], world[6]["video"])
    assert not torch.equal(first["video"], ShapesWorld(num_frames=9, seed=4)[5]["video"])
    with pytest.raises(IndexError):
        ShapesWorld(length=10)[10]


def test_dataset_item_format_and_collation():
    item = ShapesWorld()[0]
    video = item["video"]
    assert video.shape == (3, 33, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    scene = scene_from_json(item["scene"])
    assert scene_to_json(scene) == item["scene"] and json.loads(item["scene"])["background"] in BACKGROUNDS
    # Pixels are exactly the background or an object colour, mapped to [-1, 1].
    background = torch.tensor(BACKGROUNDS[scene.background]).float().div(127.5).sub(1)
    assert torch.allclose(video[:, 0, 0, 0], background) or any(
        torch.allclose(video[:, 0, 0, 0], torch.tensor(COLOURS[o.colour]).float().div(127.5).sub(1))
        for o in scene.objects
    )
    batch = next(iter(torch.utils.data.DataLoader(ShapesWorld(num_frames=9, length=4), batch_size=2)))
    assert batch["video"].shape == (2, 3, 9, 64, 64) and len(batch["caption"]) == 2 and len(batch["scene"]) == 2


def test_training_world_excludes_held_out():
    world = ShapesWorld(num_frames=5, length=200)
    assert not any(is_held_out(obj) for item in world for obj in scene_from_json(item["scene"]).objects)


def test_rendering_is_fast():
    scene = SceneSpec(
        "gray", (ObjectSpec("circle", "red", "large", "bouncing"), ObjectSpec("triangle", "blue", "small", "up"))
    )
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(20):
        render_clip(scene, 33, 64, 64, rng)
    assert (time.perf_counter() - start) / 20 < 0.02  # a few ms normally; generous for a busy machine


def test_block_first_frames_follow_the_autoencoders_time_compression():
    # Latent frame 0 is pixel frame 0; latent frame k > 0 covers pixel frames 4k - 3 .. 4k.
    assert [block_first_frame(b, 3) for b in range(4)] == [0, 9, 21, 33]
    assert [block_first_frame(b, 1) for b in range(3)] == [0, 1, 5]


@pytest.mark.parametrize("attribute", SWITCH_ATTRIBUTES)
def test_a_switch_changes_one_attribute_to_an_allowed_value(attribute):
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        switched = switched_scene(scene, attribute, rng)
        before, after = json.loads(scene_to_json(scene)), json.loads(scene_to_json(switched))
        changed = [key for key in ("background",) if before[key] != after[key]] + [
            f"{i}.{key}" for i, (a, b) in enumerate(zip(before["objects"], after["objects"]))
            for key in a if a[key] != b[key]
        ]
        assert changed == [attribute if attribute == "background" else f"0.{attribute}"]
        assert not any(is_held_out(obj) for obj in switched.objects)
    with pytest.raises(ValueError, match="no allowed colour"):
        switched_scene(single(colour="red"), "colour", rng, restrict={"colour": ["red"]})


def test_switch_clips_cut_at_a_block_boundary_and_objects_carry_on():
    world = ShapesWorld(num_frames=45, switch_probability=1.0, max_objects=1, seed=2)
    seen_attributes = set()
    for index in range(40):
        item = world[index]
        first = item["switch_frame"]
        assert first in (9, 21, 33)  # blocks 1-3 of a 4-block clip
        before, after = scene_from_json(item["scene"]), scene_from_json(item["switch_scene"])
        assert item["switch_caption"] != item["caption"] and before != after
        clip = ((item["video"].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        # The background is the new scene's from the switch frame on, the old one's before it.
        assert tuple(clip[first - 1, 0, 0]) in {BACKGROUNDS[before.background], COLOURS[before.objects[0].colour]}
        assert tuple(clip[first, 0, 0]) in {BACKGROUNDS[after.background], COLOURS[after.objects[0].colour]}
        # The object is where it was: its centre moves at most its speed (plus rasterisation) across the cut.
        old = (clip[first - 1] == np.array(COLOURS[before.objects[0].colour])).all(-1)
        new = (clip[first] == np.array(COLOURS[after.objects[0].colour])).all(-1)
        if not (old.any(0)[[0, -1]].all() or old.any(1)[[0, -1]].all()):  # not mid-wrap
            box_centre = lambda mask: (np.argwhere(mask).min(0) + np.argwhere(mask).max(0)) / 2
            assert np.abs(box_centre(new) - box_centre(old)).max() <= 2
        changed = {k for k in ("background", "shape", "colour", "motion")
                   if (getattr(before, k) if k == "background" else getattr(before.objects[0], k))
                   != (getattr(after, k) if k == "background" else getattr(after.objects[0], k))}
        seen_attributes |= changed
    assert seen_attributes == set(SWITCH_ATTRIBUTES)
    plain = ShapesWorld(num_frames=45, switch_probability=0.5, seed=2)
    frames = [plain[i]["switch_frame"] for i in range(40)]
    assert 10 < frames.count(45) < 30  # about half the clips do not switch
