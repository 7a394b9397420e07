"""The one training loop every job runs (`run_steps`), and the set-up every job does first.

A job's `main(cfg)` (train/jobs/lora.py, controlnet.py, pretrain.py) owns its model, its step
(forward + loss), its exports and its samples; it sets them up and hands them to `run_steps`. The
pieces around them each have their module in train/jobs/:

    recipe.py       the model/optim/train recipe sections; the recipe as shared files record it
    batches.py      BatchPlan, noisy_batch: which pictures a micro-batch gets, and their noised latents
    optimizer.py    AdamW/8-bit AdamW/Prodigy/Adafactor + LR schedule, fp32 masters for a bf16/fp16
                    adapter, the fp16 loss scale,
                    optimizer_step: (unscale ->) clip -> step -> schedule
    guards.py       the NaN guard, the loss scale's floor, device OOM, signals: what stops a run and why
    checkpoints.py  atomic checksummed rotated checkpoints, resume from the newest intact one
    state.py        what a checkpoint holds, in safetensors and JSON (never a pickle)
    lock.py         one run per output folder
    progress.py     loss.jsonl, the progress bar, SIGINT/SIGTERM, the plan a run starts with
    trackers.py     TensorBoard / W&B (output.trackers): the loss, the recipe and the sample grids
    precision.py, graphs.py, ema.py   master weights and loss scaling, CUDA graphs, EMA
    validation.py   the validation loss on held-out pictures, early stop (run_steps' `stop_early`)

Here: make_accelerator (devices, `accelerate launch`, the trackers of output.trackers, logging), open_base /
load_frozen_base (the base in fp32, then the U-Net in its training dtype, frozen) and run_steps.

Exact resume rests on three rules the pieces keep: the batch order is a pure function of
(seed, epoch) (BatchPlan), every random draw of step s comes from a generator seeded by
(seed, s, micro-batch, process) (BatchPlan.seed), and the checkpoint carries the optimizer,
the LR schedule, every RNG and (fp16) the loss scaler.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn

from adapterkit.adapters.adapter import Adapter
from adapterkit.train.console import configure_logging
from adapterkit.train.jobs.checkpoints import save_checkpoint
from adapterkit.train.jobs.guards import (
    TrainingInterrupted,
    check_finite_loss,
    check_loss_scale,
    check_writable,
    out_of_memory_explained,
)
from adapterkit.train.jobs.optimizer import (
    adapter_master_weights,
    full_precision_state,
    make_optimizer,
    optimizer_step,
    use_loss_scaling,
)
from adapterkit.train.jobs.precision import check_outside_precision
from adapterkit.train.jobs.progress import LossLog, PendingSteps, ProgressBar, StopSignals
from adapterkit.train.jobs.recipe import DTYPES, ModelConfig
from adapterkit.train.jobs.state import TrainingState
from adapterkit.train.jobs.trackers import check_kept, log_grid, log_with
from adapterkit.train.pipeline.base import BaseModel, load_base


def make_accelerator(out: Path, cfg: Any = None, job: str = "adapterkit") -> Accelerator:
    """The run's Accelerator. Its mixed_precision is always "no": the precision is the recipe's
    (precision.settle_precision), and an outside request `cfg` does not follow is refused here. Its
    trackers are `cfg.output.trackers` (train/jobs/trackers.py; started by `start_trackers`; `job`
    names the W&B project). Logging is configured here (train/console.py): INFO records and bars on
    each machine's first process, warnings only on the others."""
    check_writable(out)
    if cfg is not None:
        check_outside_precision(cfg)
    trackers = cfg.output.trackers if cfg is not None else ("tensorboard",)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),      # CPU processes of `accelerate launch --multi_gpu`: gloo
        mixed_precision="no",                   # not ACCELERATE_MIXED_PRECISION: the recipe decides
        gradient_accumulation_steps=1,          # accumulation is explicit in each job's step (exact resume)
        log_with=log_with(trackers, job, out) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)))
    check_kept(accelerator, trackers)
    configure_logging(None if accelerator.is_local_main_process else logging.WARNING)
    return accelerator


def open_base(cfg: ModelConfig, device: torch.device) -> BaseModel:
    """The base in fp32 (VAE and text encoder stay fp32: they only fill the cache)."""
    return load_base(cfg.base, dtype=torch.float32, device=device, allow_pickle=cfg.allow_pickle,
                     tokenizer=cfg.tokenizer, prediction_type=cfg.prediction_type, config_dir=cfg.config_dir)


