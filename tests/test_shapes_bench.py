"""Tests for shapes-bench (causvid.eval.shapes_bench)."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from causvid.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    MOTIONS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    canonical_caption,
    is_held_out,
    render_clip,
)
from causvid.eval.shapes_bench import (
    METRICS,
    analyze_video,
    contact_sheet,
    default_prompt_set,
    format_table,
    run_bench,
)


def single(shape="circle", colour="red", size="large", motion="left", background="black") -> SceneSpec:
    return SceneSpec(background, (ObjectSpec(shape, colour, size, motion),))


def render(scene: SceneSpec, seed: int = 0, num_frames: int = 33) -> np.ndarray:
    return render_clip(scene, num_frames, 64, 64, np.random.default_rng(seed))


def test_default_prompt_set_covers_held_out_and_spreads_seen_cases():
    cases = default_prompt_set()
    assert cases == default_prompt_set()  # deterministic
    held_out = [c for c in cases if c.split == "held_out"]
    seen = [c for c in cases if c.split == "seen"]
    assert sorted((o.colour, o.shape, o.motion) for c in held_out for o in c.scene.objects) == sorted(HELD_OUT)
    assert not any(is_held_out(o) for c in seen for o in c.scene.objects)
    singles = [c.scene.objects[0] for c in seen if len(c.scene.objects) == 1]
    assert len(singles) == 16 and any(len(c.scene.objects) == 2 for c in seen)
    assert {o.shape for o in singles} == set(SHAPES) and {o.motion for o in singles} == set(MOTIONS)
    assert len({o.colour for o in singles}) == len(COLOURS)
    assert {c.scene.background for c in seen} == set(BACKGROUNDS)
    assert all(c.prompt == canonical_caption(c.scene) for c in cases)
    assert len(default_prompt_set(num_seen=4, num_pairs=0)) == 4 + len(HELD_OUT)


def test_prompt_set_of_a_restricted_world_stays_inside_it():
    directions = ["left", "right", "up", "down"]
    narrow = {"colour": ["red"], "shape": ["circle"], "size": ["large"], "background": ["black"], "motion": directions}
    cases = default_prompt_set(num_pairs=0, restrict=narrow)
    # Sixteen draws from four possible scenes: each scene once, every direction covered.
    assert sorted(c.scene.objects[0].motion for c in cases) == sorted(directions)
    assert all(c.split == "seen" and c.scene.background == "black" for c in cases)
    # Only the held-out combinations inside the restriction are kept, on allowed sizes and backgrounds.
    cases = default_prompt_set(num_pairs=0, restrict={"motion": directions, "size": ["small"], "background": ["gray"]})
    held_out = [c.scene.objects[0] for c in cases if c.split == "held_out"]
    assert sorted((o.colour, o.shape, o.motion) for o in held_out) == sorted(
        combination for combination in HELD_OUT if combination[2] in directions
    )
    assert all(o.size == "small" for o in held_out) and {c.scene.background for c in cases} == {"gray"}
    with pytest.raises(ValueError, match="no valid seen scene of 2 objects"):
        default_prompt_set(num_pairs=1, restrict=narrow)


def test_eval_command_prompts_within_a_restricted_world(tmp_path):
    import json

    from causvid.cli import main

    out = tmp_path / "gt.json"
    assert main(["eval", "--ground-truth", "--restrict", "colour=red,blue", "--restrict", "motion=left,right",
                 "--num-seen", "4", "--num-pairs", "0", "--seeds", "0", "--frames", "9", "-o", str(out)]) == 0
    objects = [obj for case in json.loads(out.read_text())["cases"] for obj in case["scene"]["objects"]]
    assert objects and {obj["colour"] for obj in objects} <= {"red", "blue"}
    assert {obj["motion"] for obj in objects} <= {"left", "right"}
    assert main(["eval", "--ground-truth", "--restrict", "speed=fast", "--frames", "9"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--ground-truth", "--restrict", "colour"])


def test_ground_truth_reaches_the_ceiling():
    cases = [c for c in default_prompt_set(num_seen=6, num_pairs=1)]
    report = run_bench(None, cases, num_frames=33, seeds=(0,))
    json.dumps(report)  # serialisable
    for split in ("seen", "held_out", "all"):
        means = report["splits"][split]
        for name in ("colour", "shape", "direction", "background_consistency"):
            assert means[name] >= 0.95, (split, name, means[name])
        assert means["subject_consistency"] >= 0.9
        assert means["flicker"] < 0.01
    assert report["splits"]["seen"]["count"] == 7 and report["splits"]["held_out"]["count"] == len(HELD_OUT)
    assert report["timing"]["videos"] == len(cases)
    assert len(report["cases"]) == len(cases) and report["cases"][0]["runs"][0]["seed"] == 0


@pytest.mark.parametrize("size", ["small", "large"])
def test_every_shape_and_motion_is_recognised_on_ground_truth(size):
    for index, (shape, motion) in enumerate(zip(SHAPES * 2, MOTIONS)):
        scene = single(shape=shape, colour="yellow", size=size, motion=motion, background="gray")
        result = analyze_video(render(scene, seed=index), scene)
        assert result["predicted_shape"] == [shape] and result["predicted_motion"] == [motion]


def test_blurred_noisy_ground_truth_still_scores_high():
    # Generated videos are soft and noisy; blurred edges must not change colours or shapes.
    rng = np.random.default_rng(0)
    results = []
    for index, case in enumerate(default_prompt_set(num_seen=8, num_pairs=0)):
        video = np.stack([cv2.GaussianBlur(frame, (0, 0), 1.0) for frame in render(case.scene, seed=index)])
        noisy = np.clip(video + rng.normal(0, 6, video.shape), 0, 255).astype(np.uint8)
        results.append(analyze_video(noisy, case.scene))
    assert np.mean([r["colour"] for r in results]) > 0.95
    assert np.mean([r["shape"] for r in results]) > 0.95
    assert np.mean([r["direction"] for r in results]) == 1
    assert np.mean([r["background_consistency"] for r in results]) > 0.95


def test_wrong_video_scores_zero():
    video = render(single(shape="square", colour="blue", motion="right"))
    wrong_everything = analyze_video(video, single(shape="circle", colour="red", motion="left"))
    assert wrong_everything["colour"] == 0 and wrong_everything["shape"] == 0 and wrong_everything["direction"] == 0
    # Right colour, wrong shape and direction: the metrics are independent.
    right_colour = analyze_video(video, single(shape="circle", colour="blue", motion="left"))
    assert right_colour["colour"] == 1 and right_colour["shape"] == 0 and right_colour["direction"] == 0
    assert right_colour["predicted_shape"] == ["square"] and right_colour["predicted_motion"] == ["right"]
    # Wrong background: the requested gray is nowhere.
    assert analyze_video(video, single(colour="blue", background="gray"))["background_consistency"] == 0


def test_travel_is_speed_along_the_named_direction_and_signed():
    scene = single(motion="right")
    video = render(scene)
    travel = analyze_video(video, scene)["travel"]
    assert 1.0 <= travel <= 1.5  # the world's speed range, pixels per frame at 64 px
    assert analyze_video(video[::-1], scene)["travel"] == pytest.approx(-travel)  # the wrong way
    assert analyze_video(video, single(motion="left"))["travel"] == pytest.approx(-travel)
    assert analyze_video(video, single(motion="down"))["travel"] == pytest.approx(0, abs=0.05)  # across its path
    for motion in ("still", "bouncing"):
        assert analyze_video(render(single(motion=motion)), single(motion=motion))["travel"] is None


def test_noise_scores_low():
    scene = single(shape="triangle", colour="green", motion="up", background="gray")
    noise = np.random.default_rng(0).integers(0, 256, size=(33, 64, 64, 3), dtype=np.uint8)
    result = analyze_video(noise, scene)
    truth = analyze_video(render(scene), scene)
    assert result["colour"] < 0.2 and result["shape"] < 0.2 and result["direction"] == 0
    assert result["background_consistency"] < 0.5
    assert result["flicker"] > 0.1 and truth["flicker"] == 0
    assert result["mawe"] > 5 * truth["mawe"]


def test_temporal_artifacts_are_penalised():
    scene = single(size="small", motion="right", background="white")
    video = render(scene)
    truth = analyze_video(video, scene)
    # Shuffled frames: same content, jumpy trajectory.
    shuffled = analyze_video(video[np.random.default_rng(0).permutation(len(video))], scene)
    assert shuffled["jerk"] > 5 * truth["jerk"]
    # Object vanishing every other frame: colour adherence and area stability drop.
    blinking = video.copy()
    blinking[1::2] = BACKGROUNDS["white"]
    blink = analyze_video(blinking, scene)
    assert blink["colour"] == pytest.approx(17 / 33) and blink["subject_consistency"] < 0.2
    # Background brightness jitter: flicker rises although the colour still classifies.
    jittered = video.astype(np.int16) + np.random.default_rng(0).integers(-20, 21, size=(33, 1, 1, 1))
    jitter = analyze_video(np.clip(jittered, 0, 255).astype(np.uint8), scene)
    assert jitter["flicker"] > 0.02 and truth["flicker"] == 0 and jitter["background_consistency"] > 0.95


def test_two_object_scenes_average_over_objects():
    scene = SceneSpec(
        "black", (ObjectSpec("circle", "red", "large", "left"), ObjectSpec("square", "cyan", "small", "still"))
    )
    video = render(scene)
    assert analyze_video(video, scene)["colour"] == 1
    half_wrong = SceneSpec(
        "black", (ObjectSpec("circle", "red", "large", "left"), ObjectSpec("square", "blue", "large", "still"))
    )
    result = analyze_video(video, half_wrong)
    assert result["colour"] == 0.5 and result["predicted_motion"] == ["left", "unknown"]
    # A requested colour outnumbered by an unrequested one does not count as adherent.
    outnumbered = SceneSpec("black", (ObjectSpec("square", "cyan", "small", "still"),))
    assert analyze_video(video, outnumbered)["colour"] == 0  # the unrequested large red circle dominates


def test_run_bench_calls_the_generator_and_validates_its_output():
    cases = default_prompt_set(num_seen=2, num_pairs=0)[:2]
    calls = []

    def generate_blank(prompt, seed, num_frames):
        calls.append((prompt, seed, num_frames))
        return np.full((num_frames, 64, 64, 3), 128, dtype=np.uint8)

    report = run_bench(generate_blank, cases, num_frames=9, seeds=(0, 1))
    assert calls == [(c.prompt, s, 9) for c in cases for s in (0, 1)]
    assert report["source"] == "model" and report["splits"]["all"]["colour"] == 0
    assert report["splits"]["held_out"]["count"] == 0 and report["splits"]["held_out"]["colour"] is None
    with pytest.raises(ValueError, match="uint8"):
        run_bench(lambda p, s, n: np.zeros((n, 64, 64, 3), np.float32), cases, num_frames=9, seeds=(0,))


def test_format_table_lists_every_metric():
    report = run_bench(None, default_prompt_set(num_seen=1, num_pairs=0)[:1], num_frames=9, seeds=(0,))
    table = format_table(report)
    for name in METRICS:
        assert name in table
    assert "seen" in table and "held_out" in table and f"{report['splits']['seen']['colour']:.3f}" in table


def test_contact_sheet_writes_a_grid(tmp_path):
    videos = [render(single(motion="right")), render(single(colour="cyan", motion="down"))]
    path = contact_sheet(videos, ["red right", "cyan down"], tmp_path / "sheets" / "grid.png", frames_per_video=4)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 2 * 64 and image.shape[1] > 4 * 64
    # Both videos' colours appear in the sheet.
    for colour in ("red", "cyan"):
        assert (image == np.array(COLOURS[colour])).all(-1).any()
    with pytest.raises(ValueError, match="label"):
        contact_sheet(videos, ["only one"], tmp_path / "bad.png")


def test_eval_command_scores_an_autoencoder_round_trip(tiny_checkpoint, tmp_path, capsys):
    import json

    from causvid.cli import main

    out = tmp_path / "ae.json"
    assert main(["eval", "--autoencoder", str(tiny_checkpoint / "vae"), "--seeds", "0", "--num-seen", "2",
                 "--frames", "9", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    # A random-weight autoencoder destroys the picture: low PSNR, and the judge sees it.
    assert report["autoencoder_psnr_db"] < 15
    low, high = report["autoencoder_clip_psnr_db_range"]
    assert low <= report["autoencoder_psnr_db"] <= high
    regions = report["autoencoder_error_by_edge_distance"]
    assert sum(region["error_share"] for region in regions) == pytest.approx(1.0)
    assert report["splits"]["all"]["colour"] < 0.5
    assert "PSNR" in capsys.readouterr().out
