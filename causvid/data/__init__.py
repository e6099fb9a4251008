"""Datasets: the procedural shapes world and a folder-of-videos dataset."""

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
    "canonical_caption",
    "is_held_out",
    "random_caption",
    "render_clip",
    "sample_scene",
    "scene_from_json",
    "scene_to_json",
]
