"""What every command checks before it works, and the words for a write that fails.

    check_inputs([("--lora", path), ...])          each given path exists (FileNotFoundError naming the flag)
    check_numbers([("--steps", 25, Range(1)), ...]) numeric arguments in their ranges (train.config.Range)
    check_output(path, "-o", inputs=[...])         an output that can be written and is not an input
    with writing(path, "-o"): ...                  disk full / permission / read-only in those words
    os_error_message(e)                            the same words for an OSError caught anywhere

An output is refused, before anything is loaded or created, when it is one of the inputs or lies
inside an input folder (`merge --base B -o B/unet` would replace the user's U-Net, `convert X X` the
file being read), when it is a folder where a file is written (or the other way round), and when
the nearest existing folder above it cannot be written (permission denied, read-only file system).
Nothing here creates a file or folder.

A failed write is explained by its cause: OSError's errno where there is one (ENOSPC, EDQUOT, EACCES,
EPERM, EROFS); safetensors and torch lose the errno on the way (torch says "enforce fail at
inline_container.cc"), so for them the free space of the output's file system decides: under
`LOW_SPACE` left, the message says the disk is full. Their temp files are removed before the error
arrives here, so the space they took is free again; a disk that still has less than 64 MiB free is
full for any model file.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adapterkit.train.config import Range

LOW_SPACE = 64 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


class OutputError(ValueError):
    """An output that cannot be written where asked; the message says why and what to do."""


def check_inputs(flagged: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """FileNotFoundError naming the flag of the first given path that does not exist."""
    for flag, path in flagged:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")


def check_numbers(args: Sequence[tuple[str, float | None, Range]]) -> None:
    """ValueError naming the first argument (flag, value, allowed range) that is out of its range or
    not finite; None values (not given) pass."""
    for flag, value, allowed in args:
        if value is None:
            continue
        if not math.isfinite(value) or value not in allowed:
            raise ValueError(f"{flag} must be {allowed}, got {value}")


def check_output(path: str | os.PathLike, what: str, *,
                 inputs: Sequence[tuple[str, str | os.PathLike | None]] = (), folder: bool = False,
                 files: Sequence[str] = ()) -> Path:
    """Refuse an output `path` (named `what` in messages: "-o", "output.dir") that cannot be written or
    would land on an input; see the module docstring. `folder`: the output is a folder (else a file);
    `files`: the names written inside that folder, each checked against the inputs too."""
    out = Path(path)
    real = _real(out)
    written = [real, *(_real(out / name) for name in files)]
    for flag, given in inputs:
        if given is None:
            continue
        src = _real(Path(given))
        if src in written:
            raise OutputError(f"{what} {path} would overwrite {flag} {given}, which this command reads; "
                              "write to another name (the input is left as it is)")
        if src.is_dir() and real.is_relative_to(src):
            raise OutputError(f"{what} {path} is inside {flag} {given}, which this command reads; choose an "
                              "output outside it (the input folder is only ever read)")
    if out.exists() and folder and not out.is_dir():
        raise OutputError(f"{what} {path} exists and is a file, not a folder; give a folder")
    if out.exists() and not folder and out.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name (e.g. {Path(path) / 'out'})")
    parent = _existing_ancestor(out if folder else out.parent)
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: {parent} is a file, so nothing can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "it is on a read-only file system" if _read_only_fs(parent) else "permission denied"
        raise OutputError(f"{what} {path}: cannot write in {parent} ({why}); choose a folder you can "
                          "write to")
    return out


@contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Run a write to `path`; turn a disk-full, permission or read-only failure into an OutputError
    that says so. Other errors pass unchanged (an OSError such as FileNotFoundError keeps its words)."""
    try:
        yield
    except OSError as e:
        if e.errno in (*_NO_SPACE, *_DENIED, errno.EROFS):
            raise OutputError(f"{what} {path}: {os_error_message(e)}") from None
        raise
    except Exception as e:
        free = free_space(path)
        if free is None or free >= LOW_SPACE:
            raise
        first_line = (str(e).splitlines() or [""])[0][:160]
        raise OutputError(
            f"{what} {path}: writing failed ({type(e).__name__}: {first_line}) and its disk has only "
            f"{free / 2**20:.1f} MiB free: no space left on device. Free some space or write to another "
            "disk; files written before are intact.") from None


def os_error_message(e: OSError) -> str:
    """An OSError as what happened and what to do: disk full, permission denied, read-only, ..."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in _NO_SPACE:
        return (f"no space left on device{where}: free some space or write to another disk; files written "
                "before are intact")
    if e.errno in _DENIED:
        return (f"permission denied{where}: check the file's permissions, or write to a folder you may "
                "write to")
    if e.errno == errno.EROFS:
        return f"read-only file system{where}: choose a folder on a writable disk"
    if e.errno == errno.EISDIR:
        return f"is a folder, not a file{where}"
    return f"{e.strerror or type(e).__name__}{where}"


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free to us on the file system that holds `path` (or would), or None if unknown."""
    try:
        return shutil.disk_usage(_existing_ancestor(Path(path))).free
    except OSError:
        return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):        # no statvfs on Windows
        return False
