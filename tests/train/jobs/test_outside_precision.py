"""The precision is the recipe's (train/jobs/precision.py settle_precision): `accelerate launch
--mixed_precision X` (or an `accelerate config` default, both reaching the script as
ACCELERATE_MIXED_PRECISION) is mapped onto model.dtype "auto", refused against any other choice, and
never handed to accelerate, whose autocast would silently change an fp32 run."""
import json

import pytest
import torch
import yaml

from adapterkit.train.config import load_config
from adapterkit.train.jobs.loop import make_accelerator
from adapterkit.train.jobs.precision import OUTSIDE_PRECISION, PrecisionConflict, settle_precision
from adapterkit.train.jobs.pretrain import PretrainRecipe
from support.cli import run
from support.fixtures import alias
from support.recipes import lora_recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


@pytest.mark.parametrize("asked, dtype, result", [
    (None, "fp32", "fp32"), ("no", "fp32", "fp32"), ("bf16", "auto", "bf16"), ("fp16", "auto", "fp16"),
    ("bf16", "bf16", "bf16"), ("bf16", "fp32", "refused"), ("fp16", "bf16", "refused"),
    ("fp8", "auto", "refused")])
def test_outside_request_is_mapped_onto_auto_or_refused(pipeline, images, tmp_path, monkeypatch,
                                                        asked, dtype, result):
    if asked is None:
        monkeypatch.delenv(OUTSIDE_PRECISION, raising=False)
    else:
        monkeypatch.setenv(OUTSIDE_PRECISION, asked)
    cfg = lora_recipe(pipeline, images, tmp_path, **{"model.dtype": dtype})
    if result == "refused":
        with pytest.raises(PrecisionConflict, match=rf"{OUTSIDE_PRECISION}.*--mixed_precision.*model.dtype"):
            settle_precision(cfg)
        return
    settled, note = settle_precision(cfg)
    assert settled.model.dtype == result
    assert (note is not None) == (dtype == "auto" and asked not in (None, "no"))


def test_pretrain_recipe_takes_bf16_only_where_it_says_so(monkeypatch):
    monkeypatch.setenv(OUTSIDE_PRECISION, "bf16")
    assert settle_precision(load_config({}, PretrainRecipe))[1] is None          # its default is bf16
    with pytest.raises(PrecisionConflict, match="train.mixed_precision is no"):
        settle_precision(load_config({"train": {"mixed_precision": "no"}}, PretrainRecipe))
    monkeypatch.setenv(OUTSIDE_PRECISION, "fp16")
    with pytest.raises(PrecisionConflict, match="train.mixed_precision"):
        settle_precision(load_config({}, PretrainRecipe))


def test_accelerator_never_takes_the_outside_request(pipeline, images, tmp_path, monkeypatch):
    monkeypatch.setenv(OUTSIDE_PRECISION, "bf16")
    cfg = lora_recipe(pipeline, images, tmp_path / "a", **{"model.dtype": "bf16"})
    accelerator = make_accelerator(tmp_path / "a", cfg)
    assert accelerator.mixed_precision == "no"                   # no autocast around the model
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    assert model(torch.ones(1, 2)).dtype == torch.float32
    with pytest.raises(PrecisionConflict, match="is auto: set model.dtype=bf16"):
        make_accelerator(tmp_path / "b", lora_recipe(pipeline, images, tmp_path / "b"))   # API, unmapped


def test_cli_refuses_an_fp32_recipe_under_bf16_and_maps_auto(pipeline, images, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv(OUTSIDE_PRECISION, "bf16")
    recipe = tmp_path / "r.yaml"
    cfg = {"model": {"base": str(pipeline), "dtype": "fp32"},
           "data": {"root": str(images), "resolution": 32, "bucket_step": 8, "min_side": 32},
           "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
           "train": {"steps": 1, "batch_size": 2}, "output": {"dir": str(tmp_path / "out")}}
    recipe.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["train", "lora", recipe], capsys)
    assert code == 2 and "model.dtype is fp32" in err and "--mixed_precision" in err
    assert not (tmp_path / "out").exists()                       # refused before anything was made
    code, out, err = run(["train", "lora", recipe, "model.dtype=auto"], capsys)
    assert code == 0, err
    assert "model.dtype auto -> bf16" in out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    precision = json.loads(md["adapterkit.precision"])
    assert precision == {"base": "bf16", "adapter_compute": "base", "adapter_weights": "fp32",
                         "accelerate_mixed_precision": "no", "outside_request": "bf16"}
    assert md["ss_mixed_precision"] == "bf16"
