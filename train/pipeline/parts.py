"""What the folder and single-file loaders share: where the shipped configs are, the prefixes of a
single file's parts, and the checks and casts every loaded part goes through."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from adapterkit.train.paths import data_dir
from adapterkit.unet import UNetConfig
from adapterkit.unet.checkpoint import CheckpointError
from adapterkit.unet.families import FAMILIES

CONFIGS = data_dir("configs")


# Prefixes of a single-file checkpoint's non-U-Net parts (formats.md §2.1).
VAE_PREFIXES = ("first_stage_model.", "vae.")


TEXT_PREFIXES = tuple(dict.fromkeys(te.ldm_prefix.split(".")[0] + "." for f in FAMILIES.values()
                                    for te in f.text_encoders))       # cond_stage_model., conditioner.


PIXEL_PATCHES = (1, 2, 4)


class UnsupportedCheckpoint(CheckpointError, NotImplementedError):
    """A model of a kind adapterkit cannot load yet (SD2 or SDXL single files, SDXL pipelines)."""


def load_tokenizer(folder: Path, cls):
    if (folder / "tokenizer").is_dir() and not (folder / "vocab.json").is_file():
        folder = folder / "tokenizer"          # a pipeline folder was given
    has_files = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    if not folder.is_dir() or not has_files:
        raise CheckpointError(f"{folder} holds no CLIP tokenizer: expected vocab.json + merges.txt or "
                              f"tokenizer.json{'; it holds ' + listing(folder) if folder.is_dir() else ''}.")
    return library_call(folder, lambda: cls.from_pretrained(folder, local_files_only=True))


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
