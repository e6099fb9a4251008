"""Stage 1 of CausVid (arXiv 2412.07772, sec. 3.3): ODE trajectories of the teacher.

The bidirectional teacher's deterministic sampler (Euler on the probability-flow ODE, with
classifier-free guidance) runs from noise on training prompts (`causvid.data.prompts`: the
shapes world's scenes, or a prompt file). Of each trajectory we keep the latents at the
student's noise levels and the endpoint (sigma = 0): the student is later regressed from the
former onto the latter (`distill.ode_init`).

On disk, `out/` holds `manifest.json` (settings, noise levels, shape) and shards
`shard-00000.safetensors` (tensor "trajectory" [n, S+1, C, F, H, W], bf16) with
`shard-00000.json` (indices, prompts, and scenes where the prompts have them). Item i is a pure
function of (seed, i), so shards can be written in any order, by any process, and skipped when
already complete.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from causvid.checkpoint import atomic_save_tensors, atomic_write_json, read_json
from causvid.data.prompts import TrainingPrompts
from causvid.errors import UserError
from causvid.models.autoencoder import num_latent_frames
from causvid.pipeline import CausVidPipeline
from causvid.recipe import load_config_file
from causvid.samplers import VelocityFn, guided_velocity, sample_euler
from causvid.schedule import teacher_sigmas


MANIFEST = "manifest.json"


@dataclass
class OdePairsConfig:
    """One trajectory-generation run. `None` fields take the teacher pipeline's value."""

    objective: str = "ode_pairs"  # names the step, as a training config's objective does
    teacher: str | None = None  # pipeline directory holding teacher/ (or transformer/)
    out: str | None = None
    num: int = 2048  # trajectories
    batch: int = 16  # trajectories per teacher forward (x2 with CFG)
    shard_size: int = 256
    num_frames: int = 21  # pixel frames, 1 + 4k: the teacher's training clip length
    steps: int | None = None  # Euler steps (pipeline teacher_steps, 50)
    guidance_scale: float | None = None  # CFG scale (pipeline guidance_scale)
    seed: int = 0
    prompts: str | None = None  # a prompt file (.txt, .jsonl, .csv); None: shapes-world scenes
    height: int | None = None  # frame size (default: the teacher pipeline's)
    width: int | None = None

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides) -> "OdePairsConfig":
        data = {} if path is None else load_config_file(path)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{path}: unknown config keys {sorted(unknown)}")
        if data.get("objective", "ode_pairs") != "ode_pairs":
            raise UserError(f"{path} is a {data['objective']!r} config, not 'ode_pairs'")
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        if config.teacher is None or config.out is None:
            raise UserError("ode-pairs needs a teacher and an output directory (--teacher, --out or the config)")
        if config.num < 1 or config.batch < 1 or config.shard_size < 1:
            raise UserError(f"num, batch and shard_size must be >= 1, got {config.num}, {config.batch}, {config.shard_size}")
        return config


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of trajectory `index`, independent of batching and process count."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def ode_grid(steps: int, shift: float, keep: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The Euler grid (teacher_sigmas) with the levels in `keep` inserted, and their positions.

    Inserting the student's levels makes the stored latents exact points of the trajectory
    instead of the nearest grid point, at the cost of at most len(keep) extra Euler steps
    (none when the levels are already on the grid, e.g. [1, .75, .5, .25] with shift 1 and a
    multiple of 4 steps; two with 50 steps, which miss .75 and .25).
    """
    grid = teacher_sigmas(steps, shift).double()
    merged = torch.cat([grid, keep.double()]).unique(sorted=True).flip(0)
    # Levels within float32 rounding of each other are one level.
    merged = merged[torch.cat([torch.tensor([True]), merged[:-1] - merged[1:] > 1e-6])]
    positions = [int((merged - level).abs().argmin()) for level in keep.double()]
    return merged.float(), positions


@torch.no_grad()
def teacher_trajectory(velocity_fn: VelocityFn, noise: torch.Tensor, grid: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Euler-integrate from `noise` along `grid`; the latents at `positions` stacked as [B, len, ...]."""
    states = {0: noise}

    def keep(i: int, x: torch.Tensor) -> None:
        if i + 1 in positions:  # the callback sees x after step i, at grid[i + 1]
            states[i + 1] = x

    sample_euler(velocity_fn, noise, grid, callback=keep)
    return torch.stack([states[p] for p in positions], dim=1)


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.safetensors"


def shard_indices(config: OdePairsConfig, shard: int) -> list[int]:
    return list(range(shard * config.shard_size, min(config.num, (shard + 1) * config.shard_size)))


