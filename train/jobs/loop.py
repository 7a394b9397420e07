"""The machinery every training job shares: one copy, used by `lora_train`, `controlnet_train` and
`pretrain`.

A job's `main(cfg)` owns its model, its step (forward + loss), its exports and its samples; it sets
them up and hands them to `run_steps`, the one training loop. Everything around them lives here:

    make_accelerator(out)                 devices, `accelerate launch`, TensorBoard under out/
    open_base / frozen_dtype              the base model in fp32, then the U-Net's training dtype
    adapter_master_weights                bf16/fp16 compute with fp32 masters in the optimizer
    use_loss_scaling, scale_loss          an fp16 base: the loss scaled for backward (train/jobs/precision.py)
    register_state_hooks                  save_state/load_state keep only the trained tensors
    resume                                the newest complete checkpoint, refused if the run differs
    BatchPlan, noisy_batch                which images a micro-batch gets, and its noised latents
    check_finite_loss, optimizer_step     the NaN guard, then (unscale ->) clip -> step -> schedule
    save_checkpoint                       atomic, rotated (train/jobs/checkpoints.py), exports inside
    LossLog / JsonlLog, ProgressBar       what a person watches
    StopSignals                           SIGINT/SIGTERM finish the step and write a checkpoint
    run_steps                             the loop: step -> guard -> optimizer -> logs -> checkpoint
                                          -> samples, then the final export, loss plot and samples
                                          (an fp16 step that overflowed is redone at a lower loss scale)

Exact resume rests on three rules the pieces keep: the batch order is a pure function of
(seed, epoch) (BatchPlan), every random draw of step s comes from a generator seeded by
(seed, s, micro-batch, process) (BatchPlan.seed), and accelerate's checkpoint carries the optimizer,
the LR schedule, every RNG and (fp16) the loss scaler.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file
from torch import Tensor

from adapterkit.train.config import to_dict
from adapterkit.train.data.cache import LatentCache
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.jobs.checkpoints import MARKER, latest_checkpoint, read_state, write_checkpoint
from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.pipeline.base import BaseModel, load_base
from adapterkit.train.pipeline.schedule import NoiseSchedule, offset_noise

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STATE_FILE = "adapter_state.safetensors"        # the trained tensors inside a checkpoint


# --- recipe sections every job has ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    base: str                                       # local diffusers pipeline folder or single .safetensors
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # frozen U-Net; auto = bf16 on GPU, fp32 on CPU
    tokenizer: str | None = None                    # single-file checkpoints carry none
    # A single file's part configs (VAE, text encoder, scheduler, tokenizer): a diffusers pipeline
    # folder, weights not needed; None: the SD1.x configs shipped in configs/base/sd1/.
    config_dir: str | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0                      # 0 disables clipping


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 4                             # per process, per micro-batch
    grad_accum: int = 1
    seed: int = 0
    min_snr_gamma: float | None = 5.0               # Hang et al. 2023; None = plain MSE
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    # The adapter branch computes in the base's dtype with fp32 master weights in the optimizer
    # ("base", the default when the base is bf16/fp16), or in fp32 throughout ("fp32", peft's default:
    # 1.2x slower and 37% more memory at SD1.5, see README).
    adapter_compute: Literal["base", "fp32"] = "base"
    # On one CUDA device, replay each step's forward and backward from CUDA graphs (train/jobs/graphs.py):
    # the same kernels without their launch cost (1.7x the peer's ControlNet step at sd15 batch 8, where
    # the eager step is host-bound, README); off, with the reason printed, where it cannot apply.
    cuda_graphs: bool = True


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


# --- setting up -----------------------------------------------------------------------------------

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


def lr_lambda(cfg: OptimConfig, total: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def make_optimizer(cfg: OptimConfig, params: Sequence[torch.nn.Parameter], steps: int):
    """AdamW over `params` and its LR schedule (warmup, then constant / cosine / linear)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))


