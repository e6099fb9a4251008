"""Folder-of-videos dataset for training on one's own clips.

The folder holds video files plus a caption file: JSONL lines
``{"file": "a.mp4", "caption": "..."}`` or a CSV with a ``file,caption`` header.
Each item is ``num_frames`` frames from the start of a video (sampled at ``fps``, resized on the
shorter side and centre-cropped), in the same format as ``ShapesWorld`` items. Files the
captions name but the folder lacks are listed once and left out; a video that cannot be decoded
or is too short is skipped, with one warning, for the next readable one.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from causvid.data.shapes import check_num_frames
from causvid.errors import UserError
from causvid.frames import clip_to_tensor


if TYPE_CHECKING:
    import av

logger = logging.getLogger(__name__)

# Slack when comparing frame timestamps with sampling times (timestamps are rounded).
TIMESTAMP_TOLERANCE_S = 1e-3


@dataclass(frozen=True)
class CaptionedVideo:
    """A video file and its caption."""

    path: Path
    caption: str


class VideoFolderDataset(torch.utils.data.Dataset):
    """Captioned videos from a folder; items are ``{"video": [3, T, H, W] in [-1, 1], "caption": str,
    "index": the video's index}``. The index differs from the one asked for when that video was skipped."""

    flat_background = False  # real footage: no object masks against a flat background

    def __init__(
        self,
        root: str | Path,
        num_frames: int = 33,
        height: int = 64,
        width: int = 64,
        fps: float | None = None,
        captions: str = "captions.jsonl",
    ) -> None:
        check_num_frames(num_frames)
        if fps is not None and fps <= 0:
            raise UserError(f"fps must be positive or None, got {fps}")
        self.root = Path(root)
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.fps = fps
        self.videos = read_caption_file(self.root / captions, self.root)
        self._skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def captions(self) -> list[str]:
        return [video.caption for video in self.videos]

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.videos)):
            video = self.videos[(index + offset) % len(self.videos)]
            if video.path in self._skipped:
                continue
            try:
                frames = decode_frames(video.path, self.num_frames, self.fps)
                if len(frames) < self.num_frames:
                    raise UserError(f"{len(frames)} frames, fewer than the {self.num_frames} a clip needs")
            except UserError as error:
                self._skipped.add(video.path)
                logger.warning("skipping %s (%s); %d skipped so far", video.path, error, len(self._skipped))
                continue
            clip = np.stack([resize_and_crop(frame, self.height, self.width) for frame in frames])
            return {"video": clip_to_tensor(clip), "caption": video.caption, "index": (index + offset) % len(self.videos)}
        raise UserError(f"{self.root}: none of the {len(self.videos)} videos can be read as {self.num_frames}-frame clips")


def read_caption_file(path: Path, root: Path) -> list[CaptionedVideo]:
    """Parse a JSONL or CSV caption file; the videos it names that do not exist are listed once and left out."""
    if not path.is_file():
        raise UserError(f"caption file not found: {path}")
    if path.suffix == ".jsonl":
        entries = _read_jsonl(path)
    elif path.suffix == ".csv":
        entries = _read_csv(path)
    else:
        raise UserError(f"caption file {path} must end in .jsonl or .csv")
    if not entries:
        raise UserError(f"caption file {path} lists no videos")
    videos = [CaptionedVideo(root / file, caption) for _, file, caption in entries]
    missing = [f"{path.name}:{line} {file}" for line, file, _ in entries if not (root / file).is_file()]
    if len(missing) == len(entries):
        raise UserError(f"{path}: none of the {len(entries)} videos it names is in {root}")
    if missing:
        logger.warning("%d of %d videos named in %s are missing and left out: %s", len(missing), len(entries), path,
                       ", ".join(missing))
    return [video for video in videos if video.path.is_file()]


def _read_jsonl(path: Path) -> list[tuple[int, str, str]]:
    """(line number, file, caption) for each non-blank line."""
    entries = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{line}: not valid JSON ({error.msg})") from error
        entries.append(_check_entry(path, line, record))
    return entries


def _read_csv(path: Path) -> list[tuple[int, str, str]]:
    """(line number, file, caption) for each row after the header."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{path}: CSV header must contain 'file' and 'caption', got {reader.fieldnames}")
        return [_check_entry(path, reader.line_num, row) for row in reader]


def _check_entry(path: Path, line: int, record: object) -> tuple[int, str, str]:
    if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("file", "caption")):
        raise UserError(f"{path}:{line}: expected string fields 'file' and 'caption', got {record!r}")
    return line, record["file"], record["caption"]


def decode_frames(path: Path, num_frames: int, fps: float | None) -> list[Image.Image]:
    """Decode up to ``num_frames`` frames, sampled at ``fps`` (None = every frame)."""
    import av  # here, not at the top: training on the shapes world should not need PyAV

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            decoded = container.decode(container.streams.video[0])
            frames = list(_take(decoded, num_frames)) if fps is None else _resample(decoded, num_frames, fps, path)
    except av.FFmpegError as error:
        raise UserError(f"cannot decode video {path}: {error}") from error
    if not frames:
        raise UserError(f"video {path} contains no frames")
    return frames


def _take(frames: Iterable[av.VideoFrame], count: int) -> Iterable[Image.Image]:
    for index, frame in enumerate(frames):
        if index == count:
            return
        yield frame.to_image()


def _resample(frames: Iterable[av.VideoFrame], count: int, fps: float, path: Path) -> list[Image.Image]:
    """For each sampling time start + k / fps, keep the latest frame shown at that time."""
    picked: list[Image.Image] = []
    previous: av.VideoFrame | None = None
    start = None
    for frame in frames:
        if frame.time is None:
            raise UserError(f"video {path} has no frame timestamps; use fps=None")
        if start is None:
            start = frame.time
        # The previous frame stays on screen until this one appears.
        while previous is not None and start + len(picked) / fps < frame.time - TIMESTAMP_TOLERANCE_S:
            picked.append(previous.to_image())
            if len(picked) == count:
                return picked
        previous = frame
    # The last frame is on screen at its own timestamp.
    if previous is not None and start + len(picked) / fps <= previous.time + TIMESTAMP_TOLERANCE_S:
        picked.append(previous.to_image())
    return picked


def resize_and_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize so the image covers height x width, then centre-crop; returns uint8 [H, W, 3]."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left = (size[0] - width) // 2
    top = (size[1] - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))
