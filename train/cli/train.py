"""`adapterkit train JOB CONFIG [key=value ...]`: run a training recipe.

JOB names a recipe dataclass and its `main(cfg)`; CONFIG is a YAML file loaded into that dataclass
(unknown keys fail with the closest valid name) and each `key=value` overrides one dotted key, typed
by the field it sets (`optim.lr=5e-5 train.steps=200 data.trigger="sks style"`).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from adapterkit.train.cli.checks import check_output, writing
from adapterkit.train.config import load_config

# job -> (module, recipe class); imported only when that job runs.
JOBS = {
    "lora": ("adapterkit.train.jobs.lora", "LoraRecipe"),
    "controlnet": ("adapterkit.train.jobs.controlnet", "ControlNetRecipe"),
    "pretrain": ("adapterkit.train.jobs.pretrain", "PretrainRecipe"),
}


# Recipe fields that name what a job reads: (dotted key, "folder" | "file" | "any").
INPUTS = (("model.base", "any"), ("model.tokenizer", "any"), ("model.config_dir", "folder"),
          ("data.root", "folder"), ("control.folder", "folder"), ("control.lora", "file"))


def run(args) -> int:
    module_name, recipe_name = JOBS[args.job]
    module = importlib.import_module(module_name)
    cfg = load_config(args.config, getattr(module, recipe_name), args.overrides)
    out = check_paths(cfg)
    with writing(out, "output.dir"):
        out = module.main(cfg)
    print(f"done: {out}")
    return 0


def check_paths(cfg: Any) -> Path:
    """Before anything is loaded or created: every input the recipe names exists (as a folder where
    one is read), and output.dir can be written and lies neither on nor inside an input (a training
    run inside its picture folder would add its own files to the pictures). Returns output.dir."""
    inputs = []
    for key, kind in INPUTS:
        value = _get(cfg, key)
        if value is None:
            continue
        if key == "control.lora":
            from adapterkit.adapters.lora_files import split_lora_spec
            value = split_lora_spec(value)[0]
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"{key} {value!r} does not exist")
        if kind == "folder" and not path.is_dir():
            raise FileNotFoundError(f"{key} {value!r} is not a folder")
        if kind == "file" and not path.is_file():
            raise FileNotFoundError(f"{key} {value!r} is not a file")
        inputs.append((key, value))
    for hint in _get(cfg, "sample.hints") or ():
        if not Path(hint).is_file():
            raise FileNotFoundError(f"sample.hints: {hint!r} is not a file")
        inputs.append(("sample.hints", hint))
    return check_output(cfg.output.dir, "output.dir", inputs=inputs, folder=True)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def register(sub) -> None:
    p = sub.add_parser("train", help="train an adapter from a YAML recipe",
                       description=__doc__.splitlines()[0])
    jobs = p.add_subparsers(dest="job", metavar="JOB", required=True)
    for job in JOBS:
        j = jobs.add_parser(job, help=f"train a {job} (recipe: configs/*{job}*.yaml)")
        j.add_argument("config", help="YAML recipe")
        j.add_argument("overrides", nargs="*", metavar="key=value", help="typed overrides of recipe keys")
        j.set_defaults(func=run)
