"""An autoencoder's reconstruction error: PSNR per clip, where the error lies around objects, and
on a stream's first frame against the rest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from causvid.data.masks import edge_distance


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item() / 4  # range 2 -> 1
    return 10 * math.log10(1 / max(mse, 1e-12))


class ReconstructionError:
    """Accumulates reconstructions of shapes-world clips.

    Besides each clip's PSNR it pools the squared error by distance from the nearest object
    (on it, 1 to `max_distance` pixels outside, farther), which separates blur that spreads
    objects into the background from errors inside them or in the open background. It also
    pools the first frame apart from the rest: that frame is decoded from a latent frame of
    its own, and it is the first one a stream shows.
    """

    def __init__(self, max_distance: int = 3):
        self.max_distance = max_distance
        self.psnrs: list[float] = []
        self.squared_error = torch.zeros(max_distance + 2, dtype=torch.float64)
        self.pixels = torch.zeros(max_distance + 2, dtype=torch.float64)
        self.frame_error = {"first": 0.0, "later": 0.0}
        self.frame_pixels = {"first": 0, "later": 0}

    def add(self, reconstruction: torch.Tensor, video: torch.Tensor) -> None:
        """Both [B, 3, T, H, W] in [-1, 1]."""
        self.psnrs.append(psnr(reconstruction, video))
        error = (reconstruction.float().clamp(-1, 1) - video.float().clamp(-1, 1)).square().mean(1, keepdim=True) / 4
        distance = edge_distance(video, self.max_distance)
        self.squared_error += torch.bincount(distance.flatten(), error.flatten().double(), len(self.pixels))
        self.pixels += torch.bincount(distance.flatten(), minlength=len(self.pixels)).double()
        for name, part in (("first", error[:, :, :1]), ("later", error[:, :, 1:])):
            self.frame_error[name] += part.double().sum().item()
            self.frame_pixels[name] += part.numel()

    def region_names(self) -> list[str]:
        return ["object", *(f"{k} px outside" for k in range(1, self.max_distance + 1)), "farther"]

    def report(self) -> dict:
        """Mean PSNR over clips (dB) and its range, and per region: share of pixels, pooled PSNR, share
        of the error."""
        regions = []
        for name, error, pixels in zip(self.region_names(), self.squared_error.tolist(), self.pixels.tolist()):
            regions.append({
                "region": name,
                "pixel_share": pixels / self.pixels.sum().item(),
                "psnr_db": _pooled_psnr(error, pixels),
                "error_share": error / max(self.squared_error.sum().item(), 1e-12),
            })
        by_frame = {name: _pooled_psnr(self.frame_error[name], self.frame_pixels[name]) for name in self.frame_error}
        return {"psnr_db": sum(self.psnrs) / len(self.psnrs), "clips": len(self.psnrs),
                "clip_psnr_db_range": [min(self.psnrs), max(self.psnrs)], "by_edge_distance": regions,
                "first_frame_psnr_db": by_frame["first"], "later_frames_psnr_db": by_frame["later"]}


def _pooled_psnr(squared_error: float, pixels: float) -> float | None:
    """PSNR of pooled squared error (range 1), None over no pixels."""
    return 10 * math.log10(pixels / max(squared_error, 1e-12)) if pixels else None


def format_regions(report: dict) -> str:
    """A readable table of `ReconstructionError.report()`'s regions."""
    lines = [f"{'region':<14} {'pixels':>7} {'PSNR':>8} {'error':>7}"]
    for region in report["by_edge_distance"]:
        db = "-" if region["psnr_db"] is None else f"{region['psnr_db']:.1f} dB"
        lines.append(f"{region['region']:<14} {100 * region['pixel_share']:6.1f}% {db:>8} "
                     f"{100 * region['error_share']:6.1f}%")
    first, later = report["first_frame_psnr_db"], report["later_frames_psnr_db"]
    lines.append(f"first frame {first:.1f} dB, later frames {later:.1f} dB")
    lines.append("clips from {:.1f} to {:.1f} dB".format(*report["clip_psnr_db_range"]))
    return "\n".join(lines)
