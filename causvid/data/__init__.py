"""Datasets: the procedural shapes world and a folder-of-videos dataset."""

import torch

from causvid.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    MOTIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    ShapesWorld,
    canonical_caption,
    is_held_out,
    random_caption,
    render_clip,
    sample_scene,
    scene_from_json,
    scene_to_json,
)
from causvid.data.video_folder import VideoFolderDataset
from causvid.errors import UserError


def build_dataset(data: dict) -> torch.utils.data.Dataset:
    """The dataset a training config names: {"type": "shapes", ...} or {"type": "folder", "root": ...}."""
    kwargs = {k: v for k, v in data.items() if k != "type"}
    kind = data.get("type", "shapes")
    if kind == "shapes":
        return ShapesWorld(**kwargs)
    if kind == "folder":
        from causvid.data.video_folder import VideoFolderDataset

        return VideoFolderDataset(**kwargs)
    raise UserError(f"unknown dataset type {kind!r} (expected 'shapes' or 'folder')")


__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT",
    "MOTIONS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "SceneSpec",
    "ShapesWorld",
    "VideoFolderDataset",
    "build_dataset",
    "canonical_caption",
    "is_held_out",
    "random_caption",
    "render_clip",
    "sample_scene",
    "scene_from_json",
    "scene_to_json",
]
