"""The training loop, shared by every objective (autoencoder, teacher, ODE init, DMD).

Read top to bottom: config -> setup -> init or resume -> loop (lr, losses, step, EMA, log,
sample, checkpoint) -> export. An `Objective` says what is trained and how the losses are
computed; this file owns everything else. It runs as one CPU process, or under
`accelerate launch` on many devices.

Exact resume needs no saved RNG: every random draw of step s comes from an RNG seeded
with (seed, rank, s), and the data of step s are the dataset items at fixed indices.
Checkpoints are written to a temporary directory and renamed into place, then `latest.json`
is replaced atomically, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from causvid.checkpoint import CheckpointError, atomic_save_tensors, atomic_write_json, load_tensors, read_json
from causvid.errors import UserError
from causvid.models.denoiser import WanDenoiser
from causvid.recipe import load_config_file

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class TrainConfig:
    """One training run. Loaded from YAML (configs/*.yaml); every field has a working default."""

    objective: str = "teacher"
    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 8  # per process and micro-batch
    grad_accumulation: int = 1  # micro-batches per optimiser step: a step sees batch_size x this per process
    lr: dict[str, float] = field(default_factory=lambda: {"model": 1e-4})  # per optimiser
    warmup_steps: int = 50
    decay_steps: int = 0  # linear decay over the last decay_steps steps (warmup-stable-decay); 0: none
    final_lr_fraction: float = 0.1  # the lr at max_steps, as a fraction of the peak, when decaying
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # "bf16" where the model tolerates it (not the autoencoder); see training_precision
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_minutes: float | None = None  # checkpoint and stop cleanly before a session ends
    threads: int | None = None  # torch CPU threads (None: torch's default)
    num_workers: int = 0  # data loader processes (video decoding, captions) beside the training one
    compile: bool = False  # torch.compile the trained modules (the first steps pay for the compile)
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward: memory for ~1/3 more compute
    data: dict[str, Any] = field(default_factory=dict)
    objective_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        data = load_config_file(path)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"{path}: unknown config keys {sorted(unknown)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


class Objective:
    """What a training run optimises. Subclasses fill these in; the loop does the rest."""

    def trainable(self) -> dict[str, torch.nn.Module]:
        """Optimiser name -> module. Each gets its own AdamW and learning rate."""
        raise NotImplementedError

    def averaged(self) -> set[str]:
        """The trainable modules that keep an EMA: those `sample` and `export` read (default: all).

        A module that only serves training (a discriminator, a critic) needs none.
        """
        return set(self.trainable())

    def place(self, device: torch.device) -> None:
        """Move the frozen models the objective uses to `device`, where the loop put the trainable ones."""

    def dataset(self) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def losses(
        self, models: dict[str, torch.nn.Module], batch: Any, step: int, rng: torch.Generator
    ) -> dict[str, tuple[torch.Tensor, dict]]:
        """Losses to step this iteration: optimiser name -> (loss, logs). May omit optimisers.

        `models` are the trainable modules as the accelerator wrapped them (use these for
        forward passes, so gradients are synchronised across processes).
        """
        raise NotImplementedError

    def sample(self, ema: dict[str, torch.nn.Module], out_dir: Path, step: int) -> dict[str, float]:
        """Write sample videos (and optionally return metrics to log). `ema` holds the averaged modules."""
        return {}

    def export(self, ema: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """Write the trained models in their loadable (diffusers) format."""
        raise NotImplementedError


def build_objective(config: TrainConfig, objectives: dict[str, type[Objective]]) -> Objective:
    """The objective a config names, built with its `objective_args`."""
    if config.objective not in objectives:
        raise UserError(f"unknown objective {config.objective!r} (expected one of {', '.join(objectives)})")
    try:
        return objectives[config.objective](config, **config.objective_args)
    except TypeError as error:
        raise UserError(f"bad objective_args for {config.objective}: {error}") from None


# -- data ----------------------------------------------------------------------------------


class StepBatches(torch.utils.data.Sampler):
    """Batch indices for steps start..end: step s, rank r reads items (s*world + r)*B + [0, B)."""

    def __init__(self, start: int, end: int, batch: int, world: int, rank: int, length: int):
        self.start, self.end, self.batch, self.world, self.rank, self.length = start, end, batch, world, rank, length

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        for step in range(self.start, self.end):
            first = (step * self.world + self.rank) * self.batch
            yield [(first + i) % self.length for i in range(self.batch)]


def _micro_batch(batch: dict, index: int, parts: int) -> dict:
    """Micro-batch `index` of `parts`: an equal slice of every tensor and list in the batch."""
    if parts == 1:
        return batch
    size = len(next(iter(batch.values()))) // parts
    return {key: value[index * size : (index + 1) * size] for key, value in batch.items()}


def step_rng(seed: int, rank: int, step: int) -> torch.Generator:
    # A fixed mix of (seed, rank, step): a different, reproducible stream for every step.
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_033 + step)


# -- EMA, checkpoints ----------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's floating-point parameters.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run's
    average is not dominated by the random initialisation.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for name, value in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.float(), 1 - decay)

    def copy_to(self, module: torch.nn.Module) -> torch.nn.Module:
        module.load_state_dict({**module.state_dict(), **self.shadow})
        return module


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out_dir: Path, step: int, modules, optimizers, emas, keep: int, world_size: int = 1) -> Path:
    """Write checkpoint-{step}/ atomically and point latest.json at it."""
    final = out_dir / f"checkpoint-{step:07d}"
    tmp = out_dir / f".checkpoint-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"step": step, "world_size": world_size, "param_groups": {}, "ema_updates": {}}
    for name, module in modules.items():
        atomic_save_tensors(tmp / f"{name}.safetensors", module.state_dict())
        tensors, groups = _optimizer_tensors("opt", optimizers[name])
        atomic_save_tensors(tmp / f"{name}_optimizer.safetensors", tensors)
        meta["param_groups"][name] = groups
    for name, ema in emas.items():
        atomic_save_tensors(tmp / f"{name}_ema.safetensors", ema.shadow)
        meta["ema_updates"][name] = ema.updates
    atomic_write_json(tmp / "state.json", meta)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_json(out_dir / "latest.json", {"checkpoint": final.name, "step": step})
    for old in sorted(out_dir.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path, modules, optimizers, emas) -> int:
    """Restore the latest checkpoint into the given objects; returns its step (0 if none)."""
    pointer = out_dir / "latest.json"
    if not pointer.exists():
        return 0
    path = out_dir / read_json(pointer)["checkpoint"]
    meta = read_json(path / "state.json")
    step = int(meta["step"])
    for name, module in modules.items():
        try:
            module.load_state_dict(load_tensors(path / f"{name}.safetensors"))
        except RuntimeError as error:
            raise CheckpointError(f"{path / (name + '.safetensors')}: does not match the model ({str(error).splitlines()[0]})") from None
        _load_optimizer(optimizers[name], "opt", load_tensors(path / f"{name}_optimizer.safetensors"), meta["param_groups"][name])
    for name, ema in emas.items():
        device = next(modules[name].parameters()).device
        ema.shadow = {k: v.to(device) for k, v in load_tensors(path / f"{name}_ema.safetensors").items()}
        # Checkpoints from before the EMA warm-up existed: one update per step.
        ema.updates = int(meta.get("ema_updates", {}).get(name, step))
    return step


class MetricsLog:
    """metrics.csv, one row per logged step; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        self.rows = rows
        self._write_all()

    def _write_all(self) -> None:
        keys = list(dict.fromkeys(k for row in self.rows for k in row)) or ["step"]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write_all()


def lr_factor(config: TrainConfig, step: int) -> float:
    """The lr multiplier at `step`: warm-up, stable, decay (WSD, Hu et al. 2024, MiniCPM).

    The decay is a function of the step alone, so a resumed run (even one whose config gained a
    decay or a longer max_steps) continues on the same curve.
    """
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    decay_start = config.max_steps - config.decay_steps
    if config.decay_steps <= 0 or step < decay_start:
        return warmup
    progress = (step - decay_start) / config.decay_steps
    return warmup * (1.0 - (1.0 - config.final_lr_fraction) * progress)


def training_precision(requested: str, device: torch.device) -> str:
    """The config's mixed precision, except bf16 on a CPU that only emulates it.

    Without avx512_bf16 or AMX, bf16 matmuls are emulated and run slower than fp32, so such a CPU
    trains in fp32, the more precise of the two.
    """
    from causvid.pipeline import default_dtype

    if requested == "bf16" and device.type == "cpu" and default_dtype(device) != torch.bfloat16:
        return "no"
    return requested


# -- the loop --------------------------------------------------------------------------------


def train(config: TrainConfig, objective: Objective) -> int:
    """Run (or resume) training until max_steps or max_minutes. Returns the last step."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env
    from tqdm import tqdm

    # 1. Setup.
    if config.threads:
        torch.set_num_threads(config.threads)
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    precision = training_precision(config.mixed_precision, torch.device("cpu" if on_cpu else "cuda"))
    if precision != config.mixed_precision:
        print(f"mixed_precision {config.mixed_precision} -> fp32: this CPU has no native bf16 (avx512_bf16 or AMX)", file=sys.stderr)
        config = replace(config, mixed_precision=precision)  # config.json records what ran
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    out_dir = Path(config.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", asdict(config))
    # On the accelerator's device before the optimisers and EMAs are built, so their state lives there too.
    modules = {name: module.to(accelerator.device) for name, module in objective.trainable().items()}
    if config.gradient_checkpointing:
        for module in modules.values():
            for denoiser in (m for m in module.modules() if isinstance(m, WanDenoiser)):
                denoiser.enable_gradient_checkpointing()
    if missing := sorted(set(modules) - set(config.lr)):
        raise UserError(f"config lr has no entry for {missing}; this objective trains {sorted(modules)}")
    objective.place(accelerator.device)
    optimizers = {
        name: torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=config.lr[name], betas=config.betas, weight_decay=config.weight_decay,
        )
        for name, module in modules.items()
    }
    emas = {name: EMA(modules[name], config.ema_decay) for name in objective.averaged()}

    # 2. Init or resume: model, optimiser and EMA state; the step fixes data and RNG.
    start = load_checkpoint(out_dir, modules, optimizers, emas)
    if start >= config.max_steps:
        if accelerator.is_main_process:
            objective.export(_ema_copies(modules, emas), out_dir / "export")
        return start
    wrapped = {name: accelerator.prepare(module) for name, module in modules.items()}
    if config.compile:
        wrapped = {name: torch.compile(module) for name, module in wrapped.items()}
    optimizers = {name: accelerator.prepare(opt) for name, opt in optimizers.items()}
    dataset = objective.dataset()
    batches = StepBatches(start, config.max_steps, config.batch_size * config.grad_accumulation,
                          accelerator.num_processes, accelerator.process_index, len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers)
    log = MetricsLog(out_dir / "metrics.csv", start) if accelerator.is_main_process else None

    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    began = time.monotonic()
    step = start
    recent: dict[str, float] = {}
    bar = tqdm(total=config.max_steps, initial=start, disable=not accelerator.is_main_process, unit="step")
    for batch in loader:
        # 3. Learning rate: linear warm-up, constant, then an optional linear decay.
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = config.lr[name] * lr_factor(config, step)

        # 4. Losses and updates. The objective decides which optimisers step this iteration. With
        # gradient accumulation the step's batch is split into micro-batches whose gradients add up.
        tick = time.monotonic()
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logs: dict[str, float] = {}  # this step's; `recent` keeps each optimiser's last, for the log
        parts = config.grad_accumulation
        for micro in range(parts):
            rng = step_rng(config.seed, accelerator.process_index, step * parts + micro)
            with accelerator.autocast():
                losses = objective.losses(wrapped, _micro_batch(batch, micro, parts), step, rng)
            for name, (loss, extra) in losses.items():
                if micro == 0:
                    optimizers[name].zero_grad(set_to_none=True)
                accelerator.backward(loss / parts)
                logs[f"loss_{name}"] = logs.get(f"loss_{name}", 0.0) + loss.item() / parts
                logs.update(extra)
        for name in losses:
            logs[f"grad_norm_{name}"] = float(accelerator.clip_grad_norm_(wrapped[name].parameters(), config.grad_clip))
            optimizers[name].step()
            if name in emas:
                emas[name].update(modules[name])
        recent.update(logs)  # an optimiser that steps every k-th iteration still shows in the log
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in recent.items() if k.startswith("loss")})

        # 5. Log, sample, checkpoint (main process only; all ranks hold the same weights).
        out_of_time = config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes
        last = step == config.max_steps or out_of_time or stop["signal"]
        checkpoint_due = step % config.checkpoint_every == 0 or last
        if accelerator.num_processes > 1 and checkpoint_due:
            check_ranks_agree(accelerator, modules)
        if accelerator.is_main_process:
            if step % config.log_every == 0 or last:
                log.append({"step": step, "seconds_per_step": time.monotonic() - tick, **recent})
            if step % config.sample_every == 0:
                metrics = objective.sample(_ema_copies(modules, emas), out_dir / "samples", step)
                if metrics:
                    log.append({"step": step, **metrics})
            if checkpoint_due:
                save_checkpoint(out_dir, step, modules, optimizers, emas, config.keep_checkpoints, accelerator.num_processes)
                objective.export(_ema_copies(modules, emas), out_dir / "export")
        accelerator.wait_for_everyone()
        if last:
            break
    bar.close()
    return step


def check_ranks_agree(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Raise unless every process holds the same weights, as the checkpoint (rank 0's) assumes.

    DDP keeps replicas identical only for gradients that its all-reduce saw; a module trained
    outside it drifts apart silently. A float64 sum and sum of squares per module are compared.
    """
    fingerprint = torch.stack([
        torch.stack([sum(p.detach().double().sum() for p in module.parameters()),
                     sum(p.detach().double().square().sum() for p in module.parameters())])
        for module in modules.values()
    ]).to(accelerator.device)
    ranks = accelerator.gather(fingerprint[None])
    differing = [name for i, name in enumerate(modules) if not (ranks[:, i] == ranks[0, i]).all()]
    if differing:
        raise RuntimeError(f"processes hold different weights for {differing}: their gradients were not all-reduced")


def _ema_copies(modules: dict[str, torch.nn.Module], emas: dict[str, EMA]) -> dict[str, torch.nn.Module]:
    import copy

    return {name: ema.copy_to(copy.deepcopy(modules[name])).eval() for name, ema in emas.items()}
