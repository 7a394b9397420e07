"""What the folder and single-file loaders share: where the shipped configs are, the prefixes of a
single file's parts, the records they fill (`TextPart`, `Parts`), and the checks and casts every loaded
part goes through."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterkit.train.paths import data_dir
from adapterkit.unet import UNetConfig
from adapterkit.unet.families import FAMILIES, TextEncoder
from adapterkit.unet.weights import CheckpointError

CONFIGS = data_dir("configs")


# Prefixes of a single-file checkpoint's non-U-Net parts (formats.md §2.1).
VAE_PREFIXES = ("first_stage_model.", "vae.")


TEXT_PREFIXES = tuple(dict.fromkeys(te.ldm_prefix.split(".")[0] + "." for f in FAMILIES.values()
                                    for te in f.text_encoders))       # cond_stage_model., conditioner.


PIXEL_PATCHES = (1, 2, 4)


class UnsupportedCheckpoint(CheckpointError, NotImplementedError):
    """A model of a kind adapterkit cannot load (SD2.x single files, SDXL refiners)."""


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a base: its family row (`spec`: subfolders, which hidden states condition the
    U-Net, whether its pooled output does), the transformers model and its tokenizer."""
    spec: TextEncoder
    model: Any                        # transformers CLIPTextModel | CLIPTextModelWithProjection
    tokenizer: Any                    # transformers CLIPTokenizer

    @property
    def max_length(self) -> int:
        """Tokens per prompt, start and end tokens included (77 for SD)."""
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size


@dataclass
class Parts:
    """What a loader found, before load_base checks that the parts agree and freezes them.

    scheduler: the scheduler config found beside the weights, or None (the family default applies).
    prediction_type, zero_snr: what a single file's metadata or marker tensors say of its noise schedule
        (None / False where they say nothing).
    empty_prompt_zeros: the pipeline's `force_zeros_for_empty_prompt`.
    """
    unet: Any
    vae: Any
    text: tuple[TextPart, ...]
    scheduler: dict | None
    pixel_patch: int = 1
    prediction_type: str | None = None
    zero_snr: bool = False
    empty_prompt_zeros: bool = False


def refiner_message(path: Path, evidence: str) -> str:
    """Why an SDXL refiner is refused, and what to load instead."""
    return (f"{path} is an SDXL refiner ({evidence}): one text encoder (OpenCLIP bigG) and a U-Net whose "
            "added embedding takes 5 ids (original size, crop, aesthetic score; 2560 inputs) instead of the "
            "base's 6 (2816). adapterkit trains and samples on SDXL base models: load the base model "
            "(stable-diffusion-xl-base-1.0 or a model made from it).")


def load_tokenizer(folder: Path, cls, subfolder: str = "tokenizer", **overrides):
    """The tokenizer in `folder`, or in `folder/subfolder` when `folder` is a pipeline folder.
    `overrides` (special tokens) replace the saved settings."""
    if (folder / subfolder).is_dir() and not (folder / "vocab.json").is_file():
        folder = folder / subfolder            # a pipeline folder was given
    has_files = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    if not folder.is_dir() or not has_files:
        raise CheckpointError(f"{folder} holds no CLIP tokenizer: expected vocab.json + merges.txt or "
                              f"tokenizer.json{'; it holds ' + listing(folder) if folder.is_dir() else ''}.")
    return library_call(folder, lambda: cls.from_pretrained(folder, local_files_only=True, **overrides))


def check_finite(state: dict[str, Tensor], where: Path, part: str = "") -> None:
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} values)" for k, v in state.items()
           if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float32))
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}{' ' + part if part else ''} has NaN or inf values in {len(bad)} "
                              f"tensors: {few(bad)}. The weights are corrupt; use another copy.")


def is_pixel_space(cfg: UNetConfig, patch: int = 1) -> bool:
    return patch in PIXEL_PATCHES and cfg.in_channels == cfg.out_channels == 3 * patch**2


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """SD VAEs overflow in float16 (reliability.md §3.4): diffusers' `force_upcast` keeps them fp32."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def move_to(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move, and cast only when needed (diffusers warns about any dtype cast through `to`)."""
    module = module.to(device)
    return module.to(dtype) if module.dtype != dtype else module


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} ({what}) is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must hold a JSON object, not {type(data).__name__}")
    return data


def listing(folder: Path, n: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return (", ".join(names[:n]) + (" ..." if len(names) > n else "")) or "nothing"


def few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def library_call(where: Path, load):
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where} could not be loaded: {type(e).__name__}: {str(e)[:500]}") from e
