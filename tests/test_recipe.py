"""Configs and recipes: `extends`, every shipped config binding to its objective, and a recipe
that runs its steps in order, resumes, and skips what has finished."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from causvid.cli import main
from causvid.errors import UserError
from causvid.objectives import OBJECTIVES
from causvid.recipe import load_config_file, recipe_steps, step_command
from causvid.train import TrainConfig
from distill.dmd import DMDObjective
from distill.ode_init import OdeInitObjective
from distill.ode_pairs import OdePairsConfig

CONFIGS = Path(__file__).parent.parent / "configs"
ALL_OBJECTIVES = OBJECTIVES | {"ode_init": OdeInitObjective, "dmd": DMDObjective}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    _write(tmp_path / "base.yaml", {"max_steps": 10, "lr": {"a": 1.0, "b": 2.0}, "data": {"seed": 0, "num_frames": 9},
                                    "objective_args": {"context_frames": [0, 5]}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "lr": {"b": 3.0}, "data": {"seed": 1},
                                             "objective_args": {"context_frames": [0]}})
    assert load_config_file(child) == {"max_steps": 10, "lr": {"a": 1.0, "b": 3.0}, "data": {"seed": 1, "num_frames": 9},
                                       "objective_args": {"context_frames": [0]}}
    _write(tmp_path / "loop.yaml", {"extends": "loop.yaml"})
    with pytest.raises(UserError, match="loops back"):
        load_config_file(tmp_path / "loop.yaml")
    _write(tmp_path / "orphan.yaml", {"extends": "gone.yaml"})
    with pytest.raises(UserError, match="gone.yaml: config not found"):
        load_config_file(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_and_binds_its_objective(path):
    if load_config_file(path).get("objective") == "ode_pairs":
        OdePairsConfig.from_yaml(path)
        return
    config = TrainConfig.from_yaml(path)
    objective = ALL_OBJECTIVES[config.objective]
    inspect.signature(objective.__init__).bind(None, config, **config.objective_args)
    assert set(config.lr) <= {"autoencoder", "discriminator", "teacher", "student", "critic", "parallel"}


def test_the_shipped_recipes_chain_through_runs_only():
    for target, first, count in (("shapes/24_vin.yaml", "shapes/01_autoencoder.yaml", 24),
                                 ("shapes_vae_adversarial/04_decoder_adversarial.yaml", "shapes/01_autoencoder.yaml", 18)):
        steps = recipe_steps(CONFIGS / target, CONFIGS)
        assert len(steps) == count and steps[0] == CONFIGS / first and steps[-1] == CONFIGS / target
        for path in steps:
            assert "checkpoints/" not in yaml.safe_dump(load_config_file(path)), f"{path} reads a shipped checkpoint"
            assert step_command(path, load_config_file(path))[-3:] == ["--config", str(path), "--resume"]


TINY = {
    "objective": "autoencoder", "max_steps": 2, "batch_size": 1, "lr": {"autoencoder": 1e-4}, "warmup_steps": 1,
    "log_every": 1, "sample_every": 100, "checkpoint_every": 1,
    "data": {"type": "shapes", "num_frames": 5, "height": 32, "width": 32, "seed": 0},
    "objective_args": {"preset_name": "tiny", "stats_clips": 1, "context_frames": [0], "target_frames": 4},
}


def test_a_recipe_runs_its_steps_in_order_then_skips_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = tmp_path / "configs"
    configs.mkdir()
    _write(configs / "a.yaml", TINY | {"out_dir": "runs/a"})
    _write(configs / "b.yaml", {"extends": "a.yaml", "out_dir": "runs/b", "data": {"seed": 1},
                                "objective_args": {"init_from": "runs/a/export", "freeze_encoder": True}})
    assert main(["recipe", "configs/b.yaml", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split("--config ")[1].split()[0] for line in plan] == ["configs/a.yaml", "configs/b.yaml"]
    assert main(["recipe", "configs/b.yaml", "--threads", "1", "--to", "artifact", "--dtype", "fp32"]) == 0
    assert (tmp_path / "runs/b/export/config.json").is_file() and (tmp_path / "artifact/config.json").is_file()
    capsys.readouterr()
    assert main(["recipe", "configs/b.yaml", "--dry-run"]) == 0
    assert all(line.split("] ")[1].startswith("finished: ") for line in capsys.readouterr().out.splitlines())


def test_a_recipe_names_an_input_that_no_config_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    _write(tmp_path / "configs/b.yaml", TINY | {"out_dir": "runs/b", "objective_args": {"init_from": "runs/a/export"}})
    assert main(["recipe", "configs/b.yaml", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "causvid recipe: error: configs/b.yaml reads runs/a/export, which no config under configs writes")
