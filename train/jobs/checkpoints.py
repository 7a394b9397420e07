"""Training checkpoints: written atomically, checksummed, rotated, found again on resume.

A checkpoint is a folder `step-000123/` under the run's `checkpoints/`. It is assembled in a hidden
temp folder (`.tmp-step-000123-<pid>`), gets a `COMPLETE` marker as its last file, and only then is
renamed into place, so a crash at any moment leaves either the previous checkpoints or a complete new
one, never a half-written folder under a checkpoint's name. Temp folders of killed writers are removed
by the next write; a step folder without its marker can only come from outside: it is left alone.

The marker is JSON: the step and the sha256 and size of every other file in the folder. Resume takes
the newest checkpoint whose files all match it and whose state files read back (train/jobs/state.py:
the job's own state in safetensors and JSON, never a pickle); a damaged one is passed over for the
next older with a message naming the file, and one that holds pickled state (accelerate's
`save_state` layout of earlier versions, or planted) is never read. What else goes inside: the
adapter exports and `trainer_state.json` (the step, the process count, the recipe).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adapterkit.train.config import ConfigError, load_config, to_dict
from adapterkit.train.jobs.recipe import flat_dict
from adapterkit.train.jobs.state import STATE_FILE, StateFileError, TrainingState  # noqa: F401 (STATE_FILE: named here too)

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
    trainer_state.json, then the marker with every file's checksum; then rename; then rotate down to the
    newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
        with open(tmp / MARKER, "w") as f:
            f.write(json.dumps({"step": step, "files": file_sums(tmp)}, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():                 # the same step again (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Rotation counts only the checkpoints before this one: a higher-numbered one (a damaged newest the
    # resume passed over, or another run's) never pushes out the checkpoint just written (reliability.md C3).
    older = [d for d in checkpoint_dirs(root) if int(_NAME.match(d.name).group(1)) < step]
    for old in older[:max(len(older) - (keep - 1), 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


TRAINER_STATE = "trainer_state.json"


def file_sums(folder: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under `folder` but the marker."""
    return {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- checking a checkpoint before it is resumed --------------------------------------------------

class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be resumed; the message names it and what is wrong."""


# Files of accelerate's pickled save_state layout (and any pickle): never read, whoever put them there.
PICKLED = re.compile(r".*\.(pkl|pickle|bin|pt|pth|ckpt)$")


def verified_trainer_state(ckpt: Path, state: TrainingState) -> dict:
    """trainer_state.json of `ckpt` after checking that every file matches the marker's checksum, that
    it holds no pickle and every state file `state` reads; raises DamagedCheckpoint naming the problem."""
    pickled = sorted(p.name for p in ckpt.iterdir() if PICKLED.match(p.name))
    if pickled:
        raise DamagedCheckpoint(
            f"{ckpt} holds pickled state ({', '.join(pickled)}): the layout of accelerate's save_state, "
            "which adapterkit checkpoints used before they were safetensors and JSON. Resume never "
            "unpickles a file (unpickling can run any code in it). The adapter files in it (*.safetensors) "
            "are still usable; delete the checkpoint, or checkpoints/, to train again from the start")
    listed = read_marker(ckpt)
    for name, expected in listed.items():
        problem = file_problem(ckpt / name, expected)
        if problem:
            raise DamagedCheckpoint(f"{ckpt} is damaged: {name} {problem}")
    trainer = read_trainer_state(ckpt)
    missing = [n for n in state.files(trainer["processes"]) if n not in listed]
    if missing:
        raise DamagedCheckpoint(f"{ckpt} is damaged: {', '.join(missing)} missing")
    return trainer


def read_marker(ckpt: Path) -> dict[str, dict]:
    """The marker's {file: {"sha256", "bytes"}}; DamagedCheckpoint when it is no such list."""
    try:
        listed = json.loads((ckpt / MARKER).read_bytes().decode("utf-8"))["files"]
        if all(isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int) and inside(name)
               for name, v in listed.items()):
            return listed
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        pass
    raise DamagedCheckpoint(f"{ckpt} is damaged: its {MARKER} marker holds no checksums of its files (a "
                            "checkpoint of an earlier adapterkit, or the marker was changed)")


def inside(name: str) -> bool:
    """A marker's file name that stays inside its checkpoint folder."""
    return bool(name) and not name.startswith("/") and ".." not in name.split("/")


