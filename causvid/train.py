"""The training loop, shared by every objective (autoencoder, teacher, ODE init, DMD).

Read top to bottom: config -> setup -> init or resume -> loop (lr, losses, step, EMA, log,
sample, checkpoint) -> export. An `Objective` says what is trained and how the losses are
computed; this file owns everything else. It runs as one CPU process, or under
`accelerate launch` on many devices: data-parallel, or with `fsdp` the trained models sharded
across the processes (causvid/sharding.py).

Exact resume needs no saved RNG: every random draw of step s comes from an RNG seeded
with (seed, rank, s), and the data of step s are the dataset items at fixed indices.
Checkpoints are written to a temporary directory and renamed into place, then `latest.json`
is replaced atomically, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import copy
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
from causvid.sharding import (
    full_model_state,
    full_optimizer_state,
    full_tensors,
    grad_norm,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
    shard_like,
    shard_model,
)

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
    fsdp: bool = False  # shard the trained models' weights, gradients and optimiser state across processes
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

    def full_shadow(self) -> dict[str, torch.Tensor]:
        """The average as full tensors (collective when the model is sharded)."""
        return full_tensors(self.shadow)


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def _optimizer_state(prefix: str, tensors: dict, groups: list) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            # Parameters are numbered, or named (sharded runs), with dots; state keys have none.
            index, key = name[len(prefix) + 1 :].rsplit(".", 1)
            state.setdefault(int(index) if index.isdigit() else index, {})[key] = value
    return {"state": state, "param_groups": groups}


def _optimizer_keyed(state: dict, module: torch.nn.Module, by_name: bool) -> dict:
    """An optimiser state keyed by parameter name (as sharded runs save and load it) or by
    number (as torch's optimisers do), whichever way it was saved: runs resume across the two.
    The loop's optimisers hold one group, the trainable parameters in the module's order."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    numbers = {n: i for i, n in enumerate(names)}

    def key(k: int | str) -> int | str:
        if by_name:
            return names[k] if isinstance(k, int) else k
        return numbers[k] if isinstance(k, str) else k

    return {"state": {key(k): v for k, v in state["state"].items()},
            "param_groups": [{**group, "params": [key(k) for k in group["params"]]} for group in state["param_groups"]]}


def save_checkpoint(out_dir: Path, step: int, modules, optimizers, emas, keep: int, world_size: int = 1,
                    write: bool = True) -> Path:
    """Write checkpoint-{step}/ atomically and point latest.json at it.

    Sharded models are gathered into full tensors first, so every process calls this and only
    the one with `write` writes.
    """
    final = out_dir / f"checkpoint-{step:07d}"
    tmp = out_dir / f".checkpoint-{step:07d}.tmp"
    files: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, Any] = {"step": step, "world_size": world_size, "param_groups": {}, "ema_updates": {}}
    for name, module in modules.items():
        if is_sharded(module):
            files[name] = full_model_state(module)
            optimizer = full_optimizer_state(module, optimizers[name])  # empty but on process 0
            files[f"{name}_optimizer"] = {f"opt.{param}.{key}": torch.as_tensor(value)
                                          for param, values in optimizer.get("state", {}).items()
                                          for key, value in values.items()}
            meta["param_groups"][name] = optimizer.get("param_groups")
        else:
            files[name] = module.state_dict()
            files[f"{name}_optimizer"], meta["param_groups"][name] = _optimizer_tensors("opt", optimizers[name])
    for name, ema in emas.items():
        files[f"{name}_ema"] = ema.full_shadow()
        meta["ema_updates"][name] = ema.updates
    if not write:
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file, tensors in files.items():
        atomic_save_tensors(tmp / f"{file}.safetensors", tensors)
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
        optimizer = _optimizer_state("opt", load_tensors(path / f"{name}_optimizer.safetensors"), meta["param_groups"][name])
        sharded = is_sharded(module)
        optimizer = _optimizer_keyed(optimizer, module, by_name=sharded)
        try:
            if sharded:
                load_full_model_state(module, load_tensors(path / f"{name}.safetensors"))
            else:
                module.load_state_dict(load_tensors(path / f"{name}.safetensors"))
        except RuntimeError as error:
            raise CheckpointError(f"{path / (name + '.safetensors')}: does not match the model ({str(error).splitlines()[0]})") from None
        if sharded:
            load_full_optimizer_state(module, optimizers[name], optimizer)
        else:
            optimizers[name].load_state_dict(optimizer)
    for name, ema in emas.items():
        shadow = load_tensors(path / f"{name}_ema.safetensors")
        ema.shadow = shard_like(shadow, modules[name])
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
    sharded = config.fsdp and accelerator.num_processes > 1
    # Exports and samples need whole models: the main process keeps a plain copy to fill.
    plain = {}
    if sharded:
        if accelerator.is_main_process:
            plain = {name: copy.deepcopy(modules[name]).cpu() for name in objective.averaged()}
        for module in modules.values():
            shard_model(module, config.mixed_precision)
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
        averaged = _ema_copies(modules, emas, plain, accelerator.is_main_process)
        if accelerator.is_main_process:
            objective.export(averaged, out_dir / "export")
        return start
    # Sharded models reduce their own gradients: accelerate would wrap them in DDP.
    wrapped = {name: module if sharded else accelerator.prepare(module) for name, module in modules.items()}
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
                logs.update({k: float(v) for k, v in extra.items()})  # tensors or numbers
        for name in losses:
            logs[f"grad_norm_{name}"] = grad_norm(accelerator.clip_grad_norm_(wrapped[name].parameters(), config.grad_clip))
            optimizers[name].step()
            if name in emas:
                emas[name].update(modules[name])
        recent.update(logs)  # an optimiser that steps every k-th iteration still shows in the log
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in recent.items() if k.startswith("loss")})

        # 5. Log, sample, checkpoint: the main process writes; sharded models are gathered by all.
        out_of_time = config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes
        last = step == config.max_steps or out_of_time or stop["signal"]
        checkpoint_due = step % config.checkpoint_every == 0 or last
        if accelerator.num_processes > 1 and checkpoint_due and not sharded:
            check_ranks_agree(accelerator, modules)
        main = accelerator.is_main_process
        if main and (step % config.log_every == 0 or last):
            log.append({"step": step, "seconds_per_step": time.monotonic() - tick, **recent})
        if step % config.sample_every == 0:
            averaged = _ema_copies(modules, emas, plain, main)
            if main and (metrics := objective.sample(averaged, out_dir / "samples", step)):
                log.append({"step": step, **metrics})
        if checkpoint_due:
            save_checkpoint(out_dir, step, modules, optimizers, emas, config.keep_checkpoints, accelerator.num_processes,
                            write=main)
            averaged = _ema_copies(modules, emas, plain, main)
            if main:
                objective.export(averaged, out_dir / "export")
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


def _ema_copies(modules: dict[str, torch.nn.Module], emas: dict[str, EMA], plain: dict[str, torch.nn.Module],
                main: bool) -> dict[str, torch.nn.Module]:
    """The averaged models as plain modules, on the main process. Every process calls this:
    sharded averages are gathered, into the main process's `plain` copies."""
    copies = {}
    for name, ema in emas.items():
        if is_sharded(modules[name]):
            shadow = ema.full_shadow()
            if main:
                plain[name].load_state_dict({**plain[name].state_dict(), **shadow})
                copies[name] = plain[name].eval()
        elif main:
            copies[name] = ema.copy_to(copy.deepcopy(modules[name])).eval()
    return copies
