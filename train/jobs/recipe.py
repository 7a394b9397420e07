"""The recipe sections every training job has (model, optim, train), and the recipe as shared files
record it (no personal paths)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

import torch

from adapterkit.train.config import to_dict
from adapterkit.train.data.folder import DataConfig
from adapterkit.train.jobs.trackers import check_trackers
from adapterkit.train.pipeline.schedule import TimestepSampling

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" / "fp16" / "fp32" of a torch dtype (DTYPES backwards)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


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
    """The optimizer and LR schedule (train/jobs/optimizer.py says what each choice is)."""
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    lr: float = 1e-4                                # Prodigy: a multiplier of its own estimate, ~1.0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)       # adamw, adamw8bit, prodigy
    eps: float = 1e-8                               # adamw, adamw8bit, prodigy
    schedule: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial",
                      "linear"] = "constant"
    warmup_steps: int = 0                           # every schedule, constant too
    restarts: int = 1                               # cosine_with_restarts: the number of cosine cycles
    power: float = 1.0                              # polynomial
    lr_end: float = 1e-7                            # polynomial: the LR at the last step
    max_grad_norm: float = 1.0                      # 0 disables clipping

    def __post_init__(self):
        defaults = OptimConfig.__dataclass_fields__
        if self.optimizer == "adafactor":
            extra = [f for f in ("betas", "eps") if getattr(self, f) != defaults[f].default]
            if extra:
                raise ValueError(f"{', '.join(extra)} do not apply to optimizer adafactor (its moments are "
                                 "factored, with transformers' own eps): remove them")
        if self.schedule == "polynomial" and self.lr_end > self.lr:
            raise ValueError(f"lr_end ({self.lr_end:g}) must not exceed lr ({self.lr:g}) for the "
                             "polynomial schedule")


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 4                             # per process, per micro-batch
    grad_accum: int = 1
    seed: int = 0
    min_snr_gamma: float | None = 5.0               # Hang et al. 2023; None = plain MSE
    debiased_estimation: bool = False               # weight the loss by 1/sqrt(SNR) (kohya's flag), x min-SNR
    # Which timesteps a batch draws (train/pipeline/schedule.py TimestepSampling): uniform (today), the
    # SD3 paper's logit_normal (logit_mean, logit_std) or mode (mode_scale), inside
    # [min_timestep, max_timestep) (None: the schedule's num_train_timesteps).
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    min_timestep: int = 0
    max_timestep: int | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
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

    def __post_init__(self):
        self.timesteps()                                 # the sampling's own checks, with this path
        if self.max_timestep is not None and self.min_timestep >= self.max_timestep:
            raise ValueError(f"min_timestep ({self.min_timestep}) must be below max_timestep "
                             f"({self.max_timestep}): the range is [min_timestep, max_timestep)")

    def timesteps(self) -> TimestepSampling:
        return TimestepSampling(self.timestep_sampling, self.min_timestep, self.max_timestep,
                                self.logit_mean, self.logit_std, self.mode_scale)


@dataclass(frozen=True)
class OutputConfig:
    """What every job writes and when; a job's own section adds its file names and formats."""
    dir: str = "out"
    checkpoint_every: int = 250                     # 0 = only at the end (and on a signal)
    keep_checkpoints: int = 3
    log_every: int = 10                             # the trackers every N steps (0: the last only)
    # accelerate's trackers (train/jobs/trackers.py): tensorboard, wandb (offline unless WANDB_MODE), none
    trackers: tuple[Literal["tensorboard", "wandb", "none"], ...] = ("tensorboard",)

    def __post_init__(self):
        check_trackers(self.trackers)


@dataclass(frozen=True)
class SampleConfig:
    """The preview samples every job draws; a job's own section adds its grid's columns."""
    every: int = 0                                  # 0 = only at the end
    prompts: tuple[str, ...] = ()                   # no prompts: no samples
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float = 7.5
    sampler: Literal["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"] = "ddim"   # sampling.SAMPLERS


@dataclass(frozen=True)
class JobRecipe:
    """The sections every adapter job's recipe has; a job adds its own (lora:, control:) and narrows
    output: and sample: to its kinds of files and grids."""
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


PRIVATE_PATHS = ("data.root", "data.validation.folder", "model.base", "model.tokenizer", "model.config_dir",
                 "output.dir")


def public_recipe(cfg: Any, paths: Sequence[str] = PRIVATE_PATHS) -> dict:
    """The recipe as a dict for a shared file's metadata: each dotted key in `paths` cut to its last
    path component, and so is any other absolute path in it (sample.hints, a LoRA file): nothing
    personal, no full path."""
    recipe = to_dict(cfg)
    for dotted in paths:
        *parents, key = dotted.split(".")
        d = recipe
        for p in parents:
            d = d.get(p) or {}
        if d.get(key) is not None:
            d[key] = Path(str(d[key])).name
    for entry in (recipe.get("data") or {}).get("datasets") or ():      # data.datasets[i].root too
        entry["root"] = Path(str(entry["root"])).name
    return _names_only(recipe)


def _names_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or PureWindowsPath(value).is_absolute()):
        return Path(value).name if not PureWindowsPath(value).drive else PureWindowsPath(value).name
    return value


def flat_dict(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b": value}, a list of dicts by index ("data.datasets.0.root"); non-scalars
    as strings (TensorBoard's hparams take scalars and strings only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat_dict(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):   # data.datasets
            for i, x in enumerate(v):
                out |= flat_dict(x, f"{prefix}{k}.{i}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out

