"""Clips of any dataset encoded once by a frozen autoencoder, so the teacher trains on latents.

The bank is a directory of safetensors shards written one at a time (a killed build resumes at
the first missing shard) and read one entry at a time, memory-mapped, so it may be far larger
than RAM. Each entry keeps its captions (a dataset may give several phrasings of one clip) and,
for datasets of objects on a flat background (the shapes world), its object mask on the latent
grid for an object-weighted loss.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from causvid.checkpoint import CheckpointError, atomic_save_tensors, atomic_write_json, read_json
from causvid.data.masks import latent_object_mask
from causvid.models.autoencoder import VideoAutoencoder

logger = logging.getLogger(__name__)

SHARD_SIZE = 256  # entries per shard: the resume granularity
OPEN_SHARDS = 8  # memory-mapped shard files kept open per process


def _shard(path: Path, index: int) -> Path:
    return path / f"shard-{index:05d}.safetensors"


def _as_list(items: list[dict]) -> list[dict]:
    return items


class LatentBank(torch.utils.data.Dataset):
    """Item i is entry i mod N: {"latents", "caption"} and, where the bank has masks, "object_mask".

    The caption is drawn from the entry's captions by (seed, i), so a clip with several phrasings
    is described in different words on different passes.
    """

    def __init__(self, path: str | Path, seed: int = 0):
        self.path = Path(path)
        manifest = read_json(self.path / "manifest.json")
        self.counts: list[int] = manifest["counts"]
        self.has_masks: bool = manifest["object_masks"]
        self.starts = np.cumsum([0, *self.counts])
        self.captions = [caption for i in range(len(self.counts)) for caption in read_json(_shard(self.path, i).with_suffix(".json"))["captions"]]
        self.seed = seed
        self._open: OrderedDict[int, object] = OrderedDict()

    @property
    def entries(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return 10**9

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # loader workers open their own files

    def _file(self, shard: int):
        if shard not in self._open:
            if len(self._open) == OPEN_SHARDS:
                self._open.popitem(last=False)
            self._open[shard] = safe_open(str(_shard(self.path, shard)), framework="pt")
        self._open.move_to_end(shard)
        return self._open[shard]

    def __getitem__(self, index: int) -> dict:
        entry = index % self.entries
        shard = int(np.searchsorted(self.starts, entry, side="right")) - 1
        row = entry - int(self.starts[shard])
        file = self._file(shard)
        captions = self.captions[entry]
        item = {
            "latents": file.get_slice("latents")[row : row + 1][0].float(),
            "caption": captions[int(np.random.default_rng([self.seed, index]).integers(len(captions)))],
        }
        if self.has_masks:
            item["object_mask"] = file.get_slice("object_masks")[row : row + 1][0]
        return item

    @classmethod
    @torch.no_grad()
    def build_or_load(cls, path: str | Path, autoencoder: VideoAutoencoder, dataset: torch.utils.data.Dataset,
                      size: int, seed: int = 0, workers: int = 0) -> "LatentBank":
        """The bank at `path`, encoding whatever shards of the first `size` dataset items it lacks.

        `workers` loader processes read and decode clips while the autoencoder encodes. An item a
        dataset could not read (it returns another `index`) is left out, so each clip is in once.
        """
        from tqdm import tqdm

        path = Path(path)
        size = min(size, len(dataset))
        shards = -(-size // SHARD_SIZE)
        settings = {"size": size, "shard_size": SHARD_SIZE, "object_masks": bool(getattr(dataset, "flat_background", False))}
        if (path / "manifest.json").exists():
            saved = read_json(path / "manifest.json")
            if {k: saved.get(k) for k in settings} != settings:
                raise CheckpointError(f"{path} holds a bank of other settings ({saved}); delete it or change out_dir")
            return cls(path, seed)
        path.mkdir(parents=True, exist_ok=True)
        device = next(autoencoder.parameters()).device
        todo = [s for s in range(shards) if not _shard(path, s).exists()]
        bar = tqdm(total=sum(min(size, (s + 1) * SHARD_SIZE) - s * SHARD_SIZE for s in todo), desc="latent bank", unit="clip")
        for shard in todo:
            wanted = range(shard * SHARD_SIZE, min(size, (shard + 1) * SHARD_SIZE))
            batches = [wanted[i : i + 32] for i in range(0, len(wanted), 32)]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_as_list)
            latents, masks, captions = [], [], []
            for requested, items in zip(batches, loader):
                kept = [item for index, item in zip(requested, items) if item.get("index", index) == index]
                bar.update(len(items))
                if not kept:
                    continue
                video = torch.stack([item["video"] for item in kept]).to(device)
                latents.append(autoencoder.encode(video).to("cpu", torch.bfloat16))
                if settings["object_masks"]:
                    masks.append(latent_object_mask(video, autoencoder.spatial_factor).cpu())
                captions += [item.get("captions") or [item["caption"]] for item in kept]
            tensors = {"latents": torch.cat(latents)} if latents else {}
            if masks:
                tensors["object_masks"] = torch.cat(masks)
            # The JSON first: a shard is complete once its tensors file exists.
            atomic_write_json(_shard(path, shard).with_suffix(".json"), {"captions": captions})
            atomic_save_tensors(_shard(path, shard), tensors)
        bar.close()
        counts = [len(read_json(_shard(path, s).with_suffix(".json"))["captions"]) for s in range(shards)]
        if sum(counts) == 0:
            raise CheckpointError(f"{path}: no clip of the dataset could be encoded")
        if sum(counts) < size:
            logger.warning("latent bank %s: %d of %d clips left out (unreadable)", path, size - sum(counts), size)
        atomic_write_json(path / "manifest.json", settings | {"counts": counts})
        return cls(path, seed)
