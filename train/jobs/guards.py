"""What stops a run, and the messages that say why: a NaN loss, fp16 overflow past the loss scale's
floor, device memory, a signal, an output folder that cannot be written."""
from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from adapterkit.train.jobs.checkpoints import latest_checkpoint
from adapterkit.train.jobs.precision import LossScaler


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the checkpoints on disk are the last good state."""
    user_facing = True


class TrainingOutOfMemory(RuntimeError):
    """A step did not fit in device memory; the checkpoints on disk are the last good state."""
    user_facing = True


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after a final checkpoint; exit status 128 + the signal number."""
    user_facing = True

    def __init__(self, signal_name: str, step: int, what: str):
        self.exit_code = 128 + int(getattr(signal, signal_name))
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint and {what} files written. "
                         "Run the same command again to resume.")


def check_writable(out: Path) -> None:
    """Fail before any model is loaded when the output folder cannot be written (reliability C10)."""
    probe = out / f".write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output.dir {out} is not writable ({e.strerror or e}); choose another "
                         "output.dir") from None


@contextmanager
def out_of_memory_explained(cfg: Any, step: int, out: Path):
    """Turn a device OOM in a step into a message with the sizes to change (reliability C5), naming
    only the settings the recipe has (the pretrain recipe has no resolution or accumulation)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        resolution = getattr(cfg.data, "resolution", None)
        remedies = ["lower train.batch_size" + (" (raise train.grad_accum to keep the effective batch)"
                                                if hasattr(cfg.train, "grad_accum") else "")]
        if hasattr(cfg.train, "gradient_checkpointing"):
            remedies.append("set train.gradient_checkpointing=true")
        if resolution is not None:
            remedies.append("lower data.resolution")
        raise TrainingOutOfMemory(
            f"out of device memory at step {step + 1} with batch_size={cfg.train.batch_size}"
            + (f" at resolution {resolution}" if resolution is not None else "")
            + f" ({str(e).splitlines()[0][:160]}). " + ", ".join(remedies).capitalize()
            + f". Last good checkpoint: {latest_checkpoint(out / 'checkpoints') or 'none yet'}.") from None


def check_finite_loss(loss: float, step: int, out: Path) -> None:
    """The NaN guard: stop before the optimizer sees the step; nothing is saved."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the loss became {loss} at step {step + 1}; stopped without saving. The last good "
            f"checkpoint is {latest_checkpoint(out / 'checkpoints') or 'none (no checkpoint yet)'}."
            " Lower optim.lr, keep max_grad_norm on, or use bf16 instead of fp16.")


def check_loss_scale(scaler: LossScaler, step: int, out: Path) -> None:
    """After an fp16 overflow: stop when the loss scale has backed off below its floor (the gradients
    overflow fp16 unscaled: the model is diverging, not the scale mistuned)."""
    if scaler.too_small:
        raise TrainingDiverged(
            f"the fp16 gradients of step {step + 1} overflow (inf/NaN) even with the loss scale backed off "
            f"to {scaler.scale:g}; stopped without saving. The last good checkpoint is "
            f"{latest_checkpoint(out / 'checkpoints') or 'none (no checkpoint yet)'}. Lower optim.lr, keep "
            "max_grad_norm on, or use bf16 instead of fp16.")

