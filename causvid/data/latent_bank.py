"""Clips encoded once by a frozen autoencoder, so the teacher trains on latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from causvid.checkpoint import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from causvid.data import build_dataset
from causvid.data.masks import latent_object_mask
from causvid.data.shapes import random_caption, scene_from_json
from causvid.models.autoencoder import VideoAutoencoder


class LatentBank(torch.utils.data.Dataset):
    """Shapes-world clips encoded once by a frozen autoencoder, so the teacher trains on latents.

    Item i is bank entry i mod N with a caption drawn afresh from (seed, i): the same clip is
    described in different words on every pass. Each entry also keeps its object mask on the
    latent grid (`latent_object_mask`) for an object-weighted loss.
    """

    def __init__(self, latents: torch.Tensor, object_masks: torch.Tensor, scenes: list[str], seed: int):
        self.latents, self.object_masks, self.scenes, self.seed = latents, object_masks, scenes, seed

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        entry = index % len(self.latents)
        caption = random_caption(scene_from_json(self.scenes[entry]), np.random.default_rng([self.seed, index]))
        return {"latents": self.latents[entry].float(), "object_mask": self.object_masks[entry], "caption": caption}

    @classmethod
    @torch.no_grad()
    def build_or_load(cls, path: Path, autoencoder: VideoAutoencoder, data: dict, size: int, seed: int,
                      workers: int = 0) -> "LatentBank":
        """Load the bank at `path` (.safetensors + .json scenes) if present, else encode `size` clips.

        A bank saved before object masks existed gets them added: the world re-renders its
        clips exactly (item i is a pure function of the seed and i), so nothing is re-encoded.
        `workers` processes render the clips while the autoencoder encodes.
        """
        from tqdm import tqdm

        device = next(autoencoder.parameters()).device
        scenes_path = path.with_suffix(".json")
        saved = load_tensors(path) if path.exists() and scenes_path.exists() else {}
        if "object_masks" not in saved:
            encode = "latents" not in saved
            size = size if encode else len(saved["latents"])
            batches = [range(start, min(size, start + 32)) for start in range(0, size, 32)]
            loader = torch.utils.data.DataLoader(build_dataset(data), batch_sampler=batches, num_workers=workers)
            latents, masks, scenes = [], [], []
            for items in tqdm(loader, desc="building latent bank", unit="batch"):
                video = items["video"].to(device)
                masks.append(latent_object_mask(video, autoencoder.spatial_factor).cpu())
                if encode:
                    latents.append(autoencoder.encode(video).to("cpu", torch.bfloat16))
                    scenes.extend(items["scene"])
            if encode:
                saved["latents"] = torch.cat(latents)
                atomic_write_json(scenes_path, {"scenes": scenes})
            saved["object_masks"] = torch.cat(masks)
            atomic_save_tensors(path, saved)
        return cls(saved["latents"], saved["object_masks"], read_json(scenes_path)["scenes"], seed)
