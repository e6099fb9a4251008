"""Videos between their two forms: uint8 frames [T, H, W, 3] (files, the wire, the shapes world)
and model tensors [3, T, H, W] in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def clip_to_tensor(clip: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    # In numpy: torch's thread pool makes these small element-wise ops slow on a busy CPU.
    video = np.ascontiguousarray(clip.transpose(3, 0, 1, 2), dtype=np.float32)
    video /= 127.5
    video -= 1.0
    return torch.from_numpy(video)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B=1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3]."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()
