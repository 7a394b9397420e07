"""The validation loss: the adapter's loss on held-out pictures (`data.validation`, train/data/split.py)
at fixed timesteps with fixed noise, every `validation.every` steps, and an optional early stop.

The training loss of a diffusion model swings with each batch's random timesteps and noise far more
than it moves with training; the validation loss draws neither: each picture is noised at the same
timesteps (`validation.timesteps`) with the same noise and the same latent draw (a generator seeded by
(validation.seed, picture)) at every evaluation, with the training's loss weighting (min-SNR,
debiased), in eval mode (no dropout). Identical weights give the identical number, so the curve shows
the adapter alone. It is written to validation.jsonl ({"step", "val_loss"}), to the trackers as
`val_loss`, and drawn to validation.png.

Evaluations run at step 0 (the base with the adapter at its start), every `every` steps and at the
last step (`every: 0`: the last step only). With `patience` > 0 the run stops after that many
evaluations in a row without a new best (lower than the best by more than `min_delta`); the files are
exported as at a normal end, and the message names the best step. The early-stop state is the
validation log itself: a resumed run rebuilds it from the rows before its step and repeats the
evaluation at its step (deterministic, so the same value), hence stops where the uninterrupted run did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from adapterkit.train.data.cache import LatentCache
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.jobs.batches import picture_conditioning
from adapterkit.train.jobs.progress import JsonlLog
from adapterkit.train.jobs.recipe import LoopConfig
from adapterkit.train.pipeline.base import BaseModel
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss
from adapterkit.unet import Conditioning

LOG_FILE, PLOT_FILE = "validation.jsonl", "validation.png"


@dataclass(frozen=True)
class ValidationConfig:
    """The `validation:` section: when and how the held-out pictures of `data.validation` are scored."""
    every: int = 0                                          # steps; 0 = the last step only (and step 0)
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)  # each picture at each of these, fixed noise
    seed: int = 0                                           # the fixed noise and latent draws
    patience: int = 0                                       # stop after N evaluations without a new best
    min_delta: float = 0.0                                  # what counts as a new best

    def __post_init__(self):
        if not self.timesteps:
            raise ValueError("timesteps must name at least one timestep")


@dataclass
class EarlyStop:
    """The best validation loss so far, its step, and the evaluations since (rebuilt from the log)."""
    patience: int
    min_delta: float
    best: float = float("inf")
    best_step: int = -1
    since: int = 0

    def add(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when the run should stop."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        return self.patience > 0 and self.since >= self.patience


class Validator:
    """`validator(step)` before each step (run_steps' `stop_early`): scores the held-out pictures when
    `step` is due, logs the value, and returns whether to stop early. Every process computes the same
    number (no collective needed: the draws are fixed); the main process writes it."""

    def __init__(self, cfg: ValidationConfig, loop: LoopConfig, dataset: CaptionedImageFolder,
                 cache: LatentCache, base: BaseModel, schedule: NoiseSchedule, accelerator: Accelerator,
                 out: Path, start: int, steps: int):
        bad = [t for t in cfg.timesteps if not 0 <= t < schedule.num_train_timesteps]
        if bad:
            raise ValueError(f"validation.timesteps {bad} are outside the schedule's 0.."
                             f"{schedule.num_train_timesteps - 1}")
        self.cfg, self.loop, self.dataset, self.cache, self.base = cfg, loop, dataset, cache, base
        self.schedule, self.accelerator, self.out, self.steps = schedule, accelerator, out, steps
        # rows before `start` are kept; the one at `start` is evaluated again
        self.log = JsonlLog(out / LOG_FILE, start - 1, accelerator.is_main_process)
        self.early = EarlyStop(cfg.patience, cfg.min_delta)
        for row in self.log.rows:
            self.early.add(row["step"], row["val_loss"])
        self.stopped_at: int | None = None

    def due(self, step: int) -> bool:
        return step == self.steps or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def __call__(self, step: int) -> bool:
        if not self.due(step):
            return False
        value = self.loss()
        self.log.write({"step": step, "val_loss": value})
        if self.accelerator.is_main_process:
            self.accelerator.log({"val_loss": value}, step=step)
            self.plot()
        stop = self.early.add(step, value) and step < self.steps
        if stop:
            self.stopped_at = step
            if self.accelerator.is_main_process:
                print(f"\nearly stop at step {step}: the validation loss has not improved for "
                      f"{self.cfg.patience} evaluations (best {self.early.best:.6g} at step "
                      f"{self.early.best_step})", flush=True)
        return stop

    @torch.no_grad()
    def loss(self) -> float:
        """The mean over the held-out pictures of each one's loss at the fixed timesteps."""
        unet, device = self.base.unet, self.accelerator.device
        dtype = unet.conv_in.weight.dtype
        was_training = unet.training
        unet.eval()
        t = torch.tensor(self.cfg.timesteps, dtype=torch.int64, device=device)
        total = 0.0
        try:
            for index in range(len(self.dataset)):        # one picture a call: pictures differ in bucket
                sample = self.dataset.describe(index)
                batch = {k: [v] for k, v in sample.items()}
                batch["pixel_values"] = lambda i=index: self.dataset[i]["pixel_values"][None]
                g = torch.Generator(device).manual_seed(self.seed(index))
                latents = self.cache.latents(self.base, batch, self.dataset.cfg, generator=g,
                                             device=device).float()
                x0 = latents.expand(len(t), *latents.shape[1:])                      # (n_t, C, h, w)
                noise = torch.randn(x0.shape, generator=g, device=device)
                text = self.cache.text(self.base, batch["caption"], device=device)
                cond = picture_conditioning(self.base, text, [sample])
                cond = Conditioning.cat([cond] * len(t)).to(dtype)
                pred = unet(self.schedule.add_noise(x0, noise, t).to(dtype), t, cond)
                total += diffusion_loss(pred, x0, noise, t, self.schedule, self.loop.min_snr_gamma,
                                        self.loop.debiased_estimation).item()
        finally:
            unet.train(was_training)
        return total / len(self.dataset)

    def seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, 4, index]).generate_state(1)[0])

    def plot(self) -> None:
        from adapterkit.train.images import loss_curve_png
        rows = self.log.rows
        if len(rows) > 1:
            loss_curve_png([r["step"] for r in rows], [r["val_loss"] for r in rows], self.out / PLOT_FILE,
                           smooth=1, title="validation loss (fixed timesteps and noise)")