def frozen_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    return DTYPES[cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")]


def load_frozen_base(cfg: ModelConfig, device: torch.device) -> tuple[BaseModel, str]:
    """The base (`open_base`), the U-Net then cast to its training dtype and frozen. Returns the base
    and the U-Net fingerprint taken before the cast, which is what the adapter file records (a bf16
    copy would fingerprint differently)."""
    base = open_base(cfg, device)
    base.unet.to(frozen_dtype(cfg, device))
    base.unet.requires_grad_(False)
    return base, base.fingerprint.unet


@dataclass
class Training:
    """The optimizer side of a run, built alike for every job (`prepare_training`): `model` is the
    adapter's module as the accelerator prepared it (wrapped by DDP under several processes), `params`
    its trained parameters, `state` the optimizer, LR schedule, fp32 masters and fp16 loss scaler, as a
    checkpoint holds them (train/jobs/state.py)."""
    model: nn.Module
    params: list[nn.Parameter]
    state: TrainingState


def prepare_training(accelerator: Accelerator, cfg: Any, adapter: Adapter, dtype: torch.dtype,
                     lr_of: Callable[[str], float | None] | None = None) -> Training:
    """`adapter`'s trainable tensors to the optimizer (through fp32 masters with a bf16/fp16 adapter
    branch, `train.adapter_compute`), its module to the accelerator, and the state a checkpoint keeps:
    the adapter's tensors (`adapter.state()`, frozen parts too), at full precision.

    lr_of: a learning rate per trainable tensor name (None: the recipe's optim.lr), e.g. the text
    encoders' LoRA (train/jobs/text_encoder.py): the optimizer then gets one parameter group per rate."""
    named = adapter.trainable()
    params = list(named.values())
    master = adapter_master_weights(params, dtype, cfg.train.adapter_compute)
    trained = master.params if master else params
    groups = lr_groups(list(named), trained, lr_of) if lr_of else trained
    optimizer, lr_schedule = make_optimizer(cfg.optim, groups, cfg.train.steps)
    model, optimizer = accelerator.prepare(adapter.module, optimizer)
    kept = adapter.state()
    state = TrainingState(accelerator, lambda: full_precision_state(kept, master), optimizer, lr_schedule,
                          master, use_loss_scaling(dtype), what=adapter.what)
    return Training(model, params, state)


def lr_groups(names: list[str], params: list[nn.Parameter],
              lr_of: Callable[[str], float | None]) -> list[dict]:
    """Optimizer parameter groups by learning rate, in the order the rates first appear (the recipe's
    own rate, None, is the group without an "lr" of its own)."""
    groups: dict[float | None, list[nn.Parameter]] = {}
    for name, p in zip(names, params, strict=True):
        groups.setdefault(lr_of(name), []).append(p)
    return [{"params": ps} | ({} if lr is None else {"lr": lr}) for lr, ps in groups.items()]


# Losses are read back from the device at the log, checkpoint and sample steps, and at least this often
# (the NaN guard's longest wait; log_every 0 logs the last step only).
READ_EVERY = 100


def read_back(pending: PendingSteps, losses: LossLog, out: Path) -> float:
    """The pending steps' losses into loss.jsonl, in order; the NaN guard on each (`check_finite_loss`
    names the first non-finite step: the rows before it are written, it and those after are not).
    Returns the last loss."""
    for step, loss, lr, seconds in pending.read():
        check_finite_loss(loss, step - 1, out)
        losses.add(step, loss, lr, seconds)
    return loss


def run_steps(accelerator: Accelerator, cfg: Any, out: Path, start: int, *,
              step: Callable[[int], float], training: Training, export: Callable[..., Any],
              sample: Callable[[int, Path], Any] | None,
              images_per_step: int, name: str, what: str,
              explain_oom: Callable[[Any, int, Path], AbstractContextManager] = out_of_memory_explained,
              after_step: Callable[[int], Any] | None = None,
              stop_early: Callable[[int], bool] | None = None) -> int:
    """Train from step `start` to `cfg.train.steps`; returns the last step done.

    Each step: `step(s)` (forward + backward of step s, 0-based; returns the loss averaged over the
    processes, as a device tensor or a float; with an fp16 base it backpropagates
    `scale_loss(scaler, loss)`) inside `explain_oom(cfg, s, out)`, the optimizer (`optimizer_step`
    with `training`'s parameters, masters, loss scaler and `cfg.optim.max_grad_norm`), `after_step(s)`
    if given (e.g. an EMA update), loss.jsonl (a row per step), the trackers (every
    `cfg.output.log_every` steps and the last; 0: the last only), the progress bar
    (`images_per_step` images a step, all processes together), a checkpoint (every
    `cfg.output.checkpoint_every` steps, the last step, and on a signal: `training.state` (the job's
    resumable state, train/jobs/state.py), and `export(folder, step)` writes the job's files into it).

    Samples: `sample(step, path)` (None: no samples) runs on the main process only, at every step
    s < cfg.train.steps that `cfg.sample.every` divides (to out/samples/step-<s>.png), and once at the
    end (out/samples/final.png). The last step is sampled only as final.png (not twice), and a run
    stopped by a signal writes no final samples. Each grid also goes to the trackers ("samples" at
    its step, `log_grid`).

    The host never waits for the GPU within a step (train/jobs/progress.py PendingSteps): the losses
    stay on the device until a log, checkpoint or sample step, or READ_EVERY steps, whichever comes
    first; then one copy reads them all, loss.jsonl gets their rows and the NaN guard
    (`check_finite_loss`) looks at each in order. A NaN stops the run at that read, naming the first
    non-finite step, before any checkpoint or sample could hold its weights: the steps after it ran
    on a diverged model, and nothing of theirs is saved. (With an fp16 base each attempt's loss is
    checked at once, before the optimizer: its overflow test reads the gradients every step anyway.)

    `stop_early(done)`, if given, is asked before each step and once after the last (e.g. the
    validation loss, train/jobs/validation.py); True ends the run there as if it had reached its last
    step (export, plot, final samples).

    At the end (main process, not after a signal): `export(out)`, out/loss.png, the final samples.
    SIGINT/SIGTERM (`StopSignals`) finish the current step, write a checkpoint and raise
    `TrainingInterrupted` naming `what`; a second signal stops at once. `name` labels the progress bar.

    fp16 overflow (`use_loss_scaling`): a step whose scaled gradients hold an inf/NaN changes nothing but
    the loss scale (halved), and step s is run again, the same batch and noise (they depend on s only),
    until it fits; then it counts. So train.steps counts updates, no batch is dropped, the LR schedule
    and EMA advance once per update, and the step-onset gradient checks (the LoRA's B then A, the
    ControlNet's zero convs then the encoder) still see update n at step n. A retry costs one more
    forward and backward; after the first steps' calibration they come every ~growth_interval steps.
    """
    steps, state = cfg.train.steps, training.state
    optimizer, lr_schedule, master, scaler = state.optimizer, state.lr_schedule, state.master, state.scaler
    losses = LossLog(out / "loss.jsonl", start, accelerator.is_main_process)
    pending = PendingSteps(lambda: time.perf_counter() - losses.t0)
    every_log, every_sample = cfg.output.log_every, cfg.sample.every if sample else 0
    done = start
    with StopSignals() as stop, ProgressBar(accelerator, start, steps, name) as bar:
        while not stop.requested and not (stop_early and stop_early(done)) and done < steps:
            t0 = time.perf_counter()
            while True:
                with explain_oom(cfg, done, out):
                    loss = step(done)
                if scaler:                      # fp16: the overflow test reads the gradients anyway
                    check_finite_loss(float(loss), done, out)
                if optimizer_step(accelerator, optimizer, lr_schedule, training.params, master,
                                  cfg.optim.max_grad_norm, scaler):
                    break
                check_loss_scale(scaler, done, out)
            if after_step:
                after_step(done)
            done += 1
            lr = lr_schedule.get_last_lr()[0]
            pending.add(done, loss, lr)
            stop.agree(accelerator)
            logs = (every_log and done % every_log == 0) or done == steps
            checkpoint = (cfg.output.checkpoint_every and done % cfg.output.checkpoint_every == 0) \
                or stop.requested or done == steps
            samples = every_sample and done % every_sample == 0 and done < steps
            read = None
            if logs or checkpoint or samples or done % READ_EVERY == 0:
                read = read_back(pending, losses, out)
                if logs:
                    scale = {"loss_scale": scaler.scale} if scaler else {}
                    accelerator.log({"loss": read, "lr": lr} | scale, step=done)
            bar.update(images_per_step / (time.perf_counter() - t0), read)
            if checkpoint:
                save_checkpoint(state, out, done, cfg, export)
            if samples and accelerator.is_main_process:
                sample(done, out / "samples" / f"step-{done:06d}.png")
                log_grid(accelerator, out / "samples" / f"step-{done:06d}.png", done)
    if not stop.requested and accelerator.is_main_process:
        export(out)
        losses.plot(out / "loss.png")
        if sample:
            sample(done, out / "samples" / "final.png")
            log_grid(accelerator, out / "samples" / "final.png", done)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop.requested:
        raise TrainingInterrupted(stop.requested, done, what)
    return done

