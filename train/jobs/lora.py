"""`adapterkit train lora CONFIG`: train a style LoRA on a folder of captioned images.

    main(cfg) = load the base -> scan the folder -> cache latents and captions -> inject the LoRA
                -> (resume) -> loop: step, guard, log, checkpoint, sample -> export the adapter files

The loop trains only the adapter: the base U-Net is frozen (bf16 on a GPU, fp32 on a CPU) and its
LoRA weights, gradients and Adam state are fp32. Every random draw of step s (noise, timesteps,
latent sample) comes from a generator seeded by (seed, s, micro-batch, process), and the batch order
is a pure function of (seed, epoch), so a resumed run repeats the uninterrupted one exactly.
Accelerate places the model, wraps it for several processes (`accelerate launch`) and writes
TensorBoard logs; the checkpoints hold the job's own state (train/jobs/state.py: no pickles).
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from adapterkit.adapters.lora import LoraSpec, add_lora, set_lora_weights
from adapterkit.adapters.lora_files import save_lora
from adapterkit.train.config import to_dict
from adapterkit.train.data.cache import LatentCache, check_cacheable
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.jobs.batches import BatchPlan, noisy_batch
from adapterkit.train.jobs.checkpoints import resume
from adapterkit.train.jobs.graphs import GraphedStep, channels_last
from adapterkit.train.jobs.lock import one_run_per_output
from adapterkit.train.jobs.loop import load_frozen_base, make_accelerator, run_steps
from adapterkit.train.jobs.optimizer import (
    adapter_master_weights,
    full_precision_state,
    make_optimizer,
    scale_loss,
    use_loss_scaling,
)
from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.recipe import (
    LoopConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    SampleConfig,
    flat_dict,
    public_recipe,
)
from adapterkit.train.jobs.state import TrainingState
from adapterkit.train.pipeline.base import BaseModel, encoders_on, move_encoders
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss

logger = logging.getLogger(__name__)
SAMPLE_BATCH = 4                # images per U-Net call of the samples (next to the training state)


# --- the recipe --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraOutputConfig(OutputConfig):
    dir: str = "out/lora"
    name: str = "lora"                              # file stem of the exported adapter
    formats: tuple[Literal["kohya", "peft"], ...] = ("kohya", "peft")


@dataclass(frozen=True)
class LoraSampleConfig(SampleConfig):
    lora_scales: tuple[float, ...] = (0.0, 1.0)     # the grid's columns: without and with the LoRA


@dataclass(frozen=True)
class LoraRecipe:
    model: ModelConfig
    data: DataConfig
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    output: LoraOutputConfig = field(default_factory=LoraOutputConfig)
    sample: LoraSampleConfig = field(default_factory=LoraSampleConfig)


# --- the job -----------------------------------------------------------------------------------------

@one_run_per_output
def main(cfg: LoraRecipe) -> Path:
    """Train the LoRA described by `cfg`; returns the output folder. Resumes from its last checkpoint."""
    out = Path(cfg.output.dir)
    check_cacheable(cfg.data)
    accelerator = make_accelerator(out)
    base, fingerprint = load_frozen_base(cfg.model, accelerator.device)
    dataset = CaptionedImageFolder.scan(cfg.data)
    if accelerator.is_main_process:
        print(dataset.summary(), flush=True)
    cache = LatentCache(out / "cache", base.fingerprint)
    if accelerator.is_main_process:
        cache.build(dataset, base)
    accelerator.wait_for_everyone()
    move_encoders(base, "cpu")              # every latent and caption is cached: the GPU holds the U-Net

    unet = base.unet
    set_seed(cfg.train.seed)                 # the LoRA's random A init: the same in every run
    add_lora(unet, cfg.lora)
    channels_last(unet, accelerator.device)  # after add_lora: LoRA convs too; before the optimizer sees them
    unet.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    master = adapter_master_weights(params, unet.conv_in.weight.dtype, cfg.train.adapter_compute)
    optimizer, lr_schedule = make_optimizer(cfg.optim, master.params if master else params, cfg.train.steps)
    model, optimizer = accelerator.prepare(unet, optimizer)
    scaler = use_loss_scaling(unet.conv_in.weight.dtype)   # fp16 only
    state = TrainingState(accelerator, lambda: adapter_state(unet, master), optimizer, lr_schedule, master,
                          scaler, what="LoRA config")
    forward = GraphedStep.for_job(model, cfg.train, accelerator)

    start = resume(state, out, cfg)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    plan = BatchPlan(dataset, cfg.train.batch_size, cfg.train.grad_accum,
                     accelerator.num_processes, accelerator.process_index)
    if accelerator.is_main_process:
        accelerator.init_trackers("lora", config=flat_dict(to_dict(cfg)))

    run_steps(accelerator, cfg, out, start,
              step=lambda step: train_step(cfg, accelerator, model, base, cache, dataset, plan, schedule,
                                           step, forward, scaler=scaler),
              optimizer=optimizer, lr_schedule=lr_schedule, params=params, master=master, scaler=scaler,
              state=state, export=Exporter(cfg, unet, fingerprint, master),
              sample=(lambda step, path: sample_grid(cfg, base, path)) if cfg.sample.prompts else None,
              images_per_step=cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes,
              name="lora", what="adapter")
    return out


# --- the pieces, in the order main uses them ---------------------------------------------------------

def adapter_state(unet: torch.nn.Module, master: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors by name, at full precision (the fp32 masters when there are some)."""
    return full_precision_state({n: p for n, p in unet.named_parameters() if ".lora_" in n}, master)


