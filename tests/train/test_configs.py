"""Every shipped recipe in configs/ loads into its dataclass (paths supplied as overrides)."""

import pytest

from adapterkit.train.config import ConfigError, load_config
from adapterkit.train.jobs.lora import LoraRecipe
from support import REPO

CONFIGS = REPO / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*lora*.yaml")), ids=lambda p: p.name)
def test_lora_recipes_load(path, tmp_path):
    cfg = load_config(path, LoraRecipe, [f"model.base={tmp_path}", f"data.root={tmp_path}"])
    assert cfg.train.steps > 0 and cfg.lora.rank > 0
    assert set(cfg.output.formats) <= {"kohya", "peft"}


def test_a_typo_in_a_recipe_names_the_closest_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        load_config(CONFIGS / "sd15_lora.yaml", LoraRecipe, ["lora.rnak=4"])
