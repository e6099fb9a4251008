"""Configs printed in the docs are valid: every key is one the loop and the objective take."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml

from causvid.train import TrainConfig
from distill.dmd import DMDObjective

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_1_3b_distillation_config_in_the_docs_is_valid(tmp_path):
    text = (DOCS / "real_models.md").read_text()
    section = text[text.index("## Distilling at 1.3B scale"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "dmd.yaml"
    path.write_text(block)
    config = TrainConfig.from_yaml(path)  # unknown keys are refused
    assert config.fsdp and config.gradient_checkpointing and config.mixed_precision == "bf16"
    assert config.batch_size * config.grad_accumulation * 8 == 64
    accepted = set(inspect.signature(DMDObjective.__init__).parameters) - {"self", "config"}
    assert set(config.objective_args) <= accepted
    assert yaml.safe_load(block)["objective"] == "dmd"
