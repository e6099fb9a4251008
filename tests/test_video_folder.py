"""Tests for the folder-of-videos dataset (causvid.data.video_folder)."""

import json

import av
import numpy as np
import pytest
import torch

from causvid.data.video_folder import VideoFolderDataset
from causvid.errors import UserError

NUM_SOURCE_FRAMES = 20


def ramp_value(index: int) -> int:
    """Grey level of source frame ``index``: every frame is identifiable by brightness."""
    return 20 + 10 * index


def write_video(path, frames: np.ndarray, fps: int = 24) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with a 20-frame 48x80 brightness-ramp video, a 48x80 three-stripe video and captions."""
    root = tmp_path_factory.mktemp("videos")
    ramp = np.stack([np.full((48, 80, 3), ramp_value(i), dtype=np.uint8) for i in range(NUM_SOURCE_FRAMES)])
    write_video(root / "ramp.mp4", ramp)
    stripes = np.zeros((5, 48, 80, 3), dtype=np.uint8)
    stripes[:, :, :27] = (255, 0, 0)
    stripes[:, :, 27:54] = (0, 255, 0)
    stripes[:, :, 54:] = (0, 0, 255)
    write_video(root / "stripes.mp4", stripes)
    lines = [{"file": "ramp.mp4", "caption": "a brightening grey screen"}, {"file": "stripes.mp4", "caption": "flag"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


def brightness(video: torch.Tensor) -> np.ndarray:
    """Per-frame mean grey level in [0, 255] of a [3, T, H, W] video in [-1, 1]."""
    return ((video + 1) * 127.5).mean((0, 2, 3)).numpy()


def test_items_have_the_shapes_world_format(folder):
    dataset = VideoFolderDataset(folder, num_frames=9, height=32, width=32)
    assert len(dataset) == 2
    item = dataset[0]
    assert item["caption"] == "a brightening grey screen"
    assert item["video"].shape == (3, 9, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    np.testing.assert_allclose(brightness(item["video"]), [ramp_value(i) for i in range(9)], atol=3)


def test_fps_resampling_takes_every_other_frame_at_half_rate(folder):
    item = VideoFolderDataset(folder, num_frames=9, height=32, width=32, fps=12)[0]
    np.testing.assert_allclose(brightness(item["video"]), [ramp_value(2 * i) for i in range(9)], atol=3)


def test_too_short_and_corrupt_videos_are_skipped_with_one_warning_each(folder, tmp_path, caplog):
    for name in ("ramp.mp4", "stripes.mp4"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 50)
    lines = [{"file": "broken.mp4", "caption": "broken"}, {"file": "stripes.mp4", "caption": "five frames"},
             {"file": "ramp.mp4", "caption": "twenty frames"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = VideoFolderDataset(tmp_path, num_frames=9, height=16, width=16)
    with caplog.at_level("WARNING"):
        items = [dataset[i] for i in range(3)] + [dataset[0]]
    # Broken and too short (5 < 9 frames): each falls through to the next readable video.
    assert [(item["index"], item["caption"]) for item in items] == [(2, "twenty frames")] * 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "broken.mp4" in warnings[0] and "5 frames" in warnings[1]
    assert "2 skipped so far" in warnings[1]


def test_a_folder_with_no_readable_video_is_an_error(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 50)
    (tmp_path / "captions.jsonl").write_text('{"file": "broken.mp4", "caption": "x"}\n')
    with pytest.raises(UserError, match="none of the 1 videos can be read"):
        VideoFolderDataset(tmp_path, num_frames=5)[0]


def test_frames_are_centre_cropped_not_squashed(folder):
    video = VideoFolderDataset(folder, num_frames=5, height=32, width=32)[1]["video"]
    rgb = ((video[:, 0] + 1) * 127.5).permute(1, 2, 0).numpy()  # [H, W, 3]
    green_columns = (rgb[16, :, 1] > 128).sum()
    # 48x80 scales to 32x53 and the centre 32 columns keep ~18 green ones (squashing would keep ~11).
    assert 16 <= green_columns <= 20
    assert rgb[16, 0, 0] > 128 and rgb[16, -1, 2] > 128  # red on the left, blue on the right


def test_csv_captions(folder, tmp_path):
    (folder / "captions.csv").write_text('file,caption\nramp.mp4,"grey, getting brighter"\n')
    dataset = VideoFolderDataset(folder, num_frames=5, height=16, width=16, captions="captions.csv")
    assert len(dataset) == 1 and dataset[0]["caption"] == "grey, getting brighter"


def test_missing_caption_file(tmp_path):
    with pytest.raises(UserError, match="captions.jsonl"):
        VideoFolderDataset(tmp_path)


def test_captions_naming_missing_videos_are_listed_once_and_left_out(folder, tmp_path, caplog):
    (tmp_path / "ramp.mp4").write_bytes((folder / "ramp.mp4").read_bytes())
    lines = ['{"file": "gone.mp4", "caption": "x"}', '{"file": "ramp.mp4", "caption": "y"}', '{"file": "lost.mp4", "caption": "z"}']
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    with caplog.at_level("WARNING"):
        dataset = VideoFolderDataset(tmp_path, num_frames=5)
    assert dataset.captions == ["y"]
    [warning] = [r.getMessage() for r in caplog.records]
    assert "2 of 3 videos" in warning and "captions.jsonl:1 gone.mp4" in warning and "captions.jsonl:3 lost.mp4" in warning
    (tmp_path / "captions.jsonl").write_text(lines[0])
    with pytest.raises(UserError, match="none of the 1 videos it names"):
        VideoFolderDataset(tmp_path)


@pytest.mark.parametrize(
    "line, message",
    [('{"file": "a.mp4", "caption": ', "not valid JSON"), ('{"file": "a.mp4"}', "'caption'"), ("[1, 2]", "'file'")],
)
def test_malformed_jsonl_lines(tmp_path, line, message):
    (tmp_path / "captions.jsonl").write_text("\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        VideoFolderDataset(tmp_path)
    assert "captions.jsonl:2" in str(error.value)


def test_csv_without_the_required_header(tmp_path):
    (tmp_path / "captions.csv").write_text("path,text\na.mp4,hello\n")
    with pytest.raises(ValueError, match="header"):
        VideoFolderDataset(tmp_path, captions="captions.csv")


def test_unsupported_caption_extension(tmp_path):
    (tmp_path / "captions.txt").write_text("a.mp4 hello\n")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        VideoFolderDataset(tmp_path, captions="captions.txt")


def test_num_frames_is_validated(folder):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        VideoFolderDataset(folder, num_frames=8)


def test_training_on_the_shapes_world_needs_no_pyav():
    import subprocess
    import sys

    # A None entry in sys.modules makes `import av` fail, as on a machine without PyAV.
    code = ("import sys; sys.modules['av'] = None; import causvid.objectives, causvid.data; "
            "from causvid.data.shapes import ShapesWorld; ShapesWorld(num_frames=5, height=32, width=32)[0]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
