"""`adapterkit train lora CONFIG`: train a style LoRA on a folder of captioned images.

    main(cfg) = load the base -> scan the folder -> cache latents and captions -> inject the LoRA
                -> (resume) -> loop: step, guard, log, checkpoint, sample -> export the adapter files

The loop trains only the adapter: the base U-Net is frozen (bf16 on a GPU, fp32 on a CPU) and its
LoRA weights, gradients and Adam state are fp32. Every random draw of step s (noise, timesteps,
latent sample) comes from a generator seeded by (seed, s, micro-batch, process), and the batch order
is a pure function of (seed, epoch), so a resumed run repeats the uninterrupted one exactly.
Accelerate places the model, wraps it for several processes (`accelerate launch`), saves the
optimizer/scheduler/RNG state and writes TensorBoard logs.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file

from adapters.lora import LoraSpec, add_lora, set_lora_weights
from adapters.lora_files import save_lora
from train.base import BaseModel, encode_prompts, load_base
from train.cache import LatentCache
from train.checkpoints import latest_checkpoint, read_state, write_checkpoint
from train.config import to_dict
from train.data import CaptionedImageFolder, DataConfig
from train.precision import MasterWeights
from train.sampling import ddim_sample, euler_sample
from train.schedule import NoiseSchedule, diffusion_loss, offset_noise

logger = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- the recipe --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    base: str                                       # local diffusers pipeline folder or single .safetensors
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # frozen U-Net; auto = bf16 on GPU, fp32 on CPU
    tokenizer: str | None = None                    # single-file checkpoints carry none
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Literal["attn", "attn-ff", "full"] = "attn-ff"
    conv_rank: int | None = None
    conv_alpha: float | None = None


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


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "out/lora"
    name: str = "lora"                              # file stem of the exported adapter
    formats: tuple[Literal["kohya", "peft"], ...] = ("kohya", "peft")
    checkpoint_every: int = 250                     # 0 = only at the end (and on a signal)
    keep_checkpoints: int = 3
    log_every: int = 10


@dataclass(frozen=True)
class SampleConfig:
    every: int = 0                                  # 0 = only at the end
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    lora_scales: tuple[float, ...] = (0.0, 1.0)     # the grid's columns: without and with the LoRA
    steps: int = 20
    guidance: float = 7.5
    sampler: Literal["ddim", "euler"] = "ddim"


@dataclass(frozen=True)
class LoraRecipe:
    model: ModelConfig
    data: DataConfig
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the checkpoints on disk are the last good state."""
    user_facing = True


# --- the job -----------------------------------------------------------------------------------------

