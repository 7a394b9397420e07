"""What a person watches: the plan a run starts with (`run_plan`), loss.jsonl (JsonlLog, LossLog), the
step losses read back from the GPU in batches (PendingSteps), the progress bar, and SIGINT/SIGTERM
(StopSignals: finish the step, write a checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from adapterkit.train.console import bar


class JsonlLog:
    """A JSON-lines file of rows keyed by "step", truncated to the resume step so a resumed run has
    one history. Only the main process (`active`) writes.

    Each row is appended with one write of the whole line, so a crash leaves at most its last line
    torn; on resume a torn last line is dropped with a note (a broken line elsewhere is an error naming
    it). The truncation writes a new file and renames it over the old one: a crash then leaves the old
    history or the new one, never half of either."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active = path, active
        self.rows = []
        if active and path.exists():
            self.rows = [r for r in read_rows(path) if r["step"] <= start]
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            os.replace(tmp, path)

    def write(self, row: dict) -> None:
        if self.active:
            self.rows.append(row)
            append_line(self.path, json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a torn last line (a crash mid-write) is left out with a note."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("not a row with an integer step")
        except ValueError as e:
            if number == len(lines):
                print(f"note: {path} ends in a torn line (a crash while it was written): left out",
                      flush=True)
                break
            raise ValueError(f"{path} line {number} is not a log row ({e}): repair or delete the file to "
                             "resume") from None
        rows.append(row)
    return rows


def append_line(path: Path, line: str) -> None:
    """Append `line` in one write call to a file opened for appending (O_APPEND: the kernel puts each
    write at the end as a whole)."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):                     # only on a full disk or a signal; still in order
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


class LossLog(JsonlLog):
    """loss.jsonl: one line per step; "seconds" is the wall time since this process began logging
    (a resumed run starts again from 0), for speed and time-to-loss plots."""

    def __init__(self, path: Path, start: int, active: bool):
        super().__init__(path, start, active)
        self.t0 = time.perf_counter()

    def add(self, step: int, loss: float, lr: float, seconds: float | None = None) -> None:
        """Row `step`; `seconds`: when the step ended, since `t0` (None: now)."""
        seconds = time.perf_counter() - self.t0 if seconds is None else seconds
        self.write({"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 3)})

    def plot(self, path: Path) -> None:
        from adapterkit.train.images import loss_curve_png
        if self.rows:
            loss_curve_png([r["step"] for r in self.rows], [r["loss"] for r in self.rows], path,
                           title="training loss")


class PendingSteps:
    """Steps done whose losses the device still holds, read back together (`read`).

    Reading a loss on the host (`.item()`) waits for the GPU to finish everything queued, and then the
    GPU idles while the host prepares and launches the next step (with a read every step the sd15 job
    held 0.92 of its step's speed on the H200: benchmarks/results/job_e2e_sd15_h200_cache_in_memory.json).
    So a step's loss stays a device tensor until the loop needs the values (a log line, a
    checkpoint, a sample, the end: `run_steps`), and one copy then brings them all back.

    Each row also gets the time its step ended, as loss.jsonl's "seconds" always meant: the host
    records an event behind step s and, once it has queued step s + 1, waits for step s's event (the
    GPU is busy with step s + 1 meanwhile, so this costs it nothing) and stamps row s. That also keeps
    the host at most one step ahead of the GPU. On the CPU a step is done when its call returns."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock                     # seconds since the loss log began
        self.rows: list[list] = []             # [step, loss (float or 0-d tensor), lr, seconds or None]
        self._waiting: tuple[list, torch.cuda.Event] | None = None

    def add(self, step: int, loss: Tensor | float, lr: float) -> None:
        row = [step, loss.detach() if isinstance(loss, Tensor) else loss, lr, None]
        self.rows.append(row)
        event = None
        if isinstance(loss, Tensor) and loss.is_cuda:
            event = torch.cuda.Event()
            event.record()
        else:
            row[3] = self.clock()
        if self._waiting is not None:          # the step before this one: done when its event is
            before, its_event = self._waiting
            its_event.synchronize()
            before[3] = self.clock()
        self._waiting = (row, event) if event is not None else None

    def read(self) -> list[tuple[int, float, float, float]]:
        """(step, loss, lr, seconds) of every pending step, in order, and none pending after. One
        device-to-host copy for all the device losses (it waits for the last step to finish)."""
        rows, self.rows, self._waiting = self.rows, [], None
        on_device = [r[1] for r in rows if isinstance(r[1], Tensor)]
        values = iter(torch.stack([t.float().reshape(()) for t in on_device]).tolist() if on_device else [])
        now = self.clock()
        return [(step, next(values) if isinstance(loss, Tensor) else float(loss), lr,
                 now if seconds is None else seconds) for step, loss, lr, seconds in rows]


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step and write a final checkpoint; a
    second signal stops at once."""

    def __enter__(self):
        self.requested, self._old = None, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:          # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then writing a checkpoint (again to abort)",
              flush=True)

    def agree(self, accelerator: Accelerator) -> None:
        """Several processes: all stop after this step if any was signalled (a terminal's Ctrl-C reaches
        each, a scheduler's SIGTERM maybe one, and not always within the same step). Otherwise the
        signalled ones would write their checkpoint while the others wait in the next step's gradient
        all-reduce: the run would hang."""
        if accelerator.num_processes == 1:
            return
        mine = int(getattr(signal, self.requested)) if self.requested else 0
        signum = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).max())
        if signum and not self.requested:
            self.requested = signal.Signals(signum).name
            print(f"\n{self.requested} to another process: finishing this step, then writing a checkpoint",
                  flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class ProgressBar:
    """A tqdm bar with loss and images/s on each machine's first process; nothing elsewhere nor under
    `adapterkit -q` (train/console.py)."""

    def __init__(self, accelerator: Accelerator, start: int, total: int, desc: str):
        self.bar = bar(total=total, initial=start, desc=desc, unit="step",
                       show=accelerator.is_local_main_process)
        self.loss: float | None = None

    def __enter__(self):
        return self

    def update(self, images_per_s: float, loss: float | None = None) -> None:
        """One step more; `loss`: the latest loss read back (None: keep showing the last one)."""
        if loss is not None:
            self.loss = loss
        postfix = {"loss": f"{self.loss:.4f}"} if self.loss is not None else {}
        self.bar.set_postfix(postfix | {"img_s": f"{images_per_s:.1f}"})
        self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()
        return False



def run_plan(cfg: Any, start: int, batches_per_epoch: int, world: int, files: Sequence[Path],
             trackers: str) -> str:
    """The lines a LoRA or ControlNet run starts with, after the data report (pictures, buckets): the
    steps and the images each takes (batch x accumulation x processes), the epochs that makes, what
    is written where and when (`files`: the job's exported files), `trackers` (trackers.start_trackers'
    line), and where the files are after a stop."""
    t, out = cfg.train, Path(cfg.output.dir)
    per_step = t.batch_size * t.grad_accum * world
    epochs = t.steps * t.grad_accum * world / max(batches_per_epoch, 1)
    every, keep = cfg.output.checkpoint_every, cfg.output.keep_checkpoints
    processes = f"{world} process{'es' if world > 1 else ''}"
    resuming = f"; resuming after step {start}" if start else ""
    names = [f"{f.name}{'' if f.suffix == '.safetensors' else '/'}" for f in files] + ["loss.png"]
    checkpoints = f"every {every} steps and at the end" if every else "at the end"
    as_it_goes = ["loss.jsonl", f"checkpoints/step-N/ {checkpoints} (the newest {keep} kept)"]
    if cfg.sample.prompts:
        during = f"step-N.png every {cfg.sample.every} steps, " if cfg.sample.every else ""
        as_it_goes.append(f"samples/ ({during}final.png at the end)")
    return "\n".join([
        f"plan: {t.steps} steps of {per_step} images (batch {t.batch_size} x {t.grad_accum} accumulated x "
        f"{processes}) = {epochs:.3g} epochs of {batches_per_epoch} batches{resuming}",
        f"  at the end, in {out}/: {', '.join(names)}",
        f"  as it goes: {', '.join(as_it_goes)}",
        f"  {trackers}",
        "  a stop (Ctrl-C, SIGTERM) ends the step and writes checkpoints/step-N/ with the files in it (not "
        f"in {out}/ itself); the same command resumes from it"])
