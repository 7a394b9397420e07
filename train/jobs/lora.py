"""`adapterkit train lora CONFIG`: train a style LoRA on a folder of captioned images.

The adapter (section `lora:`) is `kind: lora | locon | loha | lokr | dora`: LoRA, LoRA with the ResNet
convs (targets full), or the LyCORIS kinds through peft's layers (adapters.lycoris; DoRA column-wise
for the clients by default, `dora_axis: output` for peft's own).

    main(cfg) = load the base -> scan the folder (hold out data.validation) -> cache latents and
                captions -> inject the LoRA (and its EMA, section `ema:`) -> (resume) -> loop: validate
                (section `validation:`), step, guard, log, checkpoint, sample -> export the adapter files

The loop trains only the adapter: the base U-Net is frozen (bf16 on a GPU, fp32 on a CPU) and its
LoRA weights, gradients and Adam state are fp32. Every random draw of step s (noise, timesteps,
latent sample) comes from a generator seeded by (seed, s, micro-batch, process), and the batch order
is a pure function of (seed, epoch), so a resumed run repeats the uninterrupted one exactly.
Accelerate places the model, wraps it for several processes (`accelerate launch`) and logs to the
trackers (`output.trackers`: TensorBoard, W&B); the checkpoints hold the job's own state
(train/jobs/state.py: no pickles).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from adapterkit.adapters.adapter import attach_layers
from adapterkit.adapters.lora import ADAPTER_PARAM, LoraSpec
from adapterkit.adapters.lora_files import save_lora
from adapterkit.adapters.lycoris import LycorisSpec
from adapterkit.adapters.lycoris_files import save_lycoris
from adapterkit.train.config import to_dict
from adapterkit.train.console import bar
from adapterkit.train.data.cache import LatentCache, check_cacheable
from adapterkit.train.data.datasets_list import open_data
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.data.holdout import describe_split, split_validation
from adapterkit.train.jobs.batches import BatchPlan, BatchPrefetch, noisy_batch
from adapterkit.train.jobs.checkpoints import resume
from adapterkit.train.jobs.ema import EMA, EmaConfig, averaged
from adapterkit.train.jobs.graphs import GraphedStep
from adapterkit.train.jobs.lock import one_run_per_output
from adapterkit.train.jobs.loop import (
    Training,
    load_frozen_base,
    make_accelerator,
    prepare_training,
    run_steps,
)
from adapterkit.train.jobs.optimizer import (
    full_precision_state,
    scale_loss,
)
from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.progress import run_plan
from adapterkit.train.jobs.recipe import (
    JobRecipe,
    OutputConfig,
    SampleConfig,
    dtype_name,
    flat_dict,
    public_recipe,
)
from adapterkit.train.jobs.run_metadata import RunMetadata, run_metadata
from adapterkit.train.jobs.text_encoder import TextEncoderConfig, TextEncoderTraining
from adapterkit.train.jobs.trackers import start_trackers
from adapterkit.train.jobs.validation import ValidationConfig, Validator
from adapterkit.train.pipeline.base import BaseModel, encoders_on, move_encoders
from adapterkit.train.pipeline.graphed import channels_last
from adapterkit.train.pipeline.loras import set_base_lora_weights
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss

logger = logging.getLogger(__name__)
SAMPLE_BATCH = 4                # images per U-Net call of the samples (next to the training state)


# --- the recipe --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterConfig:
    """kind: lora | locon (LoRA on targets full) | loha | lokr | dora. tucker (loha, lokr), factor,
    decompose_both, full_matrix (lokr) and dora_axis (dora) as adapters.lycoris.LycorisSpec."""
    kind: Literal["lora", "locon", "loha", "lokr", "dora"] = "lora"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Literal["attn", "attn-ff", "full"] = "attn-ff"
    conv_rank: int | None = None
    conv_alpha: float | None = None
    tucker: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    dora_axis: Literal["input", "output"] = "input"
    # LoRA+ (Hayou et al. 2024, arXiv:2402.12354; kohya's network_args loraplus_lr_ratio): the up matrices
    # B learn at this multiple of their module's rate (the paper suggests 16); None: one rate for A and B.
    loraplus_lr_ratio: float | None = None
    # The text encoders' LoRA (train/jobs/text_encoder.py): off by default.
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        if self.loraplus_lr_ratio is not None and self.kind not in ("lora", "locon", "dora"):
            raise ValueError(f"loraplus_lr_ratio scales the up matrix B of a LoRA; kind {self.kind} has "
                             "none: set kind lora, locon or dora, or remove loraplus_lr_ratio")
        if self.text_encoder.enabled and self.kind not in ("lora", "locon"):
            raise ValueError(f"text_encoder.enabled trains a plain LoRA on the text encoders; kind "
                             f"{self.kind} trains the U-Net only: set kind: lora or locon, or "
                             "text_encoder.enabled: false")
        if self.kind == "locon" and self.targets != "full":
            raise ValueError("kind locon is LoRA on the ResNet convs too: set targets: full (or kind: lora "
                             f"for targets {self.targets})")
        self.spec()                                  # the spec's own checks, with this section's path

    def spec(self) -> LoraSpec | LycorisSpec:
        common = dict(rank=self.rank, alpha=self.alpha, targets=self.targets, conv_rank=self.conv_rank,
                      conv_alpha=self.conv_alpha)
        if self.kind in ("lora", "locon"):
            fields = AdapterConfig.__dataclass_fields__
            extra = [f for f in LYCORIS_ONLY if getattr(self, f) != fields[f].default]
            if extra:
                raise ValueError(f"{', '.join(extra)} do not apply to kind {self.kind}")
            return LoraSpec(dropout=self.dropout, **common)
        return LycorisSpec(self.kind, dropout=self.dropout, tucker=self.tucker, factor=self.factor,
                           decompose_both=self.decompose_both, full_matrix=self.full_matrix,
                           dora_axis=self.dora_axis, **common)

    def layouts(self) -> tuple[str, ...]:
        """The file layouts that hold this kind: peft/diffusers reads LoRA and peft's row-wise DoRA."""
        if self.kind in ("lora", "locon"):
            return ("kohya", "peft")
        return ("peft",) if self.kind == "dora" and self.dora_axis == "output" else ("kohya",)


