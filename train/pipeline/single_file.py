"""Single-file checkpoints (formats.md §2.1) as the parts of a base.

The U-Net goes through `unet.load_unet`; the VAE from `first_stage_model.*` (or `vae.*`) through
diffusers' `convert_ldm_vae_checkpoint`; the CLIP text encoder from `cond_stage_model.transformer.*`,
whose names are transformers' own. Such a file holds no tokenizer and no component configs: the
caller passes `tokenizer=`; the configs default to the standard ones the family ships in
`configs/base/<family>/` and `config_dir=` overrides them. A family whose files this module cannot
convert yet is refused with `UnsupportedCheckpoint`, naming what to do instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from adapterkit.train.pipeline.parts import (
    CONFIGS,
    TEXT_PREFIXES,
    VAE_PREFIXES,
    UnsupportedCheckpoint,
    check_finite,
    few,
    is_pixel_space,
    load_tokenizer,
    move_to,
    read_json,
    vae_dtype,
)
from adapterkit.unet import load_unet, read_weights
from adapterkit.unet.checkpoint import CheckpointError
from adapterkit.unet.families import Family, family_of, family_of_single_file


def from_single_file(path: Path, allow_pickle: bool, dtype, device, tokenizer, prediction_type,
                      config_dir: Path | None):
    from transformers import CLIPTokenizer

    if config_dir is not None and not config_dir.is_dir():
        raise CheckpointError(f"config_dir {config_dir} is not a folder")
    if tokenizer is None and not (config_dir is not None and (config_dir / "tokenizer").is_dir()):
        raise CheckpointError(
            f"{path} is a single-file checkpoint, and those do not contain a tokenizer: pass tokenizer= a "
            "local folder with the CLIP tokenizer files (vocab.json + merges.txt), e.g. the tokenizer/ "
            "folder of any diffusers SD1.x pipeline (they all use openai/clip-vit-large-patch14's).")
    parts, _ = read_weights(path, allow_pickle=allow_pickle,
                            keep=lambda k: k.startswith((*VAE_PREFIXES, *TEXT_PREFIXES)))
    holds = family_of_single_file(parts)
    if holds is not None and not holds.loads:
        prefix = holds.text_encoders[0].ldm_prefix.split(".")[0]
        raise UnsupportedCheckpoint(f"{path} is an {holds.title} checkpoint ({prefix}.* text encoders); "
                                    f"adapterkit cannot load {holds.title} base models yet.")
    openclip = [te for te in holds.text_encoders if te.openclip] if holds is not None else []
    if openclip:                                         # no converter of OpenCLIP names yet
        raise UnsupportedCheckpoint(
            f"{path} is an {holds.title} single file (OpenCLIP text encoder under "
            f"{openclip[0].ldm_prefix}*), which load_base cannot convert yet. Use the model's diffusers "
            "folder instead (or convert the file once with a tool you trust, e.g. diffusers' "
            "from_single_file with a local config, then save_pretrained)." + ("" if holds.prediction else
                                   " The folder's scheduler config also supplies the prediction type "
                                   f"({holds.title} weights do not show it); without one, pass "
                                   "prediction_type=."))
    unet = load_unet(path, allow_pickle=allow_pickle, dtype=dtype, device=device)
    family = family_of(unet.config)
    if any(te.openclip for te in family.text_encoders):
        raise UnsupportedCheckpoint(f"{path} has an {family.title} U-Net (context {family.context_dim}) but "
                                    f"no text encoder under {family.text_encoders[0].ldm_prefix}*; load its "
                                    "diffusers folder instead.")
    clip_prefix = family.text_encoders[0].ldm_prefix
    clip = {k[len(clip_prefix):]: v for k, v in parts.items() if k.startswith(clip_prefix)}
    vae_state = {k: v for k, v in parts.items() if k.startswith(VAE_PREFIXES)}
    if not clip:
        raise CheckpointError(f"{path} holds no text encoder (no {clip_prefix}* tensors): it is a U-Net-only "
                              "or pruned file. Load the full checkpoint or the model's diffusers folder.")
    if not vae_state and not is_pixel_space(unet.config):
        raise CheckpointError(f"{path} holds no VAE (no first_stage_model.* or vae.* tensors), and its U-Net "
                              "works on latents. Load the full checkpoint or the model's diffusers folder.")
    configs = config_dir if config_dir is not None else CONFIGS / "base" / (family.configs or family.name)
    vae = None
    if vae_state:
        vae = _vae_from_ldm(vae_state, _component_config(configs, "vae", path, family), path)
        vae = move_to(vae, device, vae_dtype(vae, dtype))
    text_encoder = _clip_from_ldm(clip, _component_config(configs, "text_encoder", path, family), path,
                                  clip_prefix)
    text_encoder = move_to(text_encoder, device, dtype)
    tok_dir = Path(tokenizer) if tokenizer is not None else config_dir / "tokenizer"
    tok = load_tokenizer(tok_dir, CLIPTokenizer)
    scheduler_file = (config_dir / "scheduler" / "scheduler_config.json") if config_dir is not None else None
    scheduler = read_json(scheduler_file, "the scheduler config") \
        if scheduler_file is not None and scheduler_file.is_file() else None
    return unet, vae, text_encoder, tok, scheduler


def _component_config(configs: Path, part: str, path: Path, family: Family) -> tuple[dict, Path]:
    f = configs / part / "config.json"
    if not f.is_file():
        where = f"config_dir {configs} has no {part}/config.json" if not configs.is_relative_to(CONFIGS) \
            else f"adapterkit ships no default {part} config for the '{family.name}' model family"
        raise CheckpointError(f"{path}: a single file does not hold its {part} config, and {where}. Pass "
                              "config_dir= a diffusers folder of this model (its config files are enough).")
    return {k: v for k, v in read_json(f, f"the {part} config").items() if not k.startswith("_")}, f


def _vae_from_ldm(state: dict[str, Tensor], config: tuple[dict, Path], path: Path):
    """LDM VAE tensors -> diffusers AutoencoderKL, through diffusers' own key conversion."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, cfg_file = config
    # LDM training files may carry the autoencoder's LPIPS/discriminator loss; not part of the model.
    state = {k: v for k, v in state.items() if ".loss." not in f".{k}"}
    converted = convert_ldm_vae_checkpoint(dict(state), cfg)
    # The converter skips names it does not know without a word. Its outputs are the input tensors
    # (or views of them, for the attention projections), so shared storage says which inputs it placed.
    placed = {v.untyped_storage().data_ptr() for v in converted.values()}
    unplaced = sorted(k for k, v in state.items() if v.untyped_storage().data_ptr() not in placed)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    _check_state(converted, vae, path, "VAE (first_stage_model.*)", cfg_file, unplaced)
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae.float()


