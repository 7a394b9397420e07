"""`adapterkit train JOB CONFIG [key=value ...]`: run a training recipe.

JOB names a recipe dataclass and its `main(cfg)`; CONFIG is a YAML file loaded into that dataclass
(unknown keys fail with the closest valid name) and each `key=value` overrides one dotted key, typed
by the field it sets (`optim.lr=5e-5 train.steps=200 data.trigger="sks style"`).

A finished run ends with a summary (`summary`): the files the job exported (names and sizes), what
else is in the output folder (loss.png, samples/, checkpoints/, the trackers' folders), the loss
over the first and last steps of out/loss.jsonl, the steps, the wall time and how to sample with
the result. A run that fails leaves no empty folder behind it: when output.dir (or a folder
above it) did not exist before and the run wrote no file in it, the folders it made are removed
(`remove_if_empty`); a folder that existed before is never touched.
"""
from __future__ import annotations

import importlib
import os
import shlex
import time
from pathlib import Path
from typing import Any

from adapterkit.train.cli.checks import check_output, writing
from adapterkit.train.config import load_config, to_yaml

# job -> (module, recipe class); imported only when that job runs.
JOBS = {
    "lora": ("adapterkit.train.jobs.lora", "LoraRecipe"),
    "controlnet": ("adapterkit.train.jobs.controlnet", "ControlNetRecipe"),
    "pretrain": ("adapterkit.train.jobs.pretrain", "PretrainRecipe"),
}


# How `adapterkit sample` takes each job's file; a job not named here gets no usage line.
USAGE = {"lora": "--lora {file}:1", "controlnet": "--controlnet {file} --hint EDGES.png"}
# Steps averaged for the loss "at the start" and "at the end": one step's loss is mostly noise (its
# timestep's), a handful of steps says which way the run went.
LOSS_WINDOW = 10


# Recipe fields that name what a job reads: (dotted key, "folder" | "file" | "any").
INPUTS = (("model.base", "any"), ("model.tokenizer", "any"), ("model.config_dir", "folder"),
          ("data.root", "folder"), ("control.folder", "folder"), ("control.lora", "file"))


def run(args) -> int:
    module_name, recipe_name = JOBS[args.job]
    module = importlib.import_module(module_name)
    cfg = load_config(args.config, getattr(module, recipe_name), args.overrides)
    if args.print_config:                          # the recipe as it would run: every key, defaults filled in
        print(f"# adapterkit train {args.job} {args.config}: the resolved recipe (defaults included)")
        print(to_yaml(cfg), end="")
        return 0
    from adapterkit.train.jobs.precision import settle_precision  # torch: not before --help
    cfg, note = settle_precision(cfg)              # accelerate launch --mixed_precision: mapped or refused
    if note:
        print(note, flush=True)
    out = check_paths(cfg)
    created = first_missing(out)
    t0 = time.monotonic()
    try:
        with writing(out, "output.dir"):
            out = module.main(cfg)
    except BaseException:                       # an error or Ctrl-C: no empty output.dir left behind
        if created is not None:
            remove_if_empty(created)
        raise
    print(summary(args.job, module, cfg, Path(out), time.monotonic() - t0))
    return 0


def summary(job: str, module: Any, cfg: Any, out: Path, seconds: float) -> str:
    """The lines a finished run ends with: the output folder, each exported file with its size (a
    folder's is the sum of its files), the loss at the start and end of loss.jsonl, the steps and wall
    time, and an `adapterkit sample` line using the first file."""
    files = [f for f in getattr(module, "exported_files", lambda c, o: [])(cfg, out) if f.exists()]
    lines = [f"done: {out} ({_duration(seconds)})"]
    lines += [f"  {f.name}{'/' if f.is_dir() else ''}  {_size(f)}" for f in files]
    beside = sorted(f"{p.name}{'/' if p.is_dir() else ''}" for p in out.iterdir()
                    if p not in files and not p.name.startswith(".") and p.name != "cache")
    if beside:
        lines.append(f"  also: {', '.join(beside)}")
    lines.append(f"  {loss_line(out / 'loss.jsonl')}")
    if files and job in USAGE:
        use = USAGE[job].format(file=_quoted(files[0]))
        lines.append(f"use it: adapterkit sample --base {_quoted(cfg.model.base)} {use} --prompt \"...\" "
                     "-o grid.png")
    return "\n".join(lines)


def loss_line(path: Path) -> str:
    """"steps N, loss A -> B (mean of the first/last k steps)" from a run's loss.jsonl."""
    from adapterkit.train.jobs.progress import read_rows

    rows = [r for r in read_rows(path) if isinstance(r.get("loss"), int | float)] if path.exists() else []
    if not rows:
        return "no loss logged (no step was run)"
    k = min(LOSS_WINDOW, max(1, len(rows) // 4))
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    span = "first/last step" if k == 1 else f"mean of the first/last {k} steps"
    return f"steps {rows[-1]['step']}, loss {first:.4g} -> {last:.4g} ({span})"


def _size(path: Path) -> str:
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    n = sum(f.stat().st_size for f in files)
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{seconds:.1f} s"


def _quoted(path: Any) -> str:
    return shlex.quote(str(path))


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` (itself included) that does not exist yet, which a run creating
    `path` creates; None when `path` exists."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` and the folders under it when none of them holds a file (or anything but a
    folder); otherwise leave all of it. Only `os.rmdir` is used, which refuses a folder that is not
    empty, so a file another process writes meanwhile is never deleted."""
    if not folder.is_dir() or any(not p.is_dir() or p.is_symlink() for p in folder.rglob("*")):
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        try:
            sub.rmdir()
        except OSError:
            return


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
        j = jobs.add_parser(job, help=f"train a {job} (recipe: configs/*{job}*.yaml)",
                            epilog=f"Every recipe key with its value, defaults filled in: adapterkit "
                                   f"train {job} CONFIG --print-config")
        j.add_argument("config", help="YAML recipe")
        j.add_argument("overrides", nargs="*", metavar="key=value", help="typed overrides of recipe keys")
        j.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe (overrides applied, defaults filled in) as YAML, "
                            "then exit")
        j.set_defaults(func=run)