def train_step(cfg: LoraRecipe, accelerator: Accelerator, model, base: BaseModel, cache: LatentCache,
               dataset: CaptionedImageFolder, plan: BatchPlan, schedule: NoiseSchedule, step: int,
               forward: GraphedStep | None = None, scaler: LossScaler | None = None) -> float:
    """Forward and backward over the step's micro-batches; returns the mean loss (all processes).
    `forward` runs the model (a GraphedStep around it); None calls `model` directly. `scaler`: the fp16
    loss scale (`use_loss_scaling`)."""
    device, dtype = accelerator.device, base.unet.conv_in.weight.dtype
    total = torch.zeros((), device=device)
    for micro in range(cfg.train.grad_accum):
        b = noisy_batch(dataset, plan, cache, base, schedule, cfg.train, step, micro, device, dtype)
        last = micro == cfg.train.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            pred = (forward or model)(b.noisy, b.t, b.cond)
            loss = diffusion_loss(pred, b.latents, b.noise, b.t, schedule, cfg.train.min_snr_gamma)
            accelerator.backward(scale_loss(scaler, loss) / cfg.train.grad_accum)
        total += loss.detach() / cfg.train.grad_accum
    check_adapter_gradients(base.unet, step)
    return accelerator.reduce(total, reduction="mean").item()


def check_adapter_gradients(unet: torch.nn.Module, step: int) -> None:
    """Step-1 health check: every adapter tensor must get a non-zero gradient, or training is silently
    a no-op for it (a frozen adapter, a detached graph, a bypassed layer). B is zero at init, so A's
    gradient (which is Bᵀ·...) is zero on the first step: B is checked at step 1, A at step 2.

    With an fp16 base the gradients are loss-scaled here (`train.jobs.optimizer.scale_loss`); an attempt whose
    scaled gradients overflowed is not judged (run_steps redoes it at a lower scale, checked again)."""
    if step > 1:
        return
    part = "lora_B" if step == 0 else "lora_A"
    adapter = [(n, p) for n, p in unet.named_parameters() if ".lora_" in n]     # frozen ones too
    fp16 = unet.conv_in.weight.dtype == torch.float16
    if fp16 and not all(torch.isfinite(p.grad).all() for _, p in adapter if p.grad is not None):
        return
    dead = [n for n, p in adapter if part in n and (p.grad is None or not p.grad.any())]
    if dead:
        raise RuntimeError(f"{len(dead)} adapter tensors got no gradient at step {step + 1}, e.g. "
                           f"{dead[:3]}: they would never train. "
                           + ("With model.dtype=fp16 the cause may be fp16 underflow (gradients below 2^-24 "
                              "even after loss scaling): try model.dtype=bf16 or fp32; if it persists, this "
                              if fp16 else "This ")
                           + "is a bug (a bypassed or detached layer); please report it with your config.")


def adapter_files(output: OutputConfig, folder: Path) -> dict[str, Path]:
    """{format: path} of the adapter files a run writes into `folder`: <name>.safetensors (kohya),
    <name>.<format>.safetensors otherwise."""
    return {fmt: Path(folder) / f"{output.name}{'' if fmt == 'kohya' else '.' + fmt}.safetensors"
            for fmt in output.formats}


class Exporter:
    """Writes the adapter in each configured format with the training config in its metadata."""

    def __init__(self, cfg: LoraRecipe, unet: torch.nn.Module, fingerprint: str,
                 master: MasterWeights | None):
        self.cfg, self.unet, self.master = cfg, unet, master
        self.metadata = {"adapterkit.training_config": json.dumps(public_recipe(cfg), sort_keys=True),
                         "adapterkit.base_fingerprint": fingerprint,
                         "ss_training_comment": "trained with adapterkit"}

    def __call__(self, folder: Path, step: int | None = None) -> list[Path]:
        written = []
        for fmt, path in adapter_files(self.cfg.output, folder).items():
            meta = self.metadata | ({"ss_steps": str(step)} if step is not None else {})
            with self.master.full_precision() if self.master else nullcontext():
                save_lora(self.unet, path, fmt=fmt, title=self.cfg.output.name, extra_metadata=meta)
            written.append(path)
        return written


@torch.no_grad()
def sample_grid(cfg: LoraRecipe, base: BaseModel, path: Path) -> Path:
    """Prompts x seeds (rows) by LoRA scales (columns), fixed seeds: the same noise in every cell
    (`train.generate.generate_columns`)."""
    from adapterkit.train.images import save_grid
    from adapterkit.train.pipeline.generate import generate_columns
    unet = base.unet
    was_training = unet.training
    unet.eval()
    rows = [(prompt, seed) for prompt in cfg.sample.prompts for seed in cfg.sample.seeds]
    f = base.latent_scale
    with encoders_on(base, unet.conv_in.weight.device):
        cells = generate_columns(base, rows, [{"default": s} for s in cfg.sample.lora_scales],
                                 steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                                 sampler=cfg.sample.sampler, size=cfg.data.resolution // f * f,
                                 batch_size=SAMPLE_BATCH)
    set_lora_weights(unet, {"default": 1.0})
    unet.train(was_training)
    return save_grid(cells, len(rows), len(cfg.sample.lora_scales), path,
                     row_labels=[f"{prompt[:40]} / seed {seed}" for prompt, seed in rows],
                     col_labels=[f"LoRA x{s:g}" for s in cfg.sample.lora_scales])