def file_problem(path: Path, expected: dict) -> str | None:
    """What is wrong with `path` compared to its marker entry, or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return (f"is empty (it had {expected['bytes']} bytes)" if size == 0 else
                f"is truncated ({size} of {expected['bytes']} bytes)" if size < expected["bytes"] else
                f"has {size} bytes, not the {expected['bytes']} it was written with")
    if sha256(path) != expected["sha256"]:
        return "changed after it was written (its sha256 differs from the one in the marker)"
    return None


def read_trainer_state(ckpt: Path) -> dict:
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedCheckpoint(f"{ckpt} is damaged: {TRAINER_STATE} is not readable JSON "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
    ok = (isinstance(state, dict) and isinstance(state.get("config"), dict)
          and all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                  for k in ("step", "processes"))
          and state["processes"] >= 1 and state["step"] == int(_NAME.match(ckpt.name).group(1)))
    if not ok:
        raise DamagedCheckpoint(f"{ckpt} is damaged: {TRAINER_STATE} does not hold this checkpoint's step, "
                                "process count and recipe")
    return state


# --- resume and save -----------------------------------------------------------------------------

# What may change between a run and its resume:
MUTABLE = ("train.steps", "train.cuda_graphs", "output.", "sample.")


def resume(state: TrainingState, out: Path, cfg: Any, mutable: Sequence[str] = MUTABLE) -> int:
    """Load the newest intact checkpoint under out/checkpoints into `state`; returns the step to continue
    from (0 without checkpoints).

    A damaged checkpoint is passed over for the next older one, with a message; when none is intact the
    run stops rather than start over (which would rotate the damaged ones away). A checkpoint made with
    another base, data, adapter or loss setup is refused rather than continued (only the keys, or key
    prefixes ending in ".", in `mutable` may change)."""
    main = state.accelerator.is_main_process
    root, skipped = out / "checkpoints", []
    for ckpt in reversed(checkpoint_dirs(root)):
        try:
            trainer = verified_trainer_state(ckpt, state)
            check_same_run(out, ckpt, trainer["config"], cfg, mutable)
            loaded = state.read(ckpt, trainer["processes"])
            break
        except StateFileError as e:
            skipped.append(f"{ckpt} is damaged: {e}")
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    else:
        if skipped:
            raise DamagedCheckpoint("no checkpoint can be resumed:\n" + "".join(f"  - {s}\n" for s in skipped)
                                    + "Put an intact copy in its place if there is one, or delete "
                                    "checkpoints/ to start over.")
        return 0
    if main:
        for problem in skipped:
            print(f"skipping a checkpoint: {problem}", flush=True)
    try:
        notes = state.apply(loaded)
    except StateFileError as e:
        raise DamagedCheckpoint(f"{ckpt} could not be loaded: {e}. Move it away to resume from the previous "
                                "checkpoint, or delete checkpoints/ to start over") from None
    if main:
        for note in notes:
            print(f"note: {note}", flush=True)
        print(f"resuming from {ckpt} (step {trainer['step']})", flush=True)
    return trainer["step"]


def check_same_run(out: Path, ckpt: Path, saved: dict, cfg: Any, mutable: Sequence[str]) -> None:
    """Refuse a checkpoint whose recipe differs from `cfg` in more than the `mutable` keys. A key the
    saved recipe lacks (added to the recipe since that checkpoint was written) counts as its default."""
    before, now = flat_dict(with_defaults(saved, type(cfg))), flat_dict(to_dict(cfg))
    exact = {m for m in mutable if not m.endswith(".")}
    prefixes = tuple(m for m in mutable if m.endswith("."))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and k not in exact and not k.startswith(prefixes))
    if changed:
        raise ValueError(f"{out} holds a checkpoint of a different run ({ckpt.name}): "
                         + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
                         + ". Use another output.dir, or delete its checkpoints/ to start over.")


def with_defaults(saved: dict, cls: type) -> dict:
    """`saved` (a recipe as to_dict wrote it) read back through today's `cls`, so the keys it lacks take
    their defaults; as written when today's recipe no longer reads it (a key since removed: that
    difference is reported by the caller)."""
    try:
        return to_dict(load_config(saved, cls))
    except ConfigError:
        return saved


def save_checkpoint(state: TrainingState, out: Path, step: int, cfg: Any,
                    export: Callable[[Path, int], Any]) -> None:
    """An atomic checkpoint with the resumable state and the adapter files as of this step (every process
    calls it: each one's RNG state goes in; the main process writes)."""
    accelerator = state.accelerator
    accelerator.wait_for_everyone()
    random_states = state.random_states()
    if accelerator.is_main_process:
        def fill(folder: Path) -> None:
            state.save(folder, random_states)
            export(folder, step)
        write_checkpoint(out / "checkpoints", step, fill,
                         {"step": step, "processes": accelerator.num_processes, "config": to_dict(cfg)},
                         keep=cfg.output.keep_checkpoints)
    accelerator.wait_for_everyone()
