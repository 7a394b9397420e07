"""The experiment trackers a run logs to (recipe key `output.trackers`), through accelerate's own.

    tensorboard   event files under out/<job>/ (`tensorboard --logdir out`), the default
    wandb         Weights & Biases (`pip install wandb`), under out/wandb/; offline unless the user set
                  WANDB_MODE (nothing reaches the network by default: `wandb sync out/wandb/offline-run-*`
                  uploads a finished run)
    none          no tracker (loss.jsonl and loss.png are written in any case)

Every tracker gets the recipe (flattened) at the start, the loss and learning rate every
`output.log_every` steps, the jobs' own figures (val_loss, edge_f1/...), and each sample grid as an
image ("samples": TensorBoard's add_images, a wandb.Image) at the step it was drawn.

A recipe naming wandb where it is not installed fails when the recipe is read (`check_trackers`),
before any model loads. accelerate itself would leave an unavailable tracker out without a word
(accelerate.tracking.filter_trackers), so `check_kept` looks at what it kept. W&B is accelerate's
WandBTracker made here (`log_with`): accelerate names a W&B project after its TensorBoard folder,
and the ControlNet job's folder ("tensorboard", beside the exported controlnet/) is no project name.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

TRACKERS = ("tensorboard", "wandb", "none")
INSTALL = {"wandb": "pip install wandb"}          # the trackers that are optional packages


def check_trackers(names: Sequence[str]) -> None:
    """`output.trackers`' own checks: "none" stands alone, and every optional tracker is installed."""
    if "none" in names and len(names) > 1:
        raise ValueError(f"trackers {list(names)}: none means no tracker; give it alone ([none]) or drop it")
    for name in names:
        if name in INSTALL and not _installed(name):
            raise ValueError(f"trackers: {name} is not installed: `{INSTALL[name]}`, or set "
                             "output.trackers: [tensorboard]")


def _installed(module: str) -> bool:
    if module in sys.modules:                  # imported already (None: marked as absent)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def log_with(names: Sequence[str], job: str, out: Path) -> list:
    """accelerate's `log_with` for `output.trackers` (none: []): "tensorboard" by name (its folder is
    named by `start_trackers`' project), W&B as accelerate's own WandBTracker made here, so that its
    project is the job ("lora", "controlnet", "pretrain") and its files go under `out`."""
    from accelerate.tracking import WandBTracker

    return [WandBTracker(job, dir=str(out), name=Path(out).resolve().name) if n == "wandb" else n
            for n in dict.fromkeys(names) if n != "none"]


def check_kept(accelerator: Accelerator, names: Sequence[str]) -> None:
    """Every tracker asked for is one accelerate kept (it drops a tracker it finds no package for)."""
    from accelerate.tracking import GeneralTracker

    kept = {t.name if isinstance(t, GeneralTracker) else str(t) for t in accelerator.log_with}
    lost = [n for n in dict.fromkeys(names) if n != "none" and n not in kept]
    if lost:
        install = "; ".join(INSTALL.get(n, f"pip install {n}") for n in lost)
        raise ValueError(f"output.trackers: accelerate found no {', '.join(lost)} package in this "
                         f"environment ({install})")


def start_trackers(accelerator: Accelerator, names: Sequence[str], project: str, out: Path,
                   config: dict[str, Any]) -> str:
    """Start the run's trackers (main process) with the recipe `config`; returns one line saying where
    they write. TensorBoard writes to out/<project>/; W&B runs offline unless WANDB_MODE is set."""
    chosen = [n for n in dict.fromkeys(names) if n != "none"]
    if not chosen:
        return "trackers: none (loss.jsonl, loss.png)"
    if "wandb" in chosen:
        os.environ.setdefault("WANDB_MODE", "offline")
    accelerator.init_trackers(project, config=config)
    where = []
    for name in chosen:
        if name == "tensorboard":
            where.append(f"tensorboard in {Path(out) / project}/ (tensorboard --logdir {out})")
        elif name == "wandb":
            mode = os.environ["WANDB_MODE"]
            where.append(f"wandb {mode} in {Path(out) / 'wandb'}/"
                         + (" (`wandb sync` uploads it; WANDB_MODE=online logs live)" if mode == "offline"
                            else ""))
    return "trackers: " + ", ".join(where)


def log_grid(accelerator: Accelerator, path: Path, step: int, key: str = "samples") -> None:
    """The sample grid at `path` to every tracker as one image at `step` (main process; nothing when no
    tracker runs or no grid was written)."""
    if not accelerator.trackers or not Path(path).is_file():
        return
    with Image.open(path) as img:
        picture = img.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":              # SummaryWriter.add_images: a batch, uint8 HWC
            tracker.log_images({key: np.asarray(picture)[None]}, step=step, dataformats="NHWC")
        else:                                          # wandb and the others take PIL images
            tracker.log_images({key: [picture]}, step=step)