LYCORIS_ONLY = ("tucker", "factor", "decompose_both", "full_matrix", "dora_axis")


def learning_rates(cfg: LoraRecipe, text: TextEncoderTraining | None) -> Callable[[str], float | None] | None:
    """The learning rate of each trained tensor by name (None: one rate, optim.lr, for all): the text
    encoders' LoRA at lora.text_encoder.lr, and with LoRA+ every B at lora.loraplus_lr_ratio times the
    rate of its module (the U-Net's or an encoder's)."""
    ratio = cfg.lora.loraplus_lr_ratio
    if text is None and ratio is None:
        return None

    def lr_of(name: str) -> float | None:
        lr = text.lr_of(name) if text else None
        if ratio is not None and (m := ADAPTER_PARAM.search(name)) and m.group(1) == "lora_B":   # a LoRA's B
            return (cfg.optim.lr if lr is None else lr) * ratio
        return lr
    return lr_of


@dataclass(frozen=True)
class LoraOutputConfig(OutputConfig):
    dir: str = "out/lora"
    name: str = "lora"                              # file stem of the exported adapter
    formats: tuple[Literal["kohya", "peft"], ...] = ("kohya", "peft")


@dataclass(frozen=True)
class LoraSampleConfig(SampleConfig):
    lora_scales: tuple[float, ...] = (0.0, 1.0)     # the grid's columns: without and with the LoRA


