"""`adapterkit train controlnet CONFIG`: train an edge-map (Canny) ControlNet on a folder of images.

    main(cfg) = load the base -> pair every image with its hint -> cache latents and captions
                -> clone the encoder into a ControlNet (over an optional frozen LoRA) -> (resume)
                -> loop: step, guard, log, checkpoint, sample + edge fidelity -> export the ControlNet

Hints: train/data/pairs.py pairs every image with its conditioning image from `control.folder`, or
makes Canny maps after each image's bucket crop; latents and caption embeddings come from the cache.

The loop is every job's (`train.loop.run_steps`): the U-Net is frozen (bf16 on a GPU, fp32 on a
CPU), the ControlNet (`ControlNet.from_unet`, cloned from the fp32 base before the cast) trains in
fp32, or in the base's dtype with fp32 masters (`train.adapter_compute`). Prompt dropout is
`data.caption_dropout` (lllyasviel's ControlNet used 50%: an empty prompt makes the network read the
hint). Exact resume, atomic rotated checkpoints holding only the ControlNet, SIGINT checkpoints and
the NaN guard are shared with the LoRA trainer; the gradient health check follows the zero convs
(`gradient_onset`).

Outputs under output.dir: `<name>/` (diffusers folder: config.json + diffusion_pytorch_model
.safetensors) and the other `output.formats`, with the HintSpec (kind, Canny thresholds, resize
policy) and the base fingerprint in the metadata; optionally `<name>.control-lora.safetensors`
(`control.control_lora_rank`: an SVD of the trained ControlNet's difference from the base; or
`control.train_rank`: the encoder trains as that low-rank difference, and the file is exact);
samples/*.png (control image | sample per control scale, rows per hint, prompt, seed and LoRA scale),
edge_fidelity.jsonl (Canny of each sample against its hint, `train.canny.edge_fidelity`), loss.jsonl,
loss.png and the trackers' logs (TensorBoard under controlnet/).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from torch.nn.utils import parametrize

from adapterkit.adapters.adapter import beside
from adapterkit.adapters.control_lora import (
    ControlLoraReport,
    merged_controlnet,
    save_control_lora,
    train_as_low_rank,
)
from adapterkit.adapters.controlnet import ControlNet, base_encoder_state, hint_widths_for
from adapterkit.adapters.controlnet_files import save_controlnet
from adapterkit.adapters.lora_files import split_lora_spec
from adapterkit.train.config import to_dict
from adapterkit.train.console import bar
from adapterkit.train.data.buckets import assign_bucket, plan_crop
from adapterkit.train.data.cache import LatentCache, check_cacheable
from adapterkit.train.data.canny import edge_fidelity
from adapterkit.train.data.folder import (
    BadImage,
    decode_image,
)
from adapterkit.train.data.pairs import HINT_BACKGROUND, HintSource, PairedFolder
from adapterkit.train.images import unit_tensor
from adapterkit.train.jobs.batches import BatchPlan, BatchPrefetch, MicroBatch, noisy_batch
from adapterkit.train.jobs.checkpoints import MUTABLE, resume
from adapterkit.train.jobs.graphs import GraphedStep
from adapterkit.train.jobs.lock import one_run_per_output
from adapterkit.train.jobs.loop import frozen_dtype, make_accelerator, open_base, prepare_training, run_steps
from adapterkit.train.jobs.optimizer import (
    scale_loss,
)
from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.progress import JsonlLog, run_plan
from adapterkit.train.jobs.recipe import (
    DTYPES,
    PRIVATE_PATHS,
    JobRecipe,
    OutputConfig,
    SampleConfig,
    dtype_name,
    flat_dict,
    public_recipe,
)
from adapterkit.train.jobs.run_metadata import RunMetadata, run_metadata
from adapterkit.train.jobs.trackers import start_trackers
from adapterkit.train.pipeline.base import BaseModel
from adapterkit.train.pipeline.generate import check_controlnet, controlled_prediction, generate, to_images
from adapterkit.train.pipeline.graphed import channels_last
from adapterkit.train.pipeline.loras import load_lora_on_base, set_base_lora_weights
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss
from adapterkit.train.pipeline.transfer import stack_to_device
from adapterkit.unet import Conditioning

LORA_NAME = "lora"                  # the frozen LoRA of control.lora, as an adapter name on the U-Net


# File names per output format, relative to the output (or checkpoint) folder, and their layout.
FORMATS = {"diffusers": ("{name}", "diffusers"), "diffusers-file": ("{name}.safetensors", "diffusers"),
           "lllyasviel": ("{name}.lllyasviel.safetensors", "lllyasviel")}


SAMPLE_BATCH = 4                    # images per U-Net call of the samples (next to the training state)


# save_controlnet reserves "adapterkit.*" header keys for what it computes itself; the recipe goes here.
RECIPE_KEY = "adapterkit_training_config"


@dataclass(frozen=True)
class ControlConfig:
    folder: str | None = None               # conditioning images paired by path/name; None: Canny maps
    column: str | None = None               # or: a `datasets` data.root's conditioning-image column
    kind: str = "canny"                     # what the hints show (the file's modelspec.preprocessor)
    canny_low: int = 100                    # cv2.Canny thresholds for automatic maps (lllyasviel's)
    canny_high: int = 200
    conditioning_scale: float = 1.0         # residual scale while training (and the samples' default)
    lora: str | None = None                 # "file.safetensors[:weight]": a LoRA on the frozen U-Net
    control_lora_rank: int | None = None    # also export a Control-LoRA of this rank
    # Train the encoder copy as a rank-r difference from the base (Control-LoRA training): the optimizer
    # holds the factors, not the encoder; exports a Control-LoRA of this rank too (exact). None: full.
    train_rank: int | None = None
    hint_cache_mb: int = 1024               # hints kept in memory per (image, crop), uint8; 0 = none

    def __post_init__(self):
        if not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"Canny thresholds need 0 <= canny_low <= canny_high, got {self.canny_low}, "
                             f"{self.canny_high}")
        if self.folder is not None and self.column is not None:
            raise ValueError("control.folder and control.column both name conditioning images: keep one")
        if self.folder is None and self.column is None and self.kind != "canny":
            raise ValueError(f"control.kind={self.kind!r} needs control.folder (or control.column): only "
                             "Canny maps are made automatically")
        if self.control_lora_rank is not None and self.control_lora_rank < 1:
            raise ValueError(f"control_lora_rank must be >= 1 (or null), got {self.control_lora_rank}")
        if self.train_rank is not None and self.train_rank < 1:
            raise ValueError(f"train_rank must be >= 1 (or null: a full ControlNet), got {self.train_rank}")
        if self.hint_cache_mb < 0:
            raise ValueError(f"hint_cache_mb must be >= 0 (0 = no cache), got {self.hint_cache_mb}")
        if self.conditioning_scale <= 0:
            raise ValueError(f"conditioning_scale must be > 0 (at 0 the ControlNet has no effect and gets no "
                             f"gradient), got {self.conditioning_scale}")

    @property
    def hints(self) -> HintSource:
        """Where the training hints come from (train/data/pairs.py)."""
        return HintSource(self.folder, self.kind, self.canny_low, self.canny_high, self.hint_cache_mb,
                          self.column)

    @property
    def export_rank(self) -> int | None:
        """The rank of the Control-LoRA file written, if any."""
        return self.control_lora_rank or self.train_rank


@dataclass(frozen=True)
class ControlNetOutputConfig(OutputConfig):
    dir: str = "out/controlnet"
    name: str = "controlnet"
    # diffusers: <name>/ with config.json (ControlNetModel.from_pretrained); diffusers-file: one
    # <name>.safetensors (ComfyUI); lllyasviel: <name>.lllyasviel.safetensors (A1111's extension).
    formats: tuple[Literal["diffusers", "diffusers-file", "lllyasviel"], ...] = ("diffusers",)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"     # of the exported files (checkpoints stay fp32)


@dataclass(frozen=True)
class ControlNetSampleConfig(SampleConfig):
    hints: tuple[str, ...] = ()                     # conditioning images, used as given (not Canny'd)
    num_hints: int = 2                              # without hints: the first training pairs' hints
    control_scales: tuple[float, ...] = (0.0, 1.0)  # the grid's columns after the control image
    lora_scales: tuple[float, ...] = (0.0, 1.0)     # with control.lora: one row per scale


@dataclass(frozen=True)
class ControlNetRecipe(JobRecipe):
    control: ControlConfig = field(default_factory=ControlConfig)
    output: ControlNetOutputConfig = field(default_factory=ControlNetOutputConfig)
    sample: ControlNetSampleConfig = field(default_factory=ControlNetSampleConfig)

    def __post_init__(self):
        if self.data.validation.enabled:
            raise ValueError("data.validation: the ControlNet job has no validation loss yet (the LoRA job "
                             "has): remove it")
        if self.data.datasets:
            raise ValueError("data.datasets: the ControlNet job trains on one folder of pairs (the LoRA job "
                             "takes several datasets): give data.root and control.folder")


@one_run_per_output
def main(cfg: ControlNetRecipe) -> Path:
    """Train the ControlNet described by `cfg`; returns the output folder. Resumes from its last
    checkpoint."""
    out = Path(cfg.output.dir)
    check_cacheable(cfg.data)
    accelerator = make_accelerator(out, cfg, "controlnet")
    # the pictures first: a folder with nothing usable stops before any model loads (reliability.md D17)
    dataset = PairedFolder.scan(cfg.data, cfg.control.hints, out / "cache" / "datasets")
    base = open_base(cfg.model, accelerator.device)
    unet = base.unet
    set_seed(cfg.train.seed)                 # the hint encoder's random init: the same in every run
    cn = ControlNet.from_unet(unet, hint_widths=hint_widths_for(base.latent_scale))   # fp32 encoder copy
    check_controlnet(base, cn)
    if cfg.control.train_rank:
        train_as_low_rank(cn, cfg.control.train_rank)
    cn.hint = dataset.hint_spec
    if accelerator.is_main_process:
        print(dataset.summary(), flush=True)
    hints = sample_hints(cfg, dataset) if cfg.sample.prompts else []
    dtype = frozen_dtype(cfg.model, accelerator.device)
    reference = copy.deepcopy(unet).cpu() if cfg.control.export_rank and dtype != torch.float32 \
        else unet                            # the fp32 base a Control-LoRA is the difference from
    attach_lora(base, cfg.control.lora, accelerator.is_main_process)
    # after the LoRA: its text-encoder part changes the captions' embeddings (and the text fingerprint)
    cache = LatentCache(out / "cache", base.fingerprint, memory_mb=cfg.data.cache_memory_mb)
    if accelerator.is_main_process:
        cache.build(dataset, base)
    accelerator.wait_for_everyone()

    unet.to(dtype).requires_grad_(False).eval()
    for m in (unet, cn):
        channels_last(m, accelerator.device)
        m.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    cn.train()
    adapter = beside(cn, "ControlNet")
    training = prepare_training(accelerator, cfg, adapter, dtype)
    for p in cn.parameters():
        if not p.requires_grad:              # a Control-LoRA's frozen encoder: computes with the factors
            p.data = p.data.to(training.params[0].dtype)
    forward = GraphedStep.for_job(ControlledUNet(unet, training.model, cfg.control.conditioning_scale),
                                  cfg.train, accelerator)

    start = resume(training.state, out, cfg, (*MUTABLE, "control.control_lora_rank", "control.hint_cache_mb"))
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    plan = BatchPlan(dataset, cfg.train.batch_size, cfg.train.grad_accum,
                     accelerator.num_processes, accelerator.process_index)
    if accelerator.is_main_process:
        trackers = start_trackers(accelerator, cfg.output.trackers, "tensorboard", out,
                                  flat_dict(to_dict(cfg)))
        print(run_plan(cfg, start, plan.per_epoch, accelerator.num_processes, exported_files(cfg, out),
                       trackers), flush=True)
    fidelity = JsonlLog(out / "edge_fidelity.jsonl", start, accelerator.is_main_process)

    def sample_and_score(step: int, path: Path) -> None:
        with parametrize.cached():           # a Control-LoRA's weights: computed once, not every call
            scores = sample_grid(cfg, cn, base, hints, path)
        if scores:
            fidelity.write({"step": step, "edge_f1": {f"{s:g}": f for s, f in scores.items()}})
            accelerator.log({f"edge_f1/control_x{s:g}": f for s, f in scores.items()}, step=step)

    run = run_metadata(cfg, dataset, batches_per_epoch=plan.per_epoch, world=accelerator.num_processes,
                       base_dtype=dtype_name(dtype), prediction_type=base.prediction_type)
    batches = BatchPrefetch(lambda step, micro: hinted_batch(cfg, base, cache, dataset, plan, schedule, step,
                                                             micro, accelerator.device),
                            cfg.train.grad_accum, cfg.train.steps, accelerator.device)
    run_steps(accelerator, cfg, out, start,
              step=lambda step: train_step(cfg, accelerator, training.model, cn, base, cache, dataset, plan,
                                           schedule, step, forward, scaler=training.state.scaler,
                                           batches=batches),
              training=training, export=Exporter(cfg, cn, training.state.master, reference, run),
              sample=sample_and_score if hints else None,
              images_per_step=cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes,
              name="controlnet", what="ControlNet")
    return out


def attach_lora(base: BaseModel, spec: str | None, report: bool = False) -> float | None:
    """Load control.lora ("file[:weight]") onto the base, frozen, as adapter `LORA_NAME`: its U-Net part
    on the U-Net, its text-encoder part (kohya lora_te*_) on the text encoders
    (train.pipeline.loras.load_lora_on_base); returns its weight (None without one). The ControlNet then
    learns to steer the LoRA'd model. `report`: print what went where."""
    if spec is None:
        return None
    path, weight = split_lora_spec(spec)
    applied = load_lora_on_base(base, path, name=LORA_NAME, weight=weight)   # refused if merged in already
    if report:
        print(f"control.lora {applied.line()}", flush=True)
    return weight