def _clip_from_ldm(state: dict[str, Tensor], config: tuple[dict, Path], path: Path, prefix: str):
    """`cond_stage_model.transformer.*` tensors -> transformers CLIPTextModel. The names are
    transformers' own; only the `text_model.` level differs between versions (v5 dropped it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg, cfg_file = config
    config_obj = CLIPTextConfig(**cfg)
    with torch.device("meta"):
        reference = CLIPTextModel(config_obj)
    expected = reference.state_dict()
    model_prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    renamed = {}
    for k, v in state.items():
        name = model_prefix + k.removeprefix("text_model.")
        if name.endswith("position_ids") and name not in expected:
            continue                 # a buffer older files saved; recomputed by the model
        renamed[name] = v
    _check_state(renamed, reference, path, f"text encoder ({prefix}*)", cfg_file, [])
    # from_pretrained(None, state_dict=...) builds without random init and restores the non-persistent
    # buffers; every key was checked above (it would silently random-init a missing one).
    return CLIPTextModel.from_pretrained(None, config=config_obj, state_dict=renamed, local_files_only=True)


def _check_state(state: dict[str, Tensor], model: nn.Module, path: Path, part: str, cfg_file: Path,
                 unplaced: list[str]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected] + unplaced
    wrong = [f"{k}: expected {list(s)}, found {list(state[k].shape)}"
             for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    problems = [f"{len(v)} {what} ({few(v)})" for v, what in
                ((missing, "missing tensors"), (unexpected, "tensors that have no place"),
                 (wrong, "tensors of the wrong shape")) if v]
    if problems:
        raise CheckpointError(f"the {part} in {path} does not fit the config {cfg_file}: "
                              f"{'; '.join(problems)}. If the model's parts are not the standard SD1.x "
                              "ones, pass config_dir= a diffusers folder of this model (its config files "
                              "are enough).")
    check_finite(state, path, part)