def _manifest(config: OdePairsConfig, pipe: CausVidPipeline, latent_shape, grid, levels) -> dict:
    return {
        **{k: v for k, v in asdict(config).items() if k not in ("objective", "out", "batch")},
        "steps": len(grid) - 1,
        "guidance_scale": config.guidance_scale if config.guidance_scale is not None else pipe.config.guidance_scale,
        "negative_prompt": pipe.config.negative_prompt,
        "latent_shape": list(latent_shape),
        "sigmas": [float(s) for s in levels],  # the stored levels: the student's, then 0
        "grid": [float(s) for s in grid],
    }


def generate_ode_pairs(config: OdePairsConfig, pipe: CausVidPipeline, resume: bool = False) -> list[int]:
    """Write this process's shards (i, i+P, ...) under `config.out`. Returns the shards written."""
    from accelerate import PartialState
    from tqdm import tqdm

    if pipe.teacher is None:
        raise UserError(f"{config.teacher}: the pipeline has no teacher/ to sample")
    state = PartialState()
    out = Path(config.out)
    channels, height, width = pipe.latent_shape
    latent_shape = (channels, num_latent_frames(config.num_frames), height, width)
    levels = torch.cat([pipe.student_sigmas(), torch.zeros(1)])
    grid, positions = ode_grid(config.steps or pipe.config.teacher_steps, pipe.config.shift, levels)
    manifest = _manifest(config, pipe, latent_shape, grid, levels)

    # Every process checks before any writes (so all fail alike), then the main one writes.
    if (out / MANIFEST).exists():
        if not resume:
            raise UserError(f"{out} already holds ODE pairs: pass --resume to complete them, or choose --out")
        existing = read_json(out / MANIFEST)
        changed = sorted(k for k in manifest if k != "teacher" and existing.get(k) != manifest[k])
        if changed:
            raise UserError(f"{out}: existing pairs were made with different settings ({', '.join(changed)})")
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_json(out / MANIFEST, manifest)
    state.wait_for_everyone()

    guidance = manifest["guidance_scale"]
    source = TrainingPrompts(config.seed, config.prompts)
    null_text = pipe.encode_prompt(pipe.config.negative_prompt)
    num_shards = math.ceil(config.num / config.shard_size)
    mine = range(state.process_index, num_shards, state.num_processes)
    todo = [s for s in mine if not shard_path(out, s).exists()]
    written = []
    total = sum(len(shard_indices(config, s)) for s in todo)
    bar = tqdm(total=total, desc=f"ODE pairs (rank {state.process_index})", unit="traj")
    for shard in todo:
        indices = shard_indices(config, shard)
        prompts, scenes, trajectories = [], [], []
        for start in range(0, len(indices), config.batch):
            chunk = indices[start : start + config.batch]
            drawn = [source[i] for i in chunk]
            text = pipe.text_encoder.encode([item["caption"] for item in drawn]).to(pipe.device)
            noise = torch.stack([pair_noise(config.seed, i, latent_shape) for i in chunk]).to(pipe.device)
            velocity = guided_velocity(pipe.teacher, text, null_text.expand(len(chunk), -1, -1), guidance)
            trajectories.append(teacher_trajectory(velocity, noise, grid.to(pipe.device), positions).to(torch.bfloat16))
            prompts += [item["caption"] for item in drawn]
            scenes += [item.get("scene") for item in drawn]
            bar.update(len(chunk))
        # The JSON first: a shard counts as complete once its tensors file exists.
        atomic_write_json(shard_path(out, shard).with_suffix(".json"), {"indices": indices, "prompts": prompts, "scenes": scenes})
        atomic_save_tensors(shard_path(out, shard), {"trajectory": torch.cat(trajectories)})
        written.append(shard)
    bar.close()
    state.wait_for_everyone()
    return written


class OdePairs(torch.utils.data.Dataset):
    """The trajectories under a directory written by `generate_ode_pairs`, read lazily per item.

    Items: {"trajectory": float32 [S+1, C, F, H, W], "caption": str}. `sigmas` are the stored
    levels (the student's, then 0).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_json(self.root / MANIFEST)
        self.sigmas = torch.tensor(self.manifest["sigmas"])
        self.shards = sorted(self.root.glob("shard-*.safetensors"))
        if not self.shards:
            raise UserError(f"{self.root}: no complete ODE-pair shards (run `causvid distill ode-pairs` first)")
        self.rows: list[tuple[int, int]] = []
        self.prompts: list[str] = []
        for number, path in enumerate(self.shards):
            prompts = read_json(path.with_suffix(".json"))["prompts"]
            self.rows += [(number, row) for row in range(len(prompts))]
            self.prompts += prompts
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        shard, row = self.rows[index]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.shards[shard]), framework="pt")
        trajectory = self._open[shard].get_slice("trajectory")[row : row + 1][0]
        return {"trajectory": trajectory.float(), "caption": self.prompts[index]}
