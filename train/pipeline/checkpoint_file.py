"""Whole single-file checkpoints: a base's U-Net, VAE and text encoder(s) in one .safetensors, in the
names AUTOMATIC1111's and ComfyUI's checkpoint loaders read (formats.md §2.1; names: ldm_names.py).

    model.diffusion_model.*                  U-Net in LDM names (unet/ldm_keys.py)
    first_stage_model.*                      VAE in the CompVis autoencoder's names
    cond_stage_model.transformer.text_model.*   SD1.x: CLIP ViT-L
    cond_stage_model.model.*                 SD2.x: OpenCLIP ViT-H
    conditioner.embedders.0.transformer.text_model.*, conditioner.embedders.1.model.*   SDXL

A1111 (modules/sd_models_config.py guess_model_config_from_state_dict) and ComfyUI
(comfy/model_detection.py, supported_models.py) tell the family from these prefixes and the U-Net's
shapes, and take the VAE from `first_stage_model.`: a file without it loads with a zero-filled (A1111) or
missing (ComfyUI) VAE. This module writes the inverse of what single_file.py reads, so the same file
loads back through `load_base` as well as through diffusers' `from_single_file`.

SD2.x caveat: diffusers' SD2 text encoder is OpenCLIP ViT-H cut below its last block (23 of 24) and
without the projection; the file holds what the folder holds, and both clients read the penultimate
block's output, which that is.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from adapterkit.train.pipeline.ldm_names import text_encoder_to_ldm, vae_to_ldm
from adapterkit.train.pipeline.single_file import MODELSPEC_PREDICTION
from adapterkit.unet.checkpoint import ldm_tensors
from adapterkit.unet.families import TextEncoder
from adapterkit.unet.weights import write_safetensors

VAE_PREFIX = "first_stage_model."

# ModelSpec's names for the prediction types: the inverse of what single_file.file_schedule reads.
_MODELSPEC_PREDICTION = {ours: theirs for theirs, ours in MODELSPEC_PREDICTION.items()}


def checkpoint_tensors(unet: nn.Module, vae: nn.Module | None = None,
                       text: Sequence[tuple[TextEncoder, nn.Module]] = (), dtype: torch.dtype | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a whole checkpoint: the U-Net in LDM names, the VAE (if the base has one;
    a pixel-space base has none) under `first_stage_model.`, each text encoder under its family row's
    prefix. `dtype` casts every floating tensor (None keeps each module's)."""
    tensors, metadata = ldm_tensors(unet, dtype)
    if vae is not None:
        tensors |= {VAE_PREFIX + k: v for k, v in vae_to_ldm(_cpu(vae.state_dict(), dtype)).items()}
    for spec, model in text:
        tensors |= text_encoder_to_ldm(_cpu(model.state_dict(), dtype), spec)
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def write_checkpoint(path: str | os.PathLike, unet: nn.Module, vae: nn.Module | None = None,
                     text: Sequence[tuple[TextEncoder, nn.Module]] = (), *, dtype: torch.dtype | None = None,
                     keep: Mapping[str, Tensor] | None = None, prediction_type: str | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a whole checkpoint atomically (nothing at `path` changes unless the write completes).

    keep: tensors already in single-file names to carry over as they are (a single-file base's VAE and
        the text encoders no merge touched, its `v_pred`/`ztsnr` markers); the parts given as modules
        replace any of the same names.
    prediction_type: the base's, recorded as ModelSpec's `modelspec.prediction_type`.
    metadata: more header strings (the record of merged adapters, adapters/merge_record.py).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a single-file checkpoint must end in .safetensors, got {path.name!r}")
    tensors, header = checkpoint_tensors(unet, vae, text, dtype)
    if keep:
        tensors = _cpu(keep, dtype) | tensors
    if prediction_type in _MODELSPEC_PREDICTION:
        header["modelspec.prediction_type"] = _MODELSPEC_PREDICTION[prediction_type]
    write_safetensors(tensors, path, header | dict(metadata or {}))
    return path


def _cpu(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in state.items()}
