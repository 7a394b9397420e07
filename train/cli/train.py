"""`adapterkit train JOB CONFIG [key=value ...]`: run a training recipe.

JOB names a recipe dataclass and its `main(cfg)`; CONFIG is a YAML file loaded into that dataclass
(unknown keys fail with the closest valid name) and each `key=value` overrides one dotted key, typed
by the field it sets (`optim.lr=5e-5 train.steps=200 data.trigger="sks style"`).
"""
from __future__ import annotations

import importlib

from adapterkit.train.config import load_config

# job -> (module, recipe class); imported only when that job runs.
JOBS = {
    "lora": ("adapterkit.train.jobs.lora", "LoraRecipe"),
    "controlnet": ("adapterkit.train.jobs.controlnet", "ControlNetRecipe"),
    "pretrain": ("adapterkit.train.jobs.pretrain", "PretrainRecipe"),
}


def run(args) -> int:
    module_name, recipe_name = JOBS[args.job]
    module = importlib.import_module(module_name)
    cfg = load_config(args.config, getattr(module, recipe_name), args.overrides)
    out = module.main(cfg)
    print(f"done: {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train an adapter from a YAML recipe",
                       description=__doc__.splitlines()[0])
    jobs = p.add_subparsers(dest="job", metavar="JOB", required=True)
    for job in JOBS:
        j = jobs.add_parser(job, help=f"train a {job} (recipe: configs/*{job}*.yaml)")
        j.add_argument("config", help="YAML recipe")
        j.add_argument("overrides", nargs="*", metavar="key=value", help="typed overrides of recipe keys")
        j.set_defaults(func=run)
