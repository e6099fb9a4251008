"""Config files and recipes: the chain of runs that rebuilds a shipped artifact.

A config may start with `extends: OTHER.yaml` (a path relative to it): the other config's
values, with this file's on top (nested mappings merged key by key, everything else replaced).
A step of a recipe continued on fresh clips is then a few lines that say what changed.

A recipe is the config of its last step. A value that names a path inside another config's
`out_dir` (or, for ODE pairs, `out`), such as `runs/NAME/export`, makes that config a step to
finish first. `recipe_steps` orders them; `causvid recipe` runs them, each resumed where it
stopped, skips those already finished, and can save the last step's export as the artifact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from causvid.checkpoint import read_json
from causvid.errors import UserError

# The command that runs each kind of step (the `objective` key of its config).
COMMANDS = {
    "autoencoder": ["train", "autoencoder"],
    "teacher": ["train", "teacher"],
    "ode_pairs": ["distill", "ode-pairs"],
    "ode_init": ["distill", "ode-init"],
    "dmd": ["distill", "dmd"],
    "vin": ["train", "vin"],
}


def _merged(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping a YAML config describes, with its `extends` chain resolved."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config not found")
    if path.resolve() in _seen:
        raise UserError(f"{path}: `extends` loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config is a mapping of keys to values")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merged(load_config_file(path.parent / parent, (*_seen, path.resolve())), data)


def _output(config: dict) -> str | None:
    return config.get("out") if config.get("objective") == "ode_pairs" else config.get("out_dir")


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def recipe_steps(target: str | Path, configs_root: str | Path) -> list[Path]:
    """The configs to run, in order, to build `target`'s run: its inputs' runs first."""
    producers: dict[str, Path] = {}
    for path in sorted(Path(configs_root).rglob("*.yaml")):
        output = _output(load_config_file(path))
        if output is not None:
            producers.setdefault(output.rstrip("/"), path)
    order: list[Path] = []

    def visit(path: Path, chain: tuple[Path, ...]) -> None:
        if path in order:
            return
        if path in chain:
            raise UserError(f"{path}: the recipe depends on its own output")
        config = load_config_file(path)
        own = _output(config)
        for value in _strings({k: v for k, v in config.items() if k not in ("out_dir", "out")}):
            runs = [run for run in producers if value == run or value.startswith(run + "/")]
            if runs:
                visit(producers[max(runs, key=len)], (*chain, path))
            elif value.startswith("runs/") and value != own:
                raise UserError(f"{path} reads {value}, which no config under {configs_root} writes")
        order.append(path)

    visit(Path(target), ())
    return order


def step_command(path: Path, config: dict) -> list[str]:
    """The `causvid` arguments that run (or resume) one step."""
    kind = config.get("objective", "teacher")
    if kind not in COMMANDS:
        raise UserError(f"{path}: unknown objective {kind!r} (expected one of {', '.join(COMMANDS)})")
    return [*COMMANDS[kind], "--config", str(path), "--resume"]


def step_finished(config: dict) -> bool:
    """Whether a training step reached its max_steps (ODE pairs resume by shard, so they always run)."""
    from causvid.train import TrainConfig  # here: train.py reads its configs through this module

    latest = Path(config.get("out_dir", "")) / "latest.json"
    if config.get("objective") == "ode_pairs" or not latest.is_file():
        return False
    return read_json(latest)["step"] >= config.get("max_steps", TrainConfig.max_steps)


def run_recipe(target: Path, configs_root: Path, extra: list[str], dry_run: bool = False) -> None:
    """Run every unfinished step of `target`'s recipe as its own `causvid` process, in order."""
    steps = recipe_steps(target, configs_root)
    for number, path in enumerate(steps, 1):
        config = load_config_file(path)
        training = config.get("objective") != "ode_pairs"
        done = step_finished(config)
        command = [sys.executable, "-m", "causvid.cli", *step_command(path, config)]
        if not done and training:
            command += extra
        print(f"[{number}/{len(steps)}] {'finished: ' if done else ''}causvid {' '.join(command[3:])}", flush=True)
        if done or dry_run:
            continue
        if subprocess.run(command).returncode != 0:
            raise UserError(f"step {number} ({path}) failed; fix it and rerun the recipe to continue from there")
        if training and not step_finished(config):
            raise UserError(f"step {number} ({path}) stopped before max_steps; rerun the recipe to resume it")
