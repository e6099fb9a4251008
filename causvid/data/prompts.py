"""Training prompts for students that start from noise (ODE pairs, self-forcing DMD).

Prompt `i` of a source is a pure function of (seed, i): a caption, the caption a prompt switch
would go to, and, for the shapes world, the scene (JSON) that image-to-video rollouts render.
Two sources: the shapes world's own scenes, or a caption file (a folder dataset's
captions.jsonl or .csv, or plain text with one prompt per line).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from causvid.data.shapes import (
    SWITCH_ATTRIBUTES,
    random_caption,
    sample_scene,
    scene_to_json,
    switched_scene,
)
from causvid.errors import UserError


def shapes_prompt(seed: int, index: int) -> dict:
    """Prompt `index` of the shapes world: a fresh scene described in random words, and a caption
    of the same scene with one attribute changed, for prompt switches."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    caption = random_caption(scene, rng)
    rng = np.random.default_rng([seed, index, 1])
    switched = switched_scene(scene, str(rng.choice(SWITCH_ATTRIBUTES)), rng)
    return {"caption": caption, "scene": scene_to_json(scene), "switch_caption": random_caption(switched, rng)}


def read_prompt_file(path: str | Path) -> list[str]:
    """The captions of a .jsonl ("caption" or "prompt" field), .csv (a "caption" or "prompt"
    column) or .txt file (one per line); blank ones are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    text = path.read_text()
    if path.suffix == ".txt":
        prompts = text.splitlines()
    elif path.suffix == ".jsonl":
        prompts = []
        for line, row in enumerate(text.splitlines(), 1):
            if row.strip():
                try:
                    record = json.loads(row)
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{line}: not valid JSON ({error.msg})") from None
                prompts.append(_field(record, path, line))
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        prompts = [_field(row, path, line) for line, row in enumerate(rows, 2)]
    else:
        raise UserError(f"{path}: a prompt file ends in .txt, .jsonl or .csv")
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def _field(record: object, path: Path, line: int) -> str:
    for key in ("caption", "prompt"):
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return record[key]
    raise UserError(f"{path}:{line}: expected a 'caption' or 'prompt' field, got {record!r}")


class TrainingPrompts(torch.utils.data.Dataset):
    """Prompt `i`: {"caption", "switch_caption"} and, from the shapes world, "scene".

    With a prompt file, prompt `i` is a caption drawn from it and its switch another one.
    """

    def __init__(self, seed: int = 0, file: str | Path | None = None):
        self.seed = seed
        self.captions = read_prompt_file(file) if file is not None else None

    @property
    def has_scenes(self) -> bool:
        return self.captions is None

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> dict:
        if self.captions is None:
            return shapes_prompt(self.seed, index)
        rng = np.random.default_rng([self.seed, index])
        count = len(self.captions)
        first = int(rng.integers(count))
        second = (first + 1 + int(rng.integers(count - 1))) % count if count > 1 else first
        return {"caption": self.captions[first], "switch_caption": self.captions[second]}
