"""The recipe's training options reach the LoRA job: timestep sampling and range, debiased estimation."""
import pytest

import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import ConfigError
from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import crash_then_resume
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


def test_resume_equals_the_uninterrupted_run_with_every_new_option_on(pipeline, images, tmp_path,
                                                                       monkeypatch):
    """Logit-normal timesteps in a range, debiased weighting, Prodigy (Adafactor where prodigyopt is
    missing) with cosine restarts, the text encoder's LoRA, the EMA (of both LoRAs) and the validation
    loss, all at once."""
    import importlib.util
    import json

    import torch
    from safetensors.torch import load_file

    prodigy = importlib.util.find_spec("prodigyopt") is not None
    options = {"train.timestep_sampling": "logit_normal", "train.min_timestep": 20, "train.max_timestep": 980,
               "train.debiased_estimation": True, "optim.optimizer": "prodigy" if prodigy else "adafactor",
               "optim.lr": 1.0 if prodigy else 1e-3, "optim.schedule": "cosine_with_restarts",
               "optim.restarts": 2, "ema.decay": 0.7, "data.validation.fraction": 0.25, "validation.every": 1,
               "validation.timesteps": "[100, 800]", "lora.text_encoder.enabled": True}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **options))
    resumed = crash_then_resume(
        monkeypatch, lt, lambda: lt.main(recipe(pipeline, images, tmp_path / "resumed", **options)),
        at_call=4)
    for name in ("lora.safetensors", "lora_ema.safetensors", "lora_ema.peft.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for log in ("loss.jsonl", "validation.jsonl"):
        rows = [[{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in
                 (out / log).read_text().splitlines()] for out in (straight, resumed)]
        assert rows[0] == rows[1] and len(rows[0]) >= 4, log