def main(cfg: LoraRecipe) -> Path:
    """Train the LoRA described by `cfg`; returns the output folder. Resumes from its last checkpoint."""
    out = Path(cfg.output.dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),      # CPU processes of `accelerate launch --multi_gpu`: gloo
        gradient_accumulation_steps=1,          # accumulation is explicit below (exact resume)
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)))
    base, fingerprint = load_frozen_base(cfg.model, accelerator.device)
    dataset = CaptionedImageFolder.scan(cfg.data)
    if accelerator.is_main_process:
        print(dataset.summary(), flush=True)
    cache = LatentCache(out / "cache", base.fingerprint)
    if accelerator.is_main_process:
        cache.build(dataset, base)
    accelerator.wait_for_everyone()

    unet = base.unet
    set_seed(cfg.train.seed)                 # the LoRA's random A init: the same in every run
    add_lora(unet, LoraSpec(**to_dict(cfg.lora)))
    unet.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    master = adapter_master_weights(params, unet.conv_in.weight.dtype, cfg.train.adapter_compute)
    optimizer = torch.optim.AdamW(master.params if master else params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    model, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    register_adapter_state_hooks(accelerator, unet, master)

    start = resume(accelerator, out, cfg)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    plan = BatchPlan(dataset, cfg.train.batch_size, cfg.train.grad_accum,
                     accelerator.num_processes, accelerator.process_index)
    if accelerator.is_main_process:
        accelerator.init_trackers("lora", config=_flat(to_dict(cfg)))
    losses = LossLog(out / "loss.jsonl", start, accelerator.is_main_process)
    export = Exporter(cfg, unet, fingerprint, master)

    step = start
    with StopSignals() as stop, _progress(accelerator, start, cfg.train.steps) as bar:
        while step < cfg.train.steps and not stop.requested:
            t0 = time.perf_counter()
            loss = train_step(cfg, accelerator, model, base, cache, dataset, plan, schedule, step, params)
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at step {step + 1}; stopped without saving. The last good "
                    f"checkpoint is {latest_checkpoint(out / 'checkpoints') or 'none (no checkpoint yet)'}."
                    " Lower optim.lr, keep max_grad_norm on, or use bf16 instead of fp16.")
            if master:
                master.grads_to_master()
            clip(accelerator, master.params if master else params, cfg.optim.max_grad_norm)
            optimizer.step()
            if master:
                master.master_to_model()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.add(step, loss, lr_schedule.get_last_lr()[0])
            if step % cfg.output.log_every == 0 or step == cfg.train.steps:
                accelerator.log({"loss": loss, "lr": lr_schedule.get_last_lr()[0]}, step=step)
            bar.update(loss, cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
                       / (time.perf_counter() - t0))
            every = cfg.output.checkpoint_every
            if (every and step % every == 0) or stop.requested or step == cfg.train.steps:
                save_checkpoint(accelerator, out, step, cfg, export)
            if cfg.sample.prompts and cfg.sample.every and step % cfg.sample.every == 0:
                sample_grid(cfg, accelerator, unet, base, out / "samples" / f"step-{step:06d}.png")
    if stop.requested:
        print(f"stopped by {stop.requested} at step {step}; checkpoint and adapter files written. Run the "
              "same command again to resume.", flush=True)
    elif accelerator.is_main_process:
        export(out)
        if cfg.sample.prompts:
            sample_grid(cfg, accelerator, unet, base, out / "samples" / "final.png")
        losses.plot(out / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# --- the pieces, in the order main uses them ---------------------------------------------------------

def load_frozen_base(cfg: ModelConfig, device: torch.device) -> tuple[BaseModel, str]:
    """The base in fp32 (VAE and text encoder stay fp32: they only fill the cache), the U-Net then
    cast to its training dtype. Returns the base and the U-Net fingerprint taken before the cast,
    which is what the adapter file records (a bf16 copy would fingerprint differently)."""
    base = load_base(cfg.base, dtype=torch.float32, device=device, allow_pickle=cfg.allow_pickle,
                     tokenizer=cfg.tokenizer, prediction_type=cfg.prediction_type)
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    base.unet.to(DTYPES[name])
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


def adapter_master_weights(params: list[torch.nn.Parameter], base_dtype: torch.dtype,
                           compute: str) -> MasterWeights | None:
    """With a bf16/fp16 base and adapter_compute="base": the adapter tensors drop to the base dtype
    (no fp32 copies of every activation in the LoRA branch) and fp32 masters go to the optimizer."""
    if compute == "fp32" or base_dtype == torch.float32:
        return None
    for p in params:
        p.data = p.data.to(base_dtype)
    return MasterWeights(params)


def adapter_state(unet: torch.nn.Module, master: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors by name, at full precision (the fp32 masters when there are some)."""
    state = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    if master:
        by_id = {id(p): m for p, m in zip(master.model_params, master.params)}
        state = {n: by_id.get(id(p), p) for n, p in state.items()}
    return {n: p.detach().contiguous() for n, p in state.items()}


def register_adapter_state_hooks(accelerator: Accelerator, unet: torch.nn.Module,
                                 master: MasterWeights | None) -> None:
    """Make accelerate's save_state/load_state keep only the adapter weights, not the frozen base
    (1.7 GB of SD1.5 per checkpoint otherwise)."""
    def save_hook(models, weights, output_dir):
        weights.clear()
        models.clear()
        save_file(adapter_state(unet, master), str(Path(output_dir) / "adapter_state.safetensors"))

    def load_hook(models, input_dir):
        models.clear()
        state = load_file(str(Path(input_dir) / "adapter_state.safetensors"))
        own = adapter_state(unet, master)          # detached views of the live tensors
        missing, unknown = set(own) - set(state), set(state) - set(own)
        if missing or unknown:
            raise ValueError(f"{input_dir}: the checkpoint's adapter does not match this run's LoRA config "
                             f"({len(missing)} tensors missing, {len(unknown)} unknown)")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        if master:
            master.master_to_model()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume(accelerator: Accelerator, out: Path, cfg: LoraRecipe) -> int:
    """Load the newest complete checkpoint under out/checkpoints; returns the step to continue from.

    A checkpoint made with another base, data, LoRA or loss setup is refused rather than continued
    (only train.steps, output.* and sample.* may change between a run and its resume)."""
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return 0
    state = read_state(ckpt)
    before, now = _flat(state["config"]), _flat(to_dict(cfg))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and k != "train.steps"
                     and not k.startswith(("output.", "sample.")))
    if changed:
        raise ValueError(f"{out} holds a checkpoint of a different run ({ckpt.name}): "
                         + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
                         + ". Use another output.dir, or delete its checkpoints/ to start over.")
    accelerator.load_state(str(ckpt))
    if accelerator.is_main_process:
        print(f"resuming from {ckpt} (step {state['step']})", flush=True)
    return int(state["step"])


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


def train_step(cfg: LoraRecipe, accelerator: Accelerator, model, base: BaseModel, cache: LatentCache,
               dataset: CaptionedImageFolder, plan: BatchPlan, schedule: NoiseSchedule, step: int,
               params: list[torch.nn.Parameter]) -> float:
    """Forward and backward over the step's micro-batches; returns the mean loss (all processes)."""
    device, dtype = accelerator.device, base.unet.conv_in.weight.dtype
    total = torch.zeros((), device=device)
    for micro in range(cfg.train.grad_accum):
        keys = plan.keys(step, micro)
        samples = [dataset.describe(k) for k in keys]
        batch = {k: [s[k] for s in samples] for k in samples[0]}
        batch["pixel_values"] = lambda keys=keys: torch.stack([dataset[k]["pixel_values"] for k in keys])
        g = torch.Generator(device).manual_seed(plan.seed(cfg.train.seed, step, micro))
        latents = cache.latents(base, batch, cfg.data, generator=g, device=device).float()
        context = cache.embeddings(base, batch["caption"], device=device).to(dtype)
        noise = offset_noise(latents.shape, cfg.train.noise_offset, g, device)
        t = schedule.sample_timesteps(len(latents), g, device)
        noisy = schedule.add_noise(latents, noise, t).to(dtype)
        last = micro == cfg.train.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            pred = model(noisy, t, context)
            loss = diffusion_loss(pred, latents, noise, t, schedule, cfg.train.min_snr_gamma)
            accelerator.backward(loss / cfg.train.grad_accum)
        total += loss.detach() / cfg.train.grad_accum
    check_adapter_gradients(base.unet, step)
    return accelerator.reduce(total, reduction="mean").item()


def check_adapter_gradients(unet: torch.nn.Module, step: int) -> None:
    """Step-1 health check: every adapter tensor must get a non-zero gradient, or training is silently
    a no-op for it (a frozen adapter, a detached graph, a bypassed layer). B is zero at init, so A's
    gradient (which is Bᵀ·...) is zero on the first step: B is checked at step 1, A at step 2."""
    if step > 1:
        return
    part = "lora_B" if step == 0 else "lora_A"
    dead = [n for n, p in unet.named_parameters()
            if part in n and p.requires_grad and (p.grad is None or not p.grad.any())]
    if dead:
        raise RuntimeError(f"{len(dead)} adapter tensors got no gradient at step {step + 1}, e.g. "
                           f"{dead[:3]}: they would never train. This is a bug (a bypassed or detached "
                           "layer); please report it with your config.")


def clip(accelerator: Accelerator, params, max_norm: float) -> None:
    if max_norm > 0:
        accelerator.clip_grad_norm_(params, max_norm)


class Exporter:
    """Writes the adapter in each configured format with the training config in its metadata."""

    def __init__(self, cfg: LoraRecipe, unet: torch.nn.Module, fingerprint: str,
                 master: MasterWeights | None):
        self.cfg, self.unet, self.master = cfg, unet, master
        recipe = to_dict(cfg)
        recipe["data"]["root"] = Path(str(recipe["data"]["root"])).name   # nothing personal: no full path
        recipe["model"]["base"] = Path(str(recipe["model"]["base"])).name
        recipe["output"]["dir"] = Path(str(recipe["output"]["dir"])).name
        self.metadata = {"adapterkit.training_config": json.dumps(recipe, sort_keys=True),
                         "adapterkit.base_fingerprint": fingerprint,
                         "ss_training_comment": "trained with adapterkit"}

    def __call__(self, folder: Path, step: int | None = None) -> list[Path]:
        written = []
        for fmt in self.cfg.output.formats:
            suffix = "" if fmt == "kohya" else f".{fmt}"
            path = Path(folder) / f"{self.cfg.output.name}{suffix}.safetensors"
            meta = self.metadata | ({"ss_steps": str(step)} if step is not None else {})
            with self.master.full_precision() if self.master else nullcontext():
                save_lora(self.unet, path, fmt=fmt, title=self.cfg.output.name, extra_metadata=meta)
            written.append(path)
        return written


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, cfg: LoraRecipe,
                    export: Exporter) -> None:
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


@torch.no_grad()
def sample_grid(cfg: LoraRecipe, accelerator: Accelerator, unet: torch.nn.Module, base: BaseModel,
                path: Path) -> Path | None:
    """Prompts x seeds (rows) by LoRA scales (columns), fixed seeds: the same noise in every cell."""
    if not accelerator.is_main_process:
        return None
    from train.images import save_grid
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    sampler = ddim_sample if cfg.sample.sampler == "ddim" else euler_sample
    dtype = unet.conv_in.weight.dtype
    was_training = unet.training
    unet.eval()
    uncond = encode_prompts(base, [""]).to(dtype)
    size = cfg.data.resolution // base.latent_scale
    cells, rows = [], []
    for prompt in cfg.sample.prompts:
        cond = encode_prompts(base, [prompt]).to(dtype)
        for seed in cfg.sample.seeds:
            rows.append(f"{prompt[:40]} / seed {seed}")
            for scale in cfg.sample.lora_scales:
                set_lora_weights(unet, {"default": scale})
                g = torch.Generator(accelerator.device).manual_seed(seed)
                latents = sampler(lambda x, t, c: unet(x.to(dtype), t, c).float(), schedule,
                                  (1, base.latent_channels, size, size), cfg.sample.steps, g,
                                  cond=cond, uncond=uncond, guidance_scale=cfg.sample.guidance)
                cells.append(decode(base, latents)[0])
    set_lora_weights(unet, {"default": 1.0})
    unet.train(was_training)
    return save_grid(cells, len(rows), len(cfg.sample.lora_scales), path, row_labels=rows,
                     col_labels=[f"LoRA x{s:g}" for s in cfg.sample.lora_scales])


def decode(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (pixel-space models return their samples)."""
    if base.vae is None:
        return latents.clamp(-1, 1)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    z = latents / base.vae.config.scaling_factor + shift
    return base.vae.decode(z.to(base.vae.dtype)).sample.float().clamp(-1, 1)


class LossLog:
    """loss.jsonl: one line per step, truncated to the resume step so a resumed run has one history."""

    def __init__(self, path: Path, start: int, active: bool):
        self.path, self.active = path, active
        self.rows = []
        if active and path.exists():
            self.rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start]
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, step: int, loss: float, lr: float) -> None:
        if self.active:
            row = {"step": step, "loss": loss, "lr": lr}
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self, path: Path) -> None:
        from train.images import loss_curve_png
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

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _progress:
    """A tqdm bar with loss and images/s on the main process; nothing elsewhere."""

    def __init__(self, accelerator: Accelerator, start: int, total: int):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, initial=start, disable=not accelerator.is_local_main_process,
                        desc="lora", dynamic_ncols=True)

    def __enter__(self):
        return self

    def update(self, loss: float, images_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}")
        self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()
        return False


def _flat(d: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
