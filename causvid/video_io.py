"""Writing and reading uint8 videos [T, H, W, 3]: mp4 (H.264 via PyAV), gif (Pillow) and npy."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from causvid.errors import UserError


VIDEO_SUFFIXES = (".mp4", ".gif", ".npy")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


class Mp4Writer:
    """Incremental H.264 writer, for streams whose length is not known up front."""

    def __init__(self, path: str | Path, fps: int, crf: int = 18):
        import av

        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        import av

        if self.frames == 0:
            # yuv420p needs even sizes; the first frame fixes them.
            height, width = frame.shape[:2]
            if height % 2 or width % 2:
                raise UserError(f"mp4 needs even frame sizes, got {width}x{height}")
            self.stream.height, self.stream.width = height, width
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: int = 16) -> Path:
    """Write frames to .mp4, .gif or .npy, chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"{path}: unsupported output type {suffix!r} (use one of {', '.join(VIDEO_SUFFIXES)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _check_frames(np.stack(list(frames)) if not isinstance(frames, np.ndarray) else frames)
    if suffix == ".npy":
        np.save(path, frames)
    elif suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        with Mp4Writer(path, fps) as writer:
            for frame in frames:
                writer.write(frame)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file (or .npy) to uint8 [T, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix.lower() == ".npy":
        return _check_frames(np.load(path, allow_pickle=False))
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError) as error:
        raise UserError(f"{path}: cannot decode video ({error})") from None
    if not frames:
        raise UserError(f"{path}: no video frames")
    return np.stack(frames)