def adapter_master_weights(params: list[torch.nn.Parameter], base_dtype: torch.dtype,
                           compute: str) -> MasterWeights | None:
    """With a bf16/fp16 base and adapter_compute="base": the adapter tensors drop to the base dtype
    (no fp32 copies of every activation in the adapter branch) and fp32 masters go to the optimizer."""
    if compute == "fp32" or base_dtype == torch.float32:
        return None
    for p in params:
        p.data = p.data.to(base_dtype)
    return MasterWeights(params)


# The loss scaler of each job's accelerator (`use_loss_scaling`): the step that scales the loss and the
# loop that unscales the gradients find it there, whatever the job.
_LOSS_SCALERS: weakref.WeakKeyDictionary[Accelerator, LossScaler] = weakref.WeakKeyDictionary()


def use_loss_scaling(accelerator: Accelerator, base_dtype: torch.dtype) -> LossScaler | None:
    """With an fp16 base: a `LossScaler` for this job, saved in its checkpoints (call it before
    `resume`, in the same place in every run: accelerate restores custom state by registration order).

    The backward pass runs through the frozen fp16 U-Net whatever train.adapter_compute is, so its
    gradients underflow there either way. bf16 and fp32 get None and train exactly as without it."""
    if base_dtype != torch.float16:
        return None
    scaler = LossScaler()
    accelerator.register_for_checkpointing(scaler)
    _LOSS_SCALERS[accelerator] = scaler
    return scaler


def loss_scaler(accelerator: Accelerator) -> LossScaler | None:
    return _LOSS_SCALERS.get(accelerator)


def scale_loss(accelerator: Accelerator, loss: Tensor) -> Tensor:
    """The loss to backpropagate: `loss` times the loss scale, or `loss` itself without a scaler."""
    scaler = _LOSS_SCALERS.get(accelerator)
    return loss if scaler is None else scaler.scale_loss(loss)


def full_precision_state(named: dict[str, torch.nn.Parameter],
                         master: MasterWeights | None) -> dict[str, Tensor]:
    """The trained tensors by name at full precision (the fp32 masters when there are some), as
    detached views of the live tensors (copy_ into them to load)."""
    if master:
        by_id = {id(p): m for p, m in zip(master.model_params, master.params)}
        named = {n: by_id.get(id(p), p) for n, p in named.items()}
    return {n: p.detach().contiguous() for n, p in named.items()}


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


# --- the step -------------------------------------------------------------------------------------