@dataclass(frozen=True)
class LoraRecipe(JobRecipe):
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    output: LoraOutputConfig = field(default_factory=LoraOutputConfig)
    sample: LoraSampleConfig = field(default_factory=LoraSampleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if self.optim.optimizer == "prodigy":        # prodigyopt takes one rate for every group (or 0)
            te = self.lora.text_encoder
            other = [lr for lr in te.lr if lr not in (0, self.optim.lr)] if te.enabled else []
            if self.lora.loraplus_lr_ratio not in (None, 1) or other:
                what = "lora.loraplus_lr_ratio" if not other else f"lora.text_encoder.lr {list(te.lr)}"
                raise ValueError(f"{what} gives some tensors another learning rate, and Prodigy estimates "
                                 "one step size for all of them (prodigyopt refuses groups with other "
                                 "rates): use optim.optimizer adamw, or drop the setting")
        if self.validation != ValidationConfig() and not self.data.validation.enabled:
            raise ValueError("validation: settings need held-out pictures: set data.validation.fraction "
                             "or data.validation.folder")
        wrong = [f for f in self.output.formats if f not in self.lora.layouts()]
        if wrong:
            raise ValueError(f"output.formats {list(wrong)} cannot hold a {self.lora.kind} adapter "
                             f"(the {'/'.join(self.lora.layouts())} layout can): set output.formats: "
                             f"{list(self.lora.layouts())}")


# --- the job -----------------------------------------------------------------------------------------

@one_run_per_output
def main(cfg: LoraRecipe) -> Path:
    """Train the LoRA described by `cfg`; returns the output folder. Resumes from its last checkpoint."""
    out = Path(cfg.output.dir)
    check_cacheable(cfg.data)
    accelerator = make_accelerator(out, cfg, "lora")
    # the pictures first: a folder with nothing usable stops before any model loads (reliability.md D17)
    dataset, held_out = split_validation(open_data(cfg.data, out / "cache" / "datasets"))
    base, fingerprint = load_frozen_base(cfg.model, accelerator.device)
    if accelerator.is_main_process:
        print(dataset.summary() + (f"\n{describe_split(dataset, held_out)}" if held_out else ""), flush=True)
    cache = LatentCache(out / "cache", base.fingerprint, memory_mb=cfg.data.cache_memory_mb)
    if accelerator.is_main_process:
        cache.build(dataset, base)
        if held_out:
            cache.build(held_out, base)
    accelerator.wait_for_everyone()
    te_on = cfg.lora.text_encoder.enabled
    # every latent and caption is cached: the GPU holds the U-Net (shuffled/dropped tags are encoded
    # each step, and a text encoder that trains encodes every step: they stay)
    if not cfg.data.varies_captions and not te_on:
        move_encoders(base, "cpu")

    unet = base.unet
    set_seed(cfg.train.seed)                 # the LoRA's random A init: the same in every run
    adapter = attach_layers(unet, cfg.lora.spec())
    text = TextEncoderTraining.attach(cfg.lora.text_encoder, base, cfg.lora.rank, cfg.lora.alpha,
                                      cfg.optim.lr, accelerator.device) if te_on else None
    channels_last(unet, accelerator.device)  # after the adapter (its convs too), before the optimizer
    unet.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    unet.train()
    dtype = unet.conv_in.weight.dtype
    trained = text.adapter(adapter) if text else adapter          # the U-Net's LoRA, and the encoders'
    training = prepare_training(accelerator, cfg, trained, dtype, learning_rates(cfg, text))
    ema = adapter_ema(cfg.ema, trained.trainable(), training)
    # a captured U-Net step takes no gradient for its conditioning: no CUDA graph while an encoder trains
    forward = None if text else GraphedStep.for_job(training.model, cfg.train, accelerator)

    start = resume(training.state, out, cfg)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    plan = BatchPlan(dataset, cfg.train.batch_size, cfg.train.grad_accum,
                     accelerator.num_processes, accelerator.process_index)
    if accelerator.is_main_process:
        trackers = start_trackers(accelerator, cfg.output.trackers, "lora", out, flat_dict(to_dict(cfg)))
        print(run_plan(cfg, start, plan.per_epoch, accelerator.num_processes, exported_files(cfg, out),
                       trackers), flush=True)
    validator = Validator(cfg.validation, cfg.train, held_out, cache, base, schedule, accelerator, out, start,
                          cfg.train.steps) if held_out else None

    run = run_metadata(cfg, dataset, batches_per_epoch=plan.per_epoch, world=accelerator.num_processes,
                       base_dtype=dtype_name(unet.conv_in.weight.dtype), prediction_type=base.prediction_type,
                       adapter={"ss_network_dropout": cfg.lora.dropout})
    # micro-batches made one ahead; not while a text encoder trains (its captions are encoded in the step)
    batches = None if text else BatchPrefetch(
        lambda step, micro: noisy_batch(dataset, plan, cache, base, schedule, cfg.train, step, micro,
                                        accelerator.device, dtype),
        cfg.train.grad_accum, cfg.train.steps, accelerator.device)
    run_steps(accelerator, cfg, out, start,
              step=lambda step: train_step(cfg, accelerator, training.model, base, cache, dataset, plan,
                                           schedule, step, forward, scaler=training.state.scaler, text=text,
                                           batches=batches),
              training=training, export=Exporter(cfg, unet, fingerprint, training.state.master, run,
                                                 text.encoders if text else None, ema),
              sample=(lambda step, path: sample_grid(cfg, base, path, ema if cfg.ema.samples else None,
                                                     training.state.master)) if cfg.sample.prompts else None,
              images_per_step=cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes,
              name="lora", what="adapter", after_step=ema.update if ema else None, stop_early=validator)
    return out


# --- the pieces, in the order main uses them ---------------------------------------------------------

def train_step(cfg: LoraRecipe, accelerator: Accelerator, model, base: BaseModel, cache: LatentCache,
               dataset: CaptionedImageFolder, plan: BatchPlan, schedule: NoiseSchedule, step: int,
               forward: GraphedStep | None = None, scaler: LossScaler | None = None,
               text: TextEncoderTraining | None = None, batches: BatchPrefetch | None = None) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; returns the mean loss (all processes) as a
    0-d device tensor (read back by run_steps when it needs the value: no sync here). `forward` runs
    the model (a GraphedStep around it); None calls `model` directly. `scaler`: the fp16 loss scale
    (`use_loss_scaling`). `text`: the text encoders' LoRA, which then encodes the captions. `batches`:
    the micro-batches made ahead (None: made here, `noisy_batch`)."""
    device, dtype = accelerator.device, base.unet.conv_in.weight.dtype
    total = torch.zeros((), device=device)
    captions = (lambda c: text.conditioning(c, step, dataset.cfg.varies_captions)) if text else None
    for micro in range(cfg.train.grad_accum):
        b = batches.get(step, micro) if batches else \
            noisy_batch(dataset, plan, cache, base, schedule, cfg.train, step, micro, device, dtype, captions)
        last = micro == cfg.train.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            pred = (forward or model)(b.noisy, b.t, b.cond)
            reg = {} if b.weights is None else {"weights": b.weights}     # reg pictures' prior_loss_weight
            loss = diffusion_loss(pred, b.latents, b.noise, b.t, schedule, cfg.train.min_snr_gamma,
                                  cfg.train.debiased_estimation, **reg)
            accelerator.backward(scale_loss(scaler, loss) / cfg.train.grad_accum)
        if batches:
            batches.prefetch(step, micro)                     # the next one, while the GPU works on this
        total += loss.detach() / cfg.train.grad_accum
    check_adapter_gradients(base.unet, step)
    if text:
        text.after_backward(accelerator, step)
    return accelerator.reduce(total, reduction="mean")


def check_adapter_gradients(unet: torch.nn.Module, step: int) -> None:
    """Step-1 health check: every adapter tensor must get a non-zero gradient, or training is silently
    a no-op for it (a frozen adapter, a detached graph, a bypassed layer). One factor is zero at init
    (LoRA/DoRA B, LoHa w2_b, LoKr w1), so the others' gradients are zero on the first step: that
    factor is checked at step 1, every adapter tensor at step 2.

    With an fp16 base the gradients are loss-scaled here (`train.jobs.optimizer.scale_loss`); an attempt whose
    scaled gradients overflowed is not judged (run_steps redoes it at a lower scale, checked again)."""
    if step > 1:
        return
    adapter = [(n, p) for n, p in unet.named_parameters() if ADAPTER_PARAM.search(n)]   # frozen ones too
    fp16 = unet.conv_in.weight.dtype == torch.float16
    if fp16 and not all(torch.isfinite(p.grad).all() for _, p in adapter if p.grad is not None):
        return
    checked = [(n, p) for n, p in adapter if step == 1 or ADAPTER_PARAM.search(n).group(1) in ZERO_INIT]
    dead = [n for n, p in checked if p.grad is None or not p.grad.any()]
    if dead:
        raise RuntimeError(f"{len(dead)} adapter tensors got no gradient at step {step + 1}, e.g. "
                           f"{dead[:3]}: they would never train. "
                           + ("With model.dtype=fp16 the cause may be fp16 underflow (gradients below 2^-24 "
                              "even after loss scaling): try model.dtype=bf16 or fp32; if it persists, this "
                              if fp16 else "This ")
                           + "is a bug (a bypassed or detached layer); please report it with your config.")


ZERO_INIT = ("lora_B", "hada_w2_b", "lokr_w1", "lokr_w1_a")     # the factor each kind starts at zero


def adapter_ema(cfg: EmaConfig, trainable: dict[str, torch.nn.Parameter], training: Training) -> EMA | None:
    """The EMA of the trained tensors at full precision (the fp32 masters where there are some), or None
    without `ema.decay`; its average joins the checkpoint's tensors as "ema.<name>", so a resumed run
    continues it exactly. Built before resume, which loads the saved average into it."""
    if cfg.decay is None:
        return None
    ema = EMA(full_precision_state(trainable, training.state.master), cfg.decay, cfg.warmup)
    own = training.state.tensors
    training.state.tensors = lambda: own() | ema.state()
    return ema


def adapter_files(output: OutputConfig, folder: Path, ema: bool = False) -> dict[str, Path]:
    """{format: path} of the adapter files a run writes into `folder`: <name>.safetensors (kohya),
    <name>.<format>.safetensors otherwise; with `ema`, the EMA's: <name>_ema.safetensors, ..."""
    stem = output.name + ("_ema" if ema else "")
    return {fmt: Path(folder) / f"{stem}{'' if fmt == 'kohya' else '.' + fmt}.safetensors"
            for fmt in output.formats}


def exported_files(cfg: LoraRecipe, folder: Path) -> list[Path]:
    """What `Exporter` writes into `folder`: one adapter file per output format (and per format the
    EMA's, with ema.decay set)."""
    files = list(adapter_files(cfg.output, folder).values())
    return files + (list(adapter_files(cfg.output, folder, ema=True).values()) if cfg.ema.decay else [])


class Exporter:
    """Writes the adapter in each configured format with the training config in its metadata."""

    def __init__(self, cfg: LoraRecipe, unet: torch.nn.Module, fingerprint: str,
                 master: MasterWeights | None, run: RunMetadata | None = None,
                 text_encoders: dict[str, torch.nn.Module] | None = None, ema: EMA | None = None):
        self.cfg, self.unet, self.master, self.run = cfg, unet, master, run
        self.text_encoders, self.ema = text_encoders, ema
        self.metadata = {"adapterkit.training_config": json.dumps(public_recipe(cfg), sort_keys=True),
                         "adapterkit.base_fingerprint": fingerprint,
                         "ss_training_comment": "trained with adapterkit"}

    def __call__(self, folder: Path, step: int | None = None) -> list[Path]:
        # one record for every file of this export (the run's times are read once)
        meta = self.metadata | (self.run.at(step) if self.run else
                                {"ss_steps": str(step)} if step is not None else {})
        meta.setdefault("modelspec.date", datetime.now(timezone.utc).replace(microsecond=0).isoformat())
        written = self._write(folder, meta, ema=False)
        if self.ema:
            with averaged(self.ema, self.master):
                written += self._write(folder, meta, ema=True)
        return written

    def _write(self, folder: Path, meta: dict[str, str], ema: bool) -> list[Path]:
        written = []
        for fmt, path in adapter_files(self.cfg.output, folder, ema).items():
            if ema:
                meta |= {"adapterkit.ema": json.dumps({"decay": self.ema.decay, "warmup": self.ema.warmup})}
            save = save_lora if self.cfg.lora.kind in ("lora", "locon") else save_lycoris
            text = {"text_encoders": self.text_encoders} if self.text_encoders else {}
            with self.master.full_precision() if self.master else nullcontext():
                save(self.unet, path, fmt=fmt, title=self.cfg.output.name, extra_metadata=meta, **text)
            written.append(path)
        return written


@torch.no_grad()
def sample_grid(cfg: LoraRecipe, base: BaseModel, path: Path, ema: EMA | None = None,
                master: MasterWeights | None = None) -> Path:
    """Prompts x seeds (rows) by LoRA scales (columns), fixed seeds: the same noise in every cell
    (`train.generate.generate_columns`); with `ema`, drawn with the EMA's weights (`averaged`)."""
    from adapterkit.train.images import save_grid
    from adapterkit.train.infotext import PARAMETERS, infotext
    from adapterkit.train.pipeline.generate import generate_columns
    unet = base.unet
    was_training = unet.training
    unet.eval()
    rows = [(prompt, seed) for prompt in cfg.sample.prompts for seed in cfg.sample.seeds]
    f = base.latent_scale
    with encoders_on(base, unet.conv_in.weight.device), averaged(ema, master):
        with bar(total=len(rows) * len(cfg.sample.lora_scales), desc="samples", leave=None) as counted:
            cells = generate_columns(base, rows, [{"default": s} for s in cfg.sample.lora_scales],
                                     steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                                     sampler=cfg.sample.sampler, size=cfg.data.resolution // f * f,
                                     batch_size=SAMPLE_BATCH, progress=counted)
    set_base_lora_weights(base, {"default": 1.0})
    unet.train(was_training)
    # A1111's infotext of the first cell (train/infotext.py); the LoRA unhashed: no file holds it yet
    (prompt, seed), first = rows[0], cells[0]                                        # (3, H, W)
    params = infotext(prompt, steps=cfg.sample.steps, sampler=cfg.sample.sampler,
                      guidance=cfg.sample.guidance, seed=seed, size=(first.shape[-1], first.shape[-2]),
                      model=Path(cfg.model.base).name,
                      loras=[(cfg.output.name, cfg.sample.lora_scales[0], None)])
    return save_grid(cells, len(rows), len(cfg.sample.lora_scales), path,
                     row_labels=[f"{prompt} / seed {seed}" for prompt, seed in rows],
                     col_labels=[f"LoRA x{s:g}" for s in cfg.sample.lora_scales],
                     footer=f"{cfg.sample.sampler}, {cfg.sample.steps} steps, "
                            f"guidance {cfg.sample.guidance:g}, "
                            f"{cfg.data.resolution // f * f} px | base {Path(cfg.model.base).name}",
                     text={PARAMETERS: params})
