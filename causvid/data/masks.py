"""Where the objects are in a shapes-world video: pixels off the flat background, grown masks,
per-pixel loss weights, distances from objects, and the latent cells that hold an object."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from causvid.models.autoencoder import TEMPORAL_FACTOR


def object_pixels(video: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, H, W]: pixels that differ from their frame's median colour (the background)."""
    background = video.flatten(3).median(dim=3).values[..., None, None]
    return (video - background).abs().sum(dim=1, keepdim=True) > 0.1


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """A float mask [B, 1, T, H, W] grown by `pixels` in every direction within each frame."""
    if pixels <= 0:
        return mask
    k = 2 * pixels + 1
    return F.max_pool3d(mask, (1, k, k), stride=1, padding=(0, pixels, pixels))


def object_weights(video: torch.Tensor, weight: float, margin: int = 0) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, T, H, W]: 1 on background, 1 + weight on objects.

    Objects cover 3-6% of the pixels, so an unweighted loss learns the background first and
    the objects last. Weighting the object alone also makes a blurred edge cheapest on the
    background side, so objects come out dilated; `margin` > 0 extends the weight that many
    pixels past each object, so both sides of an edge weigh the same.
    """
    return 1 + weight * dilate(object_pixels(video).float(), margin)


def edge_distance(video: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Long [B, 1, T, H, W]: 0 on objects, k on background k pixels from one (chessboard distance,
    up to `max_distance`), max_distance + 1 farther away."""
    objects = object_pixels(video).float()
    return sum((1 - dilate(objects, k)).long() for k in range(max_distance + 1))


def latent_object_mask(video: torch.Tensor, spatial_factor: int) -> torch.Tensor:
    """Bool [B, F, H/s, W/s]: the latent cells of a clip (1 + 4k frames) that hold an object.

    A cell counts when any pixel it encodes does (the first latent frame encodes one frame,
    later ones four), dilated by one cell because the autoencoder's convolutions spread edges.
    """
    pixels = object_pixels(video).float()
    s = spatial_factor
    cells = torch.cat([F.max_pool3d(pixels[:, :, :1], (1, s, s)),
                       F.max_pool3d(pixels[:, :, 1:], (TEMPORAL_FACTOR, s, s))], dim=2)
    return dilate(cells, 1)[:, 0] > 0
