"""The recipe's training options reach the LoRA job: timestep sampling and range, debiased estimation."""
import pytest

import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import ConfigError
from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


def test_timestep_range_and_debiased_weighting_reach_the_loss(pipeline, images, tmp_path, monkeypatch):
    real, seen = lt.diffusion_loss, []

    def spy(model_out, x0, noise, t, schedule, *weighting):
        seen.append((t.clone(), weighting))
        return real(model_out, x0, noise, t, schedule, *weighting)

    monkeypatch.setattr(lt, "diffusion_loss", spy)
    main(recipe(pipeline, images, tmp_path / "run", **{
        "train.steps": 3, "train.timestep_sampling": "logit_normal", "train.min_timestep": 100,
        "train.max_timestep": 200, "train.debiased_estimation": True, "output.checkpoint_every": 0}))
    assert len(seen) == 3
    for t, weighting in seen:
        assert t.min() >= 100 and t.max() < 200
        assert weighting == (5.0, True)


def test_timestep_options_are_checked_in_the_recipe(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match=r"min_timestep \(300\) must be below max_timestep \(200\)"):
        recipe(pipeline, images, tmp_path, **{"train.min_timestep": 300, "train.max_timestep": 200})
    with pytest.raises(ConfigError, match=r"train\.mode_scale"):
        recipe(pipeline, images, tmp_path, **{"train.timestep_sampling": "mode", "train.mode_scale": 3})
