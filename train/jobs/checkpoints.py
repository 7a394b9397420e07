"""Training checkpoints: written atomically, rotated, found again on resume.

A checkpoint is a folder `step-000123/` under the run's `checkpoints/`. It is assembled in a hidden
temp folder (`.tmp-step-000123-<pid>`), gets a `COMPLETE` marker as its last file, and only then is
renamed into place, so a crash at any moment leaves either the previous checkpoints or a complete new
one, never a half-written folder under a checkpoint's name. Resume takes the newest folder whose
marker is present and ignores any other (a step folder without its marker can only come from
outside: it is left alone); temp folders of killed writers are removed by the next write.

What goes inside is accelerate's `save_state` (adapter weights through the save hook the trainer
registers, optimizer, LR schedule, every RNG) plus whatever files the trainer adds (the adapter
exports, `trainer_state.json`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

from adapterkit.train.config import to_dict
from adapterkit.train.jobs.precision import MasterWeights
from adapterkit.train.jobs.recipe import flat_dict

MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def write_checkpoint(root: str | os.PathLike, step: int, fill: Callable[[Path], None],
                     state: dict, keep: int) -> Path:
    """Create `root/step-{step}` atomically: `fill(tmp_dir)` writes the content, then `state` goes to
    trainer_state.json, then the marker; then rename; then rotate down to the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        with open(tmp / MARKER, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():                 # the same step again (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / "trainer_state.json"
    if not (Path(checkpoint) / MARKER).is_file() or not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker or "
                         "trainer_state.json); resume from another one or start fresh")
    return json.loads(path.read_text())


# --- a job's state in a checkpoint, and resume --------------------------------------------------


STATE_FILE = "adapter_state.safetensors"        # the trained tensors inside a checkpoint


def register_state_hooks(accelerator: Accelerator, state: Callable[[], dict[str, Tensor]],
                         master: MasterWeights | None, what: str) -> None:
    """Make accelerate's save_state/load_state keep only the trained tensors (`state()`), not the
    frozen base (1.7 GB of SD1.5 per checkpoint otherwise). `what` names them in errors."""
    def save_hook(models, weights, output_dir):
        weights.clear()
        models.clear()
        save_file(state(), str(Path(output_dir) / STATE_FILE))

    def load_hook(models, input_dir):
        models.clear()
        saved = load_file(str(Path(input_dir) / STATE_FILE))
        own = state()                              # detached views of the live tensors
        missing, unknown = set(own) - set(saved), set(saved) - set(own)
        if missing or unknown:
            raise ValueError(f"{input_dir}: the checkpoint's adapter does not match this run's {what} "
                             f"({len(missing)} tensors missing, {len(unknown)} unknown)")
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)
        if master:
            master.master_to_model()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# What may change between a run and its resume:
MUTABLE = ("train.steps", "train.cuda_graphs", "output.", "sample.")


def resume(accelerator: Accelerator, out: Path, cfg: Any, mutable: Sequence[str] = MUTABLE) -> int:
    """Load the newest complete checkpoint under out/checkpoints; returns the step to continue from.

    A checkpoint made with another base, data, adapter or loss setup is refused rather than continued
    (only the keys, or key prefixes ending in ".", in `mutable` may change)."""
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return 0
    state = read_state(ckpt)
    before, now = flat_dict(state["config"]), flat_dict(to_dict(cfg))
    exact = {m for m in mutable if not m.endswith(".")}
    prefixes = tuple(m for m in mutable if m.endswith("."))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and k not in exact and not k.startswith(prefixes))
    if changed:
        raise ValueError(f"{out} holds a checkpoint of a different run ({ckpt.name}): "
                         + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
                         + ". Use another output.dir, or delete its checkpoints/ to start over.")
    check_checkpoint_files(ckpt)
    try:
        accelerator.load_state(str(ckpt))
    except (OSError, RuntimeError, EOFError, KeyError) as e:
        raise ValueError(f"{ckpt} could not be loaded ({type(e).__name__}: {e}); move it away to resume "
                         "from the previous checkpoint, or delete checkpoints/ to start over") from None
    if accelerator.is_main_process:
        print(f"resuming from {ckpt} (step {state['step']})", flush=True)
    return int(state["step"])


def check_checkpoint_files(ckpt: Path) -> None:
    """Refuse a checkpoint missing a state file or holding an empty one (reliability C1): resuming
    from it would silently restart the optimizer or the RNG."""
    files = {p.name: p.stat().st_size for p in ckpt.iterdir() if p.is_file()}
    needed = [STATE_FILE, "optimizer.bin", "random_states_0.pkl"]
    missing = [n for n in needed if n not in files]
    empty = [n for n, size in files.items() if size == 0 and n != MARKER]
    if missing or empty:
        raise ValueError(f"{ckpt} is damaged: " + "; ".join(
            part for part in (f"missing {', '.join(missing)}" if missing else "",
                              f"empty {', '.join(empty)}" if empty else "") if part)
            + ". Move it away to resume from the previous checkpoint, or delete checkpoints/ to start over.")


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, cfg: Any,
                    export: Callable[[Path, int], Any]) -> None:
    """An atomic checkpoint with the resumable state and the adapter files as of this step."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        def fill(folder: Path) -> None:
            accelerator.save_state(str(folder))
            export(folder, step)
        write_checkpoint(out / "checkpoints", step, fill,
                         {"step": step, "processes": accelerator.num_processes, "config": to_dict(cfg)},
                         keep=cfg.output.keep_checkpoints)
    accelerator.wait_for_everyone()