class BatchPlan:
    """Which dataset keys micro-batch (step, micro) of process `rank` gets: global micro-batch
    n = (step * accum + micro) * world + rank walks the epochs' batch lists in order."""

    def __init__(self, dataset: CaptionedImageFolder, batch_size: int, accum: int, world: int, rank: int):
        self.sampler = dataset.batch_sampler(batch_size)
        self.per_epoch = len(self.sampler)
        self.accum, self.world, self.rank = accum, world, rank
        self._epoch, self._batches = -1, []

    def keys(self, step: int, micro: int) -> list[tuple[int, int]]:
        n = (step * self.accum + micro) * self.world + self.rank
        epoch, i = divmod(n, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.epoch_batches(epoch)
        return [(epoch, index) for index in self._batches[i]]

    def seed(self, base_seed: int, step: int, micro: int) -> int:
        return int(np.random.SeedSequence([base_seed, step, micro, self.rank]).generate_state(1)[0])


@dataclass
class MicroBatch:
    """One micro-batch, ready for the model: latents are fp32, `noisy` and `context` in `dtype`."""
    keys: list[tuple[int, int]]
    samples: list[dict]                # dataset.describe(key) of each: caption, crop, identity
    latents: Tensor                    # (B, C, h, w) clean
    context: Tensor                    # (B, L, D)
    noise: Tensor
    t: Tensor                          # (B,) int64
    noisy: Tensor


def noisy_batch(dataset: CaptionedImageFolder, plan: BatchPlan, cache: LatentCache, base: BaseModel,
                schedule: NoiseSchedule, loop: LoopConfig, step: int, micro: int, device: torch.device,
                dtype: torch.dtype) -> MicroBatch:
    """Micro-batch `micro` of `step`: latents and caption embeddings from the cache, then noise and
    timesteps, every draw from the (seed, step, micro, process) generator in a fixed order."""
    keys = plan.keys(step, micro)
    samples = [dataset.describe(k) for k in keys]
    batch = {k: [s[k] for s in samples] for k in samples[0]}
    batch["pixel_values"] = lambda keys=keys: torch.stack([dataset[k]["pixel_values"] for k in keys])
    g = torch.Generator(device).manual_seed(plan.seed(loop.seed, step, micro))
    latents = cache.latents(base, batch, dataset.cfg, generator=g, device=device).float()
    context = cache.embeddings(base, batch["caption"], device=device).to(dtype)
    noise = offset_noise(latents.shape, loop.noise_offset, g, device)
    t = schedule.sample_timesteps(len(latents), g, device)
    noisy = schedule.add_noise(latents, noise, t).to(dtype)
    return MicroBatch(keys, samples, latents, context, noise, t, noisy)


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


def optimizer_step(accelerator: Accelerator, optimizer, lr_schedule, params: Sequence[torch.nn.Parameter],
                   master: MasterWeights | None, max_grad_norm: float,
                   scaler: LossScaler | None = None) -> bool:
    """Gradients to the masters, unscale (with a scaler), clip, step, masters back into the model,
    schedule, zero_grad. Returns False when the scaled fp16 gradients overflowed: then only the scaler
    changed (backed off) and the gradients are cleared; weights, optimizer and LR schedule are as before."""
    if master:
        master.grads_to_master()
    grads = master.params if master else params
    if scaler:
        finite = scaler.unscale_(grads)
        if accelerator.num_processes > 1:       # the same decision everywhere (DDP's gradients agree anyway)
            finite = accelerator.reduce(torch.tensor(float(not finite), device=accelerator.device),
                                        reduction="sum").item() == 0
        scaler.update(finite)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return False
    clip(accelerator, grads, max_grad_norm)
    optimizer.step()
    if master:
        master.master_to_model()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def clip(accelerator: Accelerator, params, max_norm: float) -> None:
    if max_norm > 0:
        accelerator.clip_grad_norm_(params, max_norm)


# --- the loop -------------------------------------------------------------------------------------

def run_steps(accelerator: Accelerator, cfg: Any, out: Path, start: int, *,
              step: Callable[[int], float], optimizer, lr_schedule, params: Sequence[torch.nn.Parameter],
              master: MasterWeights | None, export: Callable[..., Any],
              sample: Callable[[int, Path], Any] | None, images_per_step: int, name: str, what: str,
              explain_oom: Callable[[Any, int, Path], AbstractContextManager] = out_of_memory_explained,
              after_step: Callable[[int], Any] | None = None) -> int:
    """Train from step `start` to `cfg.train.steps`; returns the last step done.

    Each step: `step(s)` (forward + backward of step s, 0-based; returns the loss averaged over the
    processes; with an fp16 base it backpropagates `scale_loss(accelerator, loss)`) inside
    `explain_oom(cfg, s, out)`, the NaN guard (`check_finite_loss`), the optimizer
    (`optimizer_step` with `params`, `master` and `cfg.optim.max_grad_norm`), `after_step(s)` if given
    (e.g. an EMA update), loss.jsonl (every
    step), the trackers (every `cfg.output.log_every` steps and the last), the progress bar
    (`images_per_step` images a step, all processes together), a checkpoint (every
    `cfg.output.checkpoint_every` steps, the last step, and on a signal; `export(folder, step)` writes
    the job's files into it).

    Samples: `sample(step, path)` (None: no samples) runs on the main process only, at every step
    s < cfg.train.steps that `cfg.sample.every` divides (to out/samples/step-<s>.png), and once at the
    end (out/samples/final.png). The last step is sampled only as final.png (not twice), and a run
    stopped by a signal writes no final samples.

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
    steps = cfg.train.steps
    scaler = loss_scaler(accelerator)
    losses = LossLog(out / "loss.jsonl", start, accelerator.is_main_process)
    done = start
    with StopSignals() as stop, ProgressBar(accelerator, start, steps, name) as bar:
        while done < steps and not stop.requested:
            t0 = time.perf_counter()
            while True:
                with explain_oom(cfg, done, out):
                    loss = step(done)
                check_finite_loss(loss, done, out)
                if optimizer_step(accelerator, optimizer, lr_schedule, params, master,
                                  cfg.optim.max_grad_norm, scaler):
                    break
                check_loss_scale(scaler, done, out)
            if after_step:
                after_step(done)
            done += 1
            lr = lr_schedule.get_last_lr()[0]
            losses.add(done, loss, lr)
            if done % cfg.output.log_every == 0 or done == steps:
                accelerator.log({"loss": loss, "lr": lr} | ({"loss_scale": scaler.scale} if scaler else {}),
                                step=done)
            bar.update(loss, images_per_step / (time.perf_counter() - t0))
            stop.agree(accelerator)
            every = cfg.output.checkpoint_every
            if (every and done % every == 0) or stop.requested or done == steps:
                save_checkpoint(accelerator, out, done, cfg, export)
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


# --- outputs --------------------------------------------------------------------------------------

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


PRIVATE_PATHS = ("data.root", "model.base", "model.tokenizer", "model.config_dir", "output.dir")


def public_recipe(cfg: Any, paths: Sequence[str] = PRIVATE_PATHS) -> dict:
    """The recipe as a dict for a shared file's metadata: each dotted key in `paths` cut to its last
    path component (nothing personal: no full path)."""
    recipe = to_dict(cfg)
    for dotted in paths:
        *parents, key = dotted.split(".")
        d = recipe
        for p in parents:
            d = d.get(p) or {}
        if d.get(key) is not None:
            d[key] = Path(str(d[key])).name
    return recipe


def decode(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (pixel-space models unfold their samples: `BaseModel.pixel_patch`)."""
    if base.vae is None:
        return torch.nn.functional.pixel_shuffle(latents, base.pixel_patch).clamp(-1, 1)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    z = latents / base.vae.config.scaling_factor + shift
    return base.vae.decode(z.to(base.vae.dtype)).sample.float().clamp(-1, 1)


class JsonlLog:
    """A JSON-lines file of rows keyed by "step", truncated to the resume step so a resumed run has
    one history. Only the main process (`active`) writes."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active = path, active
        self.rows = []
        if active and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start]
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        if self.active:
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class LossLog(JsonlLog):
    """loss.jsonl: one line per step; "seconds" is the wall time since this process began logging
    (a resumed run starts again from 0), for speed and time-to-loss plots."""

    def __init__(self, path: Path, start: int, active: bool):
        super().__init__(path, start, active)
        self.t0 = time.perf_counter()

    def add(self, step: int, loss: float, lr: float) -> None:
        self.write({"step": step, "loss": loss, "lr": lr, "seconds": round(time.perf_counter() - self.t0, 3)})

    def plot(self, path: Path) -> None:
        from adapterkit.train.images import loss_curve_png
        if self.rows:
            loss_curve_png([r["step"] for r in self.rows], [r["loss"] for r in self.rows], path,
                           title="training loss")


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
    """A tqdm bar with loss and images/s on the main process; nothing elsewhere."""

    def __init__(self, accelerator: Accelerator, start: int, total: int, desc: str):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=start, disable=not accelerator.is_local_main_process,
                        desc=desc, dynamic_ncols=True)

    def __enter__(self):
        return self

    def update(self, loss: float, images_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
        self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()
        return False


def flat_dict(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b": value}; non-scalars as strings (TensorBoard's hparams take scalars and
    strings only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat_dict(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
