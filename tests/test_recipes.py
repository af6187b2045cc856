"""Every recipe is a valid config: known keys, valid values (flags may still override them)."""

from pathlib import Path

import pytest

from prlhf.cli import parse_config
from prlhf.config import PDPOConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_parses(recipe):
    cfg = parse_config(PDPOConfig, ["--config", str(recipe), "--bf16", "false", "--use_cpu", "true"])
    assert cfg.train_file and cfg.output_dir and cfg.user_model in ("none", "uniform", "individual", "cluster")