class ControlledUNet(torch.nn.Module):
    """The frozen U-Net steered by the ControlNet in training, as one module (one CUDA graph a step)."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module, scale: float):
        super().__init__()
        self.unet, self.controlnet, self.scale = unet, controlnet, scale

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning, hint: Tensor) -> Tensor:
        return controlled_prediction(self.unet, self.controlnet, x, t, cond, hint, self.scale)


def train_step(cfg: ControlNetRecipe, accelerator: Accelerator, model, cn: ControlNet, base: BaseModel,
               cache: LatentCache, dataset: PairedFolder, plan: BatchPlan, schedule: NoiseSchedule,
               step: int, forward: GraphedStep | None = None, scaler: LossScaler | None = None,
               batches: BatchPrefetch | None = None) -> Tensor:
    """Forward and backward over the step's micro-batches; returns the mean loss (all processes) as a
    0-d device tensor (no sync here: run_steps reads it back when it needs the value).
    `forward(x, t, cond, hint)` is the controlled U-Net (a GraphedStep); None calls it directly.
    `scaler`: the fp16 loss scale (`use_loss_scaling`). `batches`: the micro-batches with their hints
    made ahead (`hinted_batch`; None: made here)."""
    forward = forward or ControlledUNet(base.unet, model, cfg.control.conditioning_scale)
    total = torch.zeros((), device=accelerator.device)
    hinted = False
    for micro in range(cfg.train.grad_accum):
        b, hint, any_hint = batches.get(step, micro) if batches else \
            hinted_batch(cfg, base, cache, dataset, plan, schedule, step, micro, accelerator.device)
        hinted |= any_hint
        last = micro == cfg.train.grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            pred = forward(b.noisy, b.t, b.cond, hint)
            loss = diffusion_loss(pred, b.latents, b.noise, b.t, schedule, cfg.train.min_snr_gamma,
                                  cfg.train.debiased_estimation)
            accelerator.backward(scale_loss(scaler, loss) / cfg.train.grad_accum)
        if batches:
            batches.prefetch(step, micro)                     # the next one, while the GPU works on this
        total += loss.detach() / cfg.train.grad_accum
    check_controlnet_gradients(cn, step, hinted)
    return accelerator.reduce(total, reduction="mean")


def hinted_batch(cfg: ControlNetRecipe, base: BaseModel, cache: LatentCache, dataset: PairedFolder,
                 plan: BatchPlan, schedule: NoiseSchedule, step: int, micro: int,
                 device: torch.device) -> tuple[MicroBatch, Tensor, bool]:
    """Micro-batch `micro` of `step` (`noisy_batch`), its hints (B, 3, H, W) in [0, 1] on `device`
    (one copy from pinned memory), and whether any hint has an edge (asked on the host, before the
    copy: no GPU sync)."""
    b = noisy_batch(dataset, plan, cache, base, schedule, cfg.train, step, micro, device,
                    base.unet.conv_in.weight.dtype)
    hints = [dataset.hint(k, s["crop"]) for k, s in zip(b.keys, b.samples)]
    return b, stack_to_device(hints, device), any(bool(h.any()) for h in hints)


def gradient_onset(name: str) -> int:
    """The step (1-based) at which ControlNet tensor `name` first gets a non-zero gradient.

    At init the zero convs (weight and bias) and the hint encoder's conv_out are zero. The loss sees
    the ControlNet only through the zero convs' outputs y = W s + b, so at step 1 dL/dW = dL/dy sᵀ and
    dL/db are non-zero but dL/ds = Wᵀ dL/dy = 0: the encoder clone and the whole hint encoder (whose
    output enters through the encoder) get exactly zero. AdamW then moves every zero-conv element and
    nothing else (Adam's update of a zero gradient is 0, and so is weight decay of a zero weight).
    Step 2: W != 0, so the encoder clone and conv_out (dL/dW_out = dL/dguided featuresᵀ, features of a
    fresh hint encoder) get gradients; the hint layers before conv_out still get W_outᵀ(...) = 0.
    Step 3: those too.
    """
    if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
        return 1
    if name.startswith("controlnet_cond_embedding.") and ".conv_out." not in name:
        return 3
    if name.endswith(".down"):             # a Control-LoRA factor: dL/d down = upᵀ dL/dW, and up is 0
        return 3                           # until step 2 has moved it
    return 2


def check_controlnet_gradients(cn: ControlNet, step: int, hinted: bool) -> None:
    """Health check of steps 1-3: every ControlNet tensor whose `gradient_onset` is this step must get
    a non-zero gradient, or it would never train (a detached graph, a bypassed layer, a frozen tensor).
    The hint encoder's first weight sees the hint itself (dL/dW = dL/dy hintᵀ): not checked when every
    hint of the step was blank."""
    if step > 2:
        return
    dead = [n for n, p in cn.named_parameters()
            if p.requires_grad and gradient_onset(n) == step + 1 and (p.grad is None or not p.grad.any())
            and (hinted or n != "controlnet_cond_embedding.conv_in.weight")]
    if dead:
        raise RuntimeError(f"{len(dead)} ControlNet tensors got no gradient at step {step + 1}, e.g. "
                           f"{dead[:3]}: they would never train. This is a bug (a bypassed or detached "
                           "layer); please report it with your config.")


class Exporter:
    """Writes the ControlNet in each configured format (and the Control-LoRA when asked), the fp32
    masters cast to output.dtype, with the training recipe in the metadata."""

    def __init__(self, cfg: ControlNetRecipe, cn: ControlNet, master: MasterWeights | None,
                 reference: torch.nn.Module, run: RunMetadata | None = None):
        self.cfg, self.cn, self.master, self.reference, self.run = cfg, cn, master, reference, run
        recipe = public_recipe(cfg, (*PRIVATE_PATHS, "control.folder", "control.lora"))
        self.metadata = {RECIPE_KEY: json.dumps(recipe, sort_keys=True),
                         "ss_training_comment": "trained with adapterkit"}
        self.control_lora: ControlLoraReport | None = None

    def __call__(self, folder: Path, step: int | None = None) -> list[Path]:
        name, dtype = self.cfg.output.name, DTYPES[self.cfg.output.dtype]
        meta = self.metadata | ({"ss_steps": str(step)} if step is not None else {})
        if self.run:       # save_controlnet computes the adapterkit.* keys itself: ours go as adapterkit_*
            meta = self.metadata | {k.replace("adapterkit.", "adapterkit_", 1): v
                                    for k, v in self.run.at(step).items()}
        paths = exported_files(self.cfg, folder)
        written = []
        with self.master.full_precision() if self.master else nullcontext():
            cn = self.cn
            if self.cfg.control.train_rank:       # the weights at fp32 from the base and the factors
                cn = merged_controlnet(cn, base_encoder_state(self.reference))
            for fmt, path in zip(self.cfg.output.formats, paths):
                save_controlnet(cn, path, FORMATS[fmt][1], metadata=meta, title=name, dtype=dtype)
                written.append(path)
            rank = self.cfg.control.export_rank
            if rank:
                path = paths[-1]
                report = save_control_lora(cn, self.reference, path, rank, dtype=dtype, metadata=meta,
                                           title=name)
                print(f"control-LoRA rank {rank}: {path.name} {report.bytes / 2**20:.1f} MiB, "
                      f"{report.ratio:.1f}x smaller than the full ControlNet; largest relative error of a "
                      f"layer {report.max_error:.1%}", flush=True)
                self.control_lora = report
                written.append(path)
        return written


def exported_files(cfg: ControlNetRecipe, folder: Path) -> list[Path]:
    """What `Exporter` writes into `folder`, in its order: the ControlNet in each of output.formats
    (a folder for "diffusers"), then the Control-LoRA when control.export_rank asks for one."""
    name = cfg.output.name
    files = [Path(folder) / FORMATS[fmt][0].format(name=name) for fmt in cfg.output.formats]
    if cfg.control.export_rank:
        files.append(Path(folder) / f"{name}.control-lora.safetensors")
    return files


def sample_hints(cfg: ControlNetRecipe, dataset: PairedFolder) -> list[tuple[str, Tensor]]:
    """(label, hint (3, H, W) in [0, 1]) for the samples: each `sample.hints` file in the bucket of its
    aspect ratio (center crop), else the center-crop hints of the first `sample.num_hints` pairs."""
    out = []
    for given in cfg.sample.hints:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"sample.hints: {given} is not a file")
        try:
            image, _ = decode_image(path.read_bytes(), ext=path.suffix.lower(), background=HINT_BACKGROUND)
        except BadImage as e:
            raise ValueError(f"sample.hints: {given} cannot be used ({e.reason}: {e.detail})") from None
        crop = plan_crop(image.size, assign_bucket(image.size, dataset.buckets))
        out.append((path.stem, unit_tensor(crop.apply(image))))
    if not cfg.sample.hints:
        for i, rec in enumerate(dataset.records[:cfg.sample.num_hints]):
            crop = plan_crop(rec.size, dataset.bucket_of[i])
            out.append((PurePosixPath(rec.rel).stem, dataset.hint(i, crop)))
    return out


@torch.no_grad()
def first_sample_infotext(cfg: ControlNetRecipe, pair: tuple[str, int], lora_scale: float | None,
                          hint: Tensor) -> str:
    """A1111's infotext (train/infotext.py) of the grid's first sample: the first row's prompt, seed and
    hint (3, H, W), the first control scale, control.lora at the row's scale with its file's hash."""
    from adapterkit.train.infotext import infotext, lora_hash
    loras = []
    if cfg.control.lora:
        file = Path(split_lora_spec(cfg.control.lora)[0])
        loras = [(file.stem, lora_scale, lora_hash(file))]
    return infotext(pair[0], steps=cfg.sample.steps, sampler=cfg.sample.sampler, guidance=cfg.sample.guidance,
                    seed=pair[1], size=(hint.shape[-1], hint.shape[-2]), model=Path(cfg.model.base).name,
                    loras=loras, extra={"ControlNet": cfg.output.name,
                                        "Control scale": f"{cfg.sample.control_scales[0]:g}"})


def sample_grid(cfg: ControlNetRecipe, cn: ControlNet, base: BaseModel, hints: Sequence[tuple[str, Tensor]],
                path: Path) -> dict[float, float]:
    """Rows: hint x prompt x seed (x LoRA scale, with control.lora); columns: the control image, then a
    sample per control scale (`train.generate.generate`: the same noise in every cell of a row).
    Returns the mean edge F1 of the samples against their hints per control scale
    (`train.canny.edge_fidelity`, the hint's own Canny thresholds)."""
    from adapterkit.train.images import save_grid, tensor_to_pil
    from adapterkit.train.infotext import PARAMETERS
    low, high = (cn.hint.canny_low, cn.hint.canny_high) if cn.hint.canny_low is not None \
        else (cfg.control.canny_low, cfg.control.canny_high)
    lora_weight = split_lora_spec(cfg.control.lora)[1] if cfg.control.lora else None
    lora_scales = cfg.sample.lora_scales if lora_weight is not None else (None,)
    pairs = [(prompt, seed) for prompt in cfg.sample.prompts for seed in cfg.sample.seeds]
    cells, rows, scores = [], [], {s: [] for s in cfg.sample.control_scales}
    counted = bar(total=len(hints) * len(lora_scales) * len(cfg.sample.control_scales) * len(pairs),
                  desc="samples", leave=None)                        # one bar for the grid's pictures
    for label, hint in hints:
        images = {}                                       # (LoRA scale, control scale) -> one per pair
        for lora_scale in lora_scales:
            if lora_scale is not None:
                set_base_lora_weights(base, {LORA_NAME: lora_scale})
            for scale in cfg.sample.control_scales:
                images[lora_scale, scale] = to_images(generate(
                    base, [p for p, _ in pairs], [s for _, s in pairs], steps=cfg.sample.steps,
                    guidance=cfg.sample.guidance, sampler=cfg.sample.sampler, size=tuple(hint.shape[1:]),
                    controlnet=cn, hints=hint.expand(len(pairs), -1, -1, -1), control_scale=scale,
                    batch_size=SAMPLE_BATCH, progress=counted))
        hint_image = tensor_to_pil(hint, (0.0, 1.0))
        for i, (prompt, seed) in enumerate(pairs):
            for lora_scale in lora_scales:
                lora = [f"LoRA x{lora_scale:g}"] if lora_scale is not None else []     # first: cut last
                rows.append(" / ".join([*lora, label, f"seed {seed}", prompt[:30]]))
                cells.append(hint_image)
                for scale in cfg.sample.control_scales:
                    image = images[lora_scale, scale][i]
                    scores[scale].append(edge_fidelity(image, hint, low, high)["f1"])
                    cells.append(image)
    counted.close()
    if lora_weight is not None:
        set_base_lora_weights(base, {LORA_NAME: lora_weight})
    cols = ["hint"] + [f"control x{s:g}" for s in cfg.sample.control_scales]
    save_grid(cells, len(rows), len(cols), path, row_labels=rows, col_labels=cols,
              text={PARAMETERS: first_sample_infotext(cfg, pairs[0], lora_scales[0], hints[0][1])})
    return {s: float(np.mean(v)) for s, v in scores.items()}

