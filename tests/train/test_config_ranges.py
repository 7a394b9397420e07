"""train.config's RANGES and FILE_NAMES: every numeric field of every recipe has a range, each range
accepts its documented edge and refuses what lies beyond it, and the YAML limits hold for overrides
too (the CLI cases are in tests/train/cli/test_bad_input.py)."""
from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from adapterkit.train.config import FILE_NAMES, RANGES, ConfigError, Range, load_config
from adapterkit.train.jobs.controlnet import ControlNetRecipe
from adapterkit.train.jobs.lora import LoraRecipe
from adapterkit.train.jobs.pretrain import PretrainRecipe

RECIPES = (LoraRecipe, ControlNetRecipe, PretrainRecipe)


def numeric_fields(cls, path=""):
    """(dotted path, field name) of every int/float field (also optional, or a tuple of them)."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{path}{f.name}.")
            continue
        inner = set(args) - {type(None), Ellipsis} if typing.get_origin(tp) in (
            typing.Union, types.UnionType, tuple) else {tp}
        if inner & {int, float}:
            yield f"{path}{f.name}", f.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.__name__)
def test_every_numeric_recipe_field_has_a_range(recipe):
    missing = [p for p, name in numeric_fields(recipe) if name not in RANGES]
    assert not missing, f"add to train.config.RANGES: {missing}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.__name__)
def test_every_default_is_in_its_range(recipe):
    required = {} if recipe is PretrainRecipe else {"model": {"base": "b"}, "data": {"root": "r"}}
    defaults = load_config(required, recipe)
    for path, name in numeric_fields(recipe):
        value = defaults
        for part in path.split("."):
            value = getattr(value, part)
        for x in (value if isinstance(value, tuple) else (value,)):
            assert x is None or x in RANGES[name], (path, x, str(RANGES[name]))


@pytest.mark.parametrize("allowed, inside, outside, text", [
    (Range(1), [1, 10**9], [0, -1, 0.5], ">= 1"),
    (Range(0, note="0 = off"), [0, 3], [-1, -1e-9], ">= 0 (0 = off)"),
    (Range(0, low_open=True), [1e-12, 5], [0, -1], "> 0"),
    (Range(0, 1, high_open=True), [0, 0.999], [1, -0.1], ">= 0 and < 1"),
    (Range(), [-1e300, 0, 1e300], [], "any finite number"),
])
def test_range_edges_and_text(allowed, inside, outside, text):
    assert all(x in allowed for x in inside) and not any(x in allowed for x in outside)
    assert str(allowed) == text


def test_file_names_and_overrides_are_checked():
    base = {"model": {"base": "b"}, "data": {"root": "r"}}
    assert set(FILE_NAMES) == {"name", "scheduler"}
    assert load_config(base, LoraRecipe, ["output.name=style-v2"]).output.name == "style-v2"
    for bad in ("../x", "a/b", "a\\b", "..", ""):
        with pytest.raises(ConfigError, match="output.name: .* must be a plain file name"):
            load_config(base, LoraRecipe, [f"output.name={bad}"])
    with pytest.raises(ConfigError, match=r"train.steps: must be >= 1, got 0"):
        load_config(base, LoraRecipe, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"sample.seeds\[1\]: must be >= 0"):
        load_config(base, LoraRecipe, ["sample.seeds=1,-2"])
    with pytest.raises(ConfigError, match="data.caption_dropout: inf is not a finite number"):
        load_config(base, LoraRecipe, ["data.caption_dropout=inf"])
    levels = ["&a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 5)]     # 10**5 strings
    with pytest.raises(ConfigError, match="alias bomb"):                   # an override is YAML too
        load_config(base, LoraRecipe, ["sample.prompts=[" + ", ".join(levels) + "]"])
