"""One run per output folder: `out/.adapterkit.lock`, held by the run that trains there.

Two runs on one folder would delete each other's in-progress checkpoints and interleave loss.jsonl. So
every job takes the lock before any work (`@one_run_per_output` on its `main`) and gives it back at
exit, on an error or a signal too. A second run stops with an error naming the holder (host, pid, start
time, command).

The lock is an exclusive `flock` on that file, which the kernel drops when its process dies however it
dies, so a lock file left by a `kill -9` or a crash is known to be stale: the next run takes it over and
says whose it was. (Its host, pid and start time are in the file for people; the pid alone could not
tell a dead holder from a reused pid.) Under `accelerate launch` the main process takes the lock and
tells the others the outcome, so all of them start, or stop with the same message.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from adapterkit.train.jobs.guards import check_writable

LOCK_FILE = ".adapterkit.lock"


class OutputInUse(ValueError):
    """Another run holds the output folder's lock."""


def one_run_per_output(main: Callable[[Any], Path]) -> Callable[[Any], Path]:
    """Wrap a job's `main(cfg)` in the lock of `cfg.output.dir`."""
    @functools.wraps(main)
    def locked(cfg):
        with OutputLock(Path(cfg.output.dir)):
            return main(cfg)
    return locked


class OutputLock:
    """`with OutputLock(out):` holds out/.adapterkit.lock inside (on the main process; see the module)."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, out / LOCK_FILE, None

    def __enter__(self) -> OutputLock:
        processes = PartialState(cpu=not torch.cuda.is_available())     # as make_accelerator's
        error: Exception | None = None
        if processes.is_main_process:
            try:
                check_writable(self.out)
                self.fd = take(self.path)
            except ValueError as e:
                error = e
        if processes.num_processes > 1:
            [message] = broadcast_object_list([str(error) if error else None])
            if message and not error:
                error = OutputInUse(message)
        if error:
            raise error
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            release(self.path, self.fd)
            self.fd = None
        return False


def take(path: Path) -> int:
    """Lock `path` (created if missing) and write this run into it; returns the open descriptor that holds
    the lock. Raises OutputInUse naming the holder if a live process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise OutputInUse(f"{path.parent} is in use by another run ({describe(holder)}). Wait for it to "
                              "finish, or choose another output.dir") from None
        if same_file(path, fd):
            break
        os.close(fd)                       # its holder removed it as we opened it: take the new one
    left = read_holder(fd)
    if left:
        print(f"note: {path} was left by a run that is no longer running ({describe(left)}); taking it over",
              flush=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300],
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def release(path: Path, fd: int) -> None:
    """Remove the lock file (if it is still ours), then drop the lock."""
    try:
        if same_file(path, fd):
            path.unlink()
    finally:
        os.close(fd)


def same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def read_holder(fd: int) -> dict | None:
    """The run a lock file names, or None when it is empty or unreadable (a run just starting)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "one that is just starting"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')!s:.120}")
