"""YAML recipes -> dataclasses: unknown keys, typed overrides, Literal choices, round trips."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from adapterkit.train.config import ConfigError, load_config, to_dict, to_yaml
from adapterkit.train.data.folder import DataConfig
from adapterkit.unet.config import Stage, UNetConfig


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    kind: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    accumulate: Literal[1, 2, 4] = 1


@dataclass(frozen=True)
class Data:
    root: str = ""
    resolution: int = 512
    trigger: str = ""
    flip: bool = False
    sizes: tuple[int, ...] = (512,)
    max_steps: int | None = None
    limit: Optional[float] = None  # noqa: UP045 - the typing spelling must work too
    out: Path = Path("out")

    def __post_init__(self):
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")


@dataclass(frozen=True)
class Recipe:
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    name: str = "run"
    tags: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    data: DataConfig
    steps: int = 10


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# -- overrides ------------------------------------------------------------------------------------

OVERRIDES = [
    ("optim.lr=1e-4", "optim.lr", 1e-4),
    ("optim.lr=3", "optim.lr", 3.0),
    ('data.trigger="sks style"', "data.trigger", "sks style"),
    ("data.trigger='sks style'", "data.trigger", "sks style"),
    ("data.trigger=sks style", "data.trigger", "sks style"),
    ("data.trigger=no", "data.trigger", "no"),            # a str field keeps the text
    ("data.trigger=1.5", "data.trigger", "1.5"),
    ("data.trigger=", "data.trigger", ""),
    ("data.trigger=a=b", "data.trigger", "a=b"),          # split at the first '=' only
    ("data.flip=true", "data.flip", True),
    ("data.flip=False", "data.flip", False),
    ("data.flip=yes", "data.flip", True),
    ("data.flip=no", "data.flip", False),
    ("data.flip=1", "data.flip", True),
    ("data.flip=0", "data.flip", False),
    ("data.resolution=768", "data.resolution", 768),
    ("data.resolution=1e3", "data.resolution", 1000),
    ("data.max_steps=none", "data.max_steps", None),
    ("data.max_steps=null", "data.max_steps", None),
    ("data.max_steps=250", "data.max_steps", 250),
    ("data.limit=0.5", "data.limit", 0.5),
    ("data.limit=~", "data.limit", None),
    ("optim.kind=sgd", "optim.kind", "sgd"),
    ("optim.accumulate=4", "optim.accumulate", 4),
    ("data.sizes=512,768", "data.sizes", (512, 768)),
    ("data.sizes=[512, 768]", "data.sizes", (512, 768)),
    ("data.sizes=640", "data.sizes", (640,)),
    ("data.sizes=", "data.sizes", ()),
    ("optim.betas=0.5,0.6", "optim.betas", (0.5, 0.6)),
    ("optim.betas=[0.5, 0.6]", "optim.betas", (0.5, 0.6)),
    ("tags=a,b", "tags", ["a", "b"]),
    ("data.out=/tmp/run", "data.out", Path("/tmp/run")),
    ("scales.style=0.8", "scales", {"style": 0.8}),
    ("data={resolution: 256, flip: true}", "data", Data(resolution=256, flip=True)),
]


@pytest.mark.parametrize("override, key, expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_override_is_typed_by_the_field(override, key, expected):
    value = get(load_config({}, Recipe, [override]), key)
    assert value == expected and type(value) is type(expected)


OVERRIDE_ERRORS = [
    ("optim.lr=fast", ["optim.lr", "'fast'", "float"]),
    ("data.resolution=1.5", ["data.resolution", "'1.5'", "int"]),
    ("data.resolution=big", ["data.resolution", "'big'", "int"]),
    ("data.flip=maybe", ["data.flip", "'maybe'", "bool"]),
    ("optim.kind=adam", ["optim.kind", "'adam'", "'adamw'", "'sgd'"]),
    ("optim.accumulate=3", ["optim.accumulate", "'3'", "1, 2, 4"]),
    ("data.resolutoin=5", ["data.resolutoin: unknown key; did you mean 'resolution'?"]),
    ("optimm.lr=1", ["optimm: unknown key; did you mean 'optim'?"]),
    ("data.zzz=1", ["data.zzz: unknown key; valid keys: root, resolution"]),
    ("optim.betas=0.9", ["optim.betas", "list of 2", "'0.9'"]),
    ("data.sizes=512,big", ["data.sizes[1]", "'big'", "int"]),
    ("data.max_steps=many", ["data.max_steps", "'many'", "int"]),
    ("optim.lr", ["'optim.lr'", "key=value"]),
    ("=3", ["key=value"]),
    ("name.first=x", ["name.first", "not a section"]),
    ("data.resolution=100", ["data: resolution must be a multiple of 8"]),   # __post_init__, with path
    ("data={resolution: [1]}", ["data.resolution", "int", "[1]"]),
]


@pytest.mark.parametrize("override, fragments", OVERRIDE_ERRORS, ids=[o[0] for o in OVERRIDE_ERRORS])
def test_override_errors_name_key_value_and_type(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config({}, Recipe, [override])
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_overrides_win_over_yaml_and_leave_the_callers_dict_alone():
    raw = {"optim": {"lr": 0.1, "warmup": 5}}
    cfg = load_config(raw, Recipe, ["optim.lr=0.2", "data.resolution=256"])
    assert cfg.optim == Optim(lr=0.2, warmup=5) and cfg.data.resolution == 256
    assert raw == {"optim": {"lr": 0.1, "warmup": 5}}


# -- YAML files -----------------------------------------------------------------------------------

YAML_OK = [
    ("", "optim.lr", 1e-4),                                   # empty file: all defaults
    ("optim:\n  lr: 1e-4\n", "optim.lr", 1e-4),               # PyYAML reads 1e-4 as a string
    ("optim:\n  lr: 2\n", "optim.lr", 2.0),
    ("data:\n  flip: yes\n", "data.flip", True),
    ("data:\n  resolution: 1.0e+3\n", "data.resolution", 1000),
    ("data:\n  sizes: [256, 512]\n", "data.sizes", (256, 512)),
    ("data:\n  trigger: 'no'\n", "data.trigger", "no"),
    ("data:\n  max_steps: null\n", "data.max_steps", None),
    ("optim:\n  kind: sgd\n", "optim.kind", "sgd"),
    ("tags: [x, y]\n", "tags", ["x", "y"]),
    ("\ufeffname: bom\n", "name", "bom"),                     # a UTF-8 BOM from a Windows editor
]


@pytest.mark.parametrize("text, key, expected", YAML_OK, ids=[y[0] or "empty" for y in YAML_OK])
def test_yaml_values(tmp_path, text, key, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    value = get(load_config(path, Recipe), key)
    assert value == expected and type(value) is type(expected)


YAML_ERRORS = [
    ("data:\n  resolutoin: 5\n", ["data.resolutoin: unknown key; did you mean 'resolution'?"]),
    ("optim:\n  kind: adam\n", ["optim.kind", "'adam'", "'adamw', 'sgd'"]),      # Literal checked in YAML
    ("optim:\n  accumulate: '2'\n", ["optim.accumulate", "'2'", "1, 2, 4"]),
    ("data:\n  trigger: no\n", ["data.trigger", "bool False", "str", "quote"]),
    ("data:\n  trigger: 12\n", ["data.trigger", "int 12", "str"]),
    ("data:\n  resolution: 512.5\n", ["data.resolution", "512.5", "int"]),
    ("data:\n  flip: 2\n", ["data.flip", "2", "bool"]),
    ("optim:\n  lr: fast\n", ["optim.lr", "'fast'", "float"]),
    ("optim:\n  lr: true\n", ["optim.lr", "True", "float"]),
    ("optim:\n  lr: 1e-4\n  lr: 2e-4\n", ["duplicate key 'lr'", "line 3"]),
    ("data: [1, 2]\n", ["data", "mapping", "list"]),
    ("optim:\n  betas: 0.9\n", ["optim.betas", "list of 2", "0.9"]),
    ("optim:\n  betas: [0.9, 0.99, 0.999]\n", ["optim.betas", "3 items"]),
    ("- a\n- b\n", ["top level must be a mapping"]),
    ("data: {root: [unclosed\n", ["not valid YAML"]),
    ("zzz: 1\n", ["zzz: unknown key; valid keys: data, optim, name, tags, scales"]),
    ("data:\n  resolutoin: 5\n  flipp: true\n", ["data.resolutoin", "data.flipp", "'flip'"]),   # all of them
    ("scales:\n  style: high\n", ["scales.style", "'high'", "float"]),
]


@pytest.mark.parametrize("text, fragments", YAML_ERRORS, ids=[y[0] for y in YAML_ERRORS])
def test_yaml_errors(tmp_path, text, fragments):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path, Recipe)
    assert str(path) in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_missing_file_and_required_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", Recipe)
    with pytest.raises(ConfigError, match="^data: required key is missing$"):
        load_config({}, Needs)                                # a required section
    with pytest.raises(ConfigError, match=r"data: root is missing \(a required key\)"):
        load_config({"data": {}}, Needs)
    cfg = load_config({}, Needs, ["data.root=/images", "data.missing_caption=skip"])
    assert cfg.data.root == "/images" and cfg.data.missing_caption == "skip"
    with pytest.raises(ConfigError, match=r"data: caption_ext must start with '\.'"):   # __post_init__
        load_config({"data": {"root": "x", "caption_ext": "txt"}}, Needs)
    with pytest.raises(ConfigError, match=r"data\.caption_dropout: must be >= 0 and <= 1, got 1\.5"):
        load_config({"data": {"root": "x", "caption_dropout": 1.5}}, Needs)
    with pytest.raises(ConfigError, match=r"data\.missing_caption: 'drop' is not one of 'empty', 'skip'"):
        load_config({"data": {"root": "x", "missing_caption": "drop"}}, Needs)


# -- to_dict / YAML round trip --------------------------------------------------------------------

ROUND_TRIPS = [
    Recipe(),
    Recipe(data=Data(root="imgs", trigger="sks, style", flip=True, sizes=(512, 768), max_steps=7,
                     limit=0.25, out=Path("runs/a")),
           optim=Optim(lr=3e-5, kind="sgd", betas=(0.8, 0.9), accumulate=2), name="é ✓", tags=["a"],
           scales={"x": 0.5}),
    Needs(DataConfig(root="/data/style", trigger="sks", alpha_background=(0, 0, 0), flip=True)),
    UNetConfig(stages=(Stage(32, heads=4), Stage(64, attention=False)), norm_groups=8, context_dim=32),
]


@pytest.mark.parametrize("cfg", ROUND_TRIPS, ids=[type(c).__name__ for c in ROUND_TRIPS])
def test_round_trip(tmp_path, cfg):
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d                      # fits a safetensors metadata string
    assert load_config(d, type(cfg)) == cfg
    path = tmp_path / "out.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(path, type(cfg)) == cfg


def test_nested_lists_of_dataclasses():
    cfg = load_config({"stages": [{"channels": 32}, {"channels": 64, "attention": False}],
                       "norm_groups": 8}, UNetConfig)
    assert cfg.stages == (Stage(32), Stage(64, attention=False))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.chanels: unknown key; did you mean 'channels'\?"):
        load_config({"stages": [{"channels": 32}, {"chanels": 64}]}, UNetConfig)
    cfg = load_config({}, UNetConfig, ["stages=[{channels: 64}, {channels: 128}]", "norm_groups=32"])
    assert [s.channels for s in cfg.stages] == [64, 128]


def test_recipe_inputs_resolve_beside_the_recipe_and_in_the_bundled_folders(tmp_path, monkeypatch):
    """A recipe run from another directory finds its inputs: `base` beside the recipe, `assets/...`
    in the bundled assets; the output folder stays relative to the working directory, and what the
    working directory has, or an override gives, is taken as written."""
    from adapterkit.train.jobs.controlnet import ControlNetRecipe
    from adapterkit.train.jobs.lora import LoraRecipe
    from adapterkit.train.paths import data_dir

    recipes = tmp_path / "recipes"
    (recipes / "pictures").mkdir(parents=True)
    (recipes / "style.safetensors").write_bytes(b"")
    (recipes / "r.yaml").write_text("model: {base: assets/tiny-base}\ndata: {root: pictures}\n"
                                    "output: {dir: out/x}\ncontrol: {lora: 'style.safetensors:0.5'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipes / "r.yaml", ControlNetRecipe)
    assert Path(cfg.model.base) == data_dir("assets") / "tiny-base" and Path(cfg.model.base).is_dir()
    assert Path(cfg.data.root) == recipes / "pictures"
    assert cfg.control.lora == f"{recipes / 'style.safetensors'}:0.5"
    assert cfg.output.dir == "out/x"
    (elsewhere / "pictures").mkdir()                      # the working directory's own comes first
    assert load_config(recipes / "r.yaml", ControlNetRecipe).data.root == "pictures"
    cfg = load_config(recipes / "r.yaml", ControlNetRecipe, ["data.root=other"])
    assert cfg.data.root == "other"
    (recipes / "missing.yaml").write_text("model: {base: nowhere}\ndata: {root: nothing}\n")
    assert load_config(recipes / "missing.yaml", LoraRecipe).model.base == "nowhere"   # the job names it
