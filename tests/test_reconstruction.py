"""Reconstruction error by distance from the nearest object."""

from __future__ import annotations

import pytest
import torch

from causvid.eval.reconstruction import ReconstructionError, format_regions
from causvid.data.masks import edge_distance


def _square_on_black(low: int, high: int) -> torch.Tensor:
    video = -torch.ones(1, 3, 2, 16, 16)
    video[:, :, :, low:high, low:high] = 1.0
    return video


def test_edge_distance_counts_pixels_out_from_the_object():
    distance = edge_distance(_square_on_black(6, 9), max_distance=2)[0, 0, 0]
    assert distance[7, 7] == 0 and distance[6, 6] == 0  # on the object
    assert distance[5, 7] == 1 and distance[5, 5] == 1  # beside it, diagonals included
    assert distance[4, 7] == 2 and distance[3, 7] == 3 and distance[0, 0] == 3  # 3 = farther than 2


def test_a_dilated_object_puts_all_the_error_one_pixel_outside():
    errors = ReconstructionError(max_distance=2)
    video = _square_on_black(6, 9)
    errors.add(_square_on_black(5, 10), video)  # the object grown by one pixel
    report = errors.report()
    regions = {region["region"]: region for region in report["by_edge_distance"]}
    assert list(regions) == ["object", "1 px outside", "2 px outside", "farther"]
    assert regions["1 px outside"]["error_share"] == pytest.approx(1.0)
    assert regions["1 px outside"]["psnr_db"] == pytest.approx(0.0)  # every pixel there is off by the full range
    assert regions["object"]["error_share"] == 0 and regions["object"]["pixel_share"] == pytest.approx(9 / 256)
    assert sum(region["pixel_share"] for region in regions.values()) == pytest.approx(1.0)
    assert report["clips"] == 1 and report["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(256 / 16)).item())
    assert "1 px outside" in format_regions(report)


def test_the_first_frame_is_pooled_apart_from_the_rest():
    errors = ReconstructionError()
    video = _square_on_black(6, 9)
    reconstruction = video.clone()
    reconstruction[:, :, 0, 0, 0] = 1.0  # one wrong pixel in frame 0 only
    errors.add(reconstruction, video)
    report = errors.report()
    assert report["first_frame_psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(256.0)).item())
    assert report["later_frames_psnr_db"] > 100  # no error there: only the floor on the error
    assert "first frame 24.1 dB" in format_regions(report)


def test_clip_psnrs_are_averaged_and_their_range_kept():
    errors = ReconstructionError()
    video = _square_on_black(6, 9)
    for wrong_pixels in (1, 10):
        reconstruction = video.clone()
        reconstruction[:, :, 0, 0, :wrong_pixels] = 1.0  # pixels off by the full range
        errors.add(reconstruction, video)
    report = errors.report()
    one, ten = (10 * torch.log10(torch.tensor(256.0 * video.shape[2] / n)).item() for n in (1, 10))
    assert report["clip_psnr_db_range"] == pytest.approx([ten, one])
    assert report["psnr_db"] == pytest.approx((one + ten) / 2)
    assert f"clips from {ten:.1f} to {one:.1f} dB" in format_regions(report)
