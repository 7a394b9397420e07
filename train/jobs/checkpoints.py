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
from collections.abc import Callable
from pathlib import Path

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
