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
    progress.py     loss.jsonl, the progress bar, SIGINT/SIGTERM
    precision.py, graphs.py, ema.py   master weights and loss scaling, CUDA graphs, EMA
    validation.py   the validation loss on held-out pictures, early stop (run_steps' `stop_early`)

Here: make_accelerator (devices, `accelerate launch`, TensorBoard under out/), open_base /
load_frozen_base (the base in fp32, then the U-Net in its training dtype, frozen) and run_steps.

Exact resume rests on three rules the pieces keep: the batch order is a pure function of
(seed, epoch) (BatchPlan), every random draw of step s comes from a generator seeded by
(seed, s, micro-batch, process) (BatchPlan.seed), and the checkpoint carries the optimizer,
the LR schedule, every RNG and (fp16) the loss scaler.
"""
from __future__ import annotations

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
from adapterkit.train.jobs.progress import LossLog, ProgressBar, StopSignals
from adapterkit.train.jobs.recipe import DTYPES, ModelConfig
from adapterkit.train.jobs.state import TrainingState
from adapterkit.train.pipeline.base import BaseModel, load_base


def make_accelerator(out: Path) -> Accelerator:
    check_writable(out)
    return Accelerator(
        cpu=not torch.cuda.is_available(),      # CPU processes of `accelerate launch --multi_gpu`: gloo
        gradient_accumulation_steps=1,          # accumulation is explicit in each job's step (exact resume)
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)))


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


def prepare_training(accelerator: Accelerator, cfg: Any, adapter: Adapter, dtype: torch.dtype) -> Training:
    """`adapter`'s trainable tensors to the optimizer (through fp32 masters with a bf16/fp16 adapter
    branch, `train.adapter_compute`), its module to the accelerator, and the state a checkpoint keeps:
    the adapter's tensors (`adapter.state()`, frozen parts too), at full precision."""
    params = list(adapter.trainable().values())
    master = adapter_master_weights(params, dtype, cfg.train.adapter_compute)
    optimizer, lr_schedule = make_optimizer(cfg.optim, master.params if master else params, cfg.train.steps)
    model, optimizer = accelerator.prepare(adapter.module, optimizer)
    kept = adapter.state()
    state = TrainingState(accelerator, lambda: full_precision_state(kept, master), optimizer, lr_schedule,
                          master, use_loss_scaling(dtype), what=adapter.what)
    return Training(model, params, state)


def run_steps(accelerator: Accelerator, cfg: Any, out: Path, start: int, *,
              step: Callable[[int], float], training: Training, export: Callable[..., Any],
              sample: Callable[[int, Path], Any] | None,
              images_per_step: int, name: str, what: str,
              explain_oom: Callable[[Any, int, Path], AbstractContextManager] = out_of_memory_explained,
              after_step: Callable[[int], Any] | None = None,
              stop_early: Callable[[int], bool] | None = None) -> int:
    """Train from step `start` to `cfg.train.steps`; returns the last step done.

    Each step: `step(s)` (forward + backward of step s, 0-based; returns the loss averaged over the
    processes; with an fp16 base it backpropagates `scale_loss(scaler, loss)`) inside
    `explain_oom(cfg, s, out)`, the NaN guard (`check_finite_loss`), the optimizer
    (`optimizer_step` with `training`'s parameters, masters, loss scaler and `cfg.optim.max_grad_norm`),
    `after_step(s)` if given
    (e.g. an EMA update), loss.jsonl (every
    step), the trackers (every `cfg.output.log_every` steps and the last; 0: the last only), the
    progress bar
    (`images_per_step` images a step, all processes together), a checkpoint (every
    `cfg.output.checkpoint_every` steps, the last step, and on a signal: `training.state` (the job's
    resumable state, train/jobs/state.py), and `export(folder, step)` writes the job's files into it).

    Samples: `sample(step, path)` (None: no samples) runs on the main process only, at every step
    s < cfg.train.steps that `cfg.sample.every` divides (to out/samples/step-<s>.png), and once at the
    end (out/samples/final.png). The last step is sampled only as final.png (not twice), and a run
    stopped by a signal writes no final samples.

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
    done = start
    with StopSignals() as stop, ProgressBar(accelerator, start, steps, name) as bar:
        while not stop.requested and not (stop_early and stop_early(done)) and done < steps:
            t0 = time.perf_counter()
            while True:
                with explain_oom(cfg, done, out):
                    loss = step(done)
                check_finite_loss(loss, done, out)
                if optimizer_step(accelerator, optimizer, lr_schedule, training.params, master,
                                  cfg.optim.max_grad_norm, scaler):
                    break
                check_loss_scale(scaler, done, out)
            if after_step:
                after_step(done)
            done += 1
            lr = lr_schedule.get_last_lr()[0]
            losses.add(done, loss, lr)
            if (cfg.output.log_every and done % cfg.output.log_every == 0) or done == steps:
                accelerator.log({"loss": loss, "lr": lr} | ({"loss_scale": scaler.scale} if scaler else {}),
                                step=done)
            bar.update(loss, images_per_step / (time.perf_counter() - t0))
            stop.agree(accelerator)
            every = cfg.output.checkpoint_every
            if (every and done % every == 0) or stop.requested or done == steps:
                save_checkpoint(state, out, done, cfg, export)
            if (sample and cfg.sample.every and done % cfg.sample.every == 0 and done < steps
                    and accelerator.is_main_process):
                sample(done, out / "samples" / f"step-{done:06d}.png")
    if not stop.requested and accelerator.is_main_process:
        export(out)
        losses.plot(out / "loss.png")
        if sample:
            sample(done, out / "samples" / "final.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop.requested:
        raise TrainingInterrupted(stop.requested, done, what)
    return done

