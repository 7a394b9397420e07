"""Base models: the frozen bundle a LoRA or ControlNet is trained on, loaded from local paths only.

    base = load_base("path/to/stable-diffusion-v1-5")                       # diffusers pipeline folder
    base = load_base("v1-5-pruned-emaonly.safetensors", tokenizer="path/to/sd15/tokenizer")
    context = encode_prompts(base, ["a red circle"])                        # (B, 77, D)
    moments = encode_moments(base, pixels)                                  # what the latent cache stores
    latents = moments_to_latents(base, moments, generator)                  # what the U-Net sees

A `BaseModel` is our U-Net plus diffusers' `AutoencoderKL`, transformers' `CLIPTextModel` and
`CLIPTokenizer`, and the noise schedule as a diffusers scheduler-config dict (DESIGN.md §5). All of
it is frozen (`requires_grad=False`, eval mode); adapters add the trainable parts.

Sources (nothing is ever fetched: every library call gets `local_files_only=True`):
- a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`): the U-Net through `unet.load_unet`, the rest through the libraries' own
  `from_pretrained`, with missing or unexpected weights turned into errors (both libraries only
  warn and leave such weights randomly initialised);
- a single-file SD1.x checkpoint (formats.md §2.1): U-Net through `load_unet`; the VAE from
  `first_stage_model.*` (or `vae.*`) through diffusers' `convert_ldm_vae_checkpoint`; the CLIP text
  encoder from `cond_stage_model.transformer.*`, whose names are transformers' own. Such a file
  holds no tokenizer and no component configs: pass `tokenizer=`; the configs default to the
  standard SD1.x ones in `configs/base/sd1/` and `config_dir=` overrides them. SD2.x single files
  (OpenCLIP text encoder) and SDXL are refused; convert them to a diffusers folder.

Family (unet/families.py; decides the default noise schedule and what a single file holds): the
U-Net's context width and projection say it: 768 with conv proj_in/out is SD1.x, 1024 with linear
projections SD2.x, anything else the tiny family (the bundled tiny model and test-sized U-Nets).
Whether an SD2 model predicts epsilon (512-base) or v (768-v) is not in its weights; without a
scheduler config it must be given as `prediction_type=`.

VAE latents: `encode_moments` returns the posterior's (mean, logvar), unscaled, and the cache
stores exactly that. `moments_to_latents` then draws z = mean + exp(logvar / 2) * noise with the
training step's generator and applies (z - shift_factor) * scaling_factor. Why not cache one
sample (kohya) or the mean: a cached sample freezes one posterior draw for every epoch and the mean
drops the posterior noise altogether, so either makes cached training differ from uncached
training. Caching the moments keeps the two bit-identical for the same generator (the cache is a
pure speed-up, and "cached == fresh" is a testable identity) at twice the latent storage, which is
small next to the images.

Pixel-space models (the bundled tiny base): no vae/; the U-Net works on the pixels themselves,
each p x p patch folded into 3 p^2 channels (`pixel_patch`, from `_adapterkit_pixel_patch` in
model_index.json; 1 = plain RGB). Folding by 2 makes a 64 px picture a 32 x 32 x 12 "latent", so
the `tiny` preset runs at its native 32 x 32 at a quarter of the cost of working on 64 x 64 pixels,
and unlike a small VAE it loses nothing (stripes 3 px apart survive).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.train.paths import data_dir
from adapterkit.unet import UNet, UNetConfig, load_unet, read_weights, unet_fingerprint
from adapterkit.unet.checkpoint import CheckpointError
from adapterkit.unet.families import FAMILIES, SD1, Family, family_named, family_of, family_of_single_file

logger = logging.getLogger(__name__)

CONFIGS = data_dir("configs")
PREDICTION_TYPES = ("epsilon", "v_prediction")     # what train/pipeline/schedule.py trains; not x0 ("sample")
# Prefixes of a single-file checkpoint's non-U-Net parts (formats.md §2.1).
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_PREFIXES = tuple(dict.fromkeys(te.ldm_prefix.split(".")[0] + "." for f in FAMILIES.values()
                                    for te in f.text_encoders))       # cond_stage_model., conditioner.
PIXEL_PATCH_KEY = "_adapterkit_pixel_patch"        # model_index.json of a pixel-space model without vae/
PIXEL_PATCHES = (1, 2, 4)
# Classes a pipeline folder may name for each part (model_index.json); others are refused.
COMPONENT_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
}
# Weight files of the library-loaded parts, in order of preference: (file name, variant).
_WEIGHTS = {
    "vae": (("diffusion_pytorch_model.safetensors", None),
            ("diffusion_pytorch_model.safetensors.index.json", None),
            ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
            ("diffusion_pytorch_model.bin", None), ("diffusion_pytorch_model.fp16.bin", "fp16")),
    "text_encoder": (("model.safetensors", None), ("model.safetensors.index.json", None),
                     ("model.fp16.safetensors", "fp16"), ("pytorch_model.bin", None),
                     ("pytorch_model.fp16.bin", "fp16")),
}


class UnsupportedCheckpoint(CheckpointError, NotImplementedError):
    """A model of a kind adapterkit cannot load yet (SD2 or SDXL single files, SDXL pipelines)."""


@dataclass(frozen=True)
class Fingerprint:
    """Identity of each weighted part. `unet` is `unet.unet_fingerprint`, the value adapter files
    record as their base; `vae` (None for a pixel-space model) and `text_encoder` (which covers the
    tokenizer too) key the latent and text-embedding caches."""
    unet: str
    vae: str | None
    text_encoder: str

    def __str__(self) -> str:
        return f"unet {self.unet}, vae {self.vae or '-'}, text encoder {self.text_encoder}"


@dataclass(eq=False)
class BaseModel:
    """A loaded base model. `vae` is None only for a pixel-space U-Net, which works on the image's
    pixels folded into channels: `pixel_patch` p (1, 2, 4) puts each p x p patch of RGB pixels into
    3 p^2 channels (`F.pixel_unshuffle`), an exact, lossless "VAE" that downsamples p x."""
    unet: UNet
    vae: Any                          # diffusers AutoencoderKL | None
    text_encoder: Any                 # transformers CLIPTextModel
    tokenizer: Any                    # transformers CLIPTokenizer
    scheduler_config: dict
    family: Family
    fingerprint: Fingerprint
    source: Path | None = None
    pixel_patch: int = 1
    _truncation_warned: set[str] = field(default_factory=set, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def max_length(self) -> int:
        """Tokens per prompt, start and end tokens included (77 for SD)."""
        return min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel along each side (8 for SD; `pixel_patch` without a VAE)."""
        if self.vae is None:
            return self.pixel_patch
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels if self.vae is not None else self.unet.config.in_channels


# --- loading ---------------------------------------------------------------------------------------

def load_base(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", allow_pickle: bool = False,
              tokenizer: str | os.PathLike | None = None, prediction_type: str | None = None,
              config_dir: str | os.PathLike | None = None) -> BaseModel:
    """Load a base model from a local diffusers pipeline folder or a single-file SD1.x checkpoint.

    dtype, device: where every part ends up. Under float16 a VAE whose config sets `force_upcast`
        (diffusers' default, and what the SD VAEs need to stay finite) is kept in float32.
    allow_pickle: read `.ckpt`/`.bin` weights, with `torch.load(weights_only=True)` only.
    tokenizer: for a single file (which holds none): a folder with the CLIP tokenizer files
        (vocab.json + merges.txt, or tokenizer.json), or a pipeline folder with tokenizer/ inside.
    prediction_type: "epsilon" | "v_prediction"; overrides the scheduler config's, and is
        required for an SD2 model that has no scheduler config.
    config_dir: for a single file: a diffusers pipeline folder (weights not needed) whose
        vae/config.json, text_encoder/config.json, scheduler/scheduler_config.json and tokenizer/
        describe the file's parts; default: the standard SD1.x configs shipped in configs/base/sd1/.

    Raises CheckpointError naming the path and what is missing or wrong; UnsupportedCheckpoint
    (also a NotImplementedError) for SD2/SDXL single files and SDXL pipelines.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. load_base expects a local diffusers pipeline folder "
                              "(with model_index.json) or a single-file SD checkpoint (.safetensors).")
    patch = 1
    if path.is_dir():
        unet, vae, text_encoder, tok, scheduler, patch = _from_pipeline_folder(path, allow_pickle, dtype,
                                                                               device)
    else:
        unet, vae, text_encoder, tok, scheduler = _from_single_file(
            path, allow_pickle, dtype, device, tokenizer, prediction_type,
            Path(config_dir) if config_dir is not None else None)
    family = family_of(unet.config)
    _check_parts_agree(path, unet, vae, text_encoder, tok)
    if tok.model_max_length > text_encoder.config.max_position_embeddings:
        # a tokenizer read from bare vocab.json/merges.txt has no limit (1e30); the encoder has one
        tok.model_max_length = text_encoder.config.max_position_embeddings
    scheduler = _scheduler_config(scheduler, family, prediction_type, path)
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.requires_grad_(False).eval()
    fingerprint = Fingerprint(unet_fingerprint(unet),
                              _module_fingerprint(vae, _config_text(vae.config)) if vae is not None
                              else None if patch == 1 else f"pixels/{patch}",
                              _module_fingerprint(text_encoder, _config_text(text_encoder.config.to_dict())
                                                  + _tokenizer_text(tok)))
    return BaseModel(unet, vae, text_encoder, tok, scheduler, family, fingerprint, path, patch)


def scheduler_config_named(name: str) -> dict:
    """configs/schedulers/<name>.json: a noise schedule shipped with adapterkit (a family's default,
    or one a recipe names, e.g. the tiny pretrain's "tiny-pixel")."""
    path = CONFIGS / "schedulers" / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ValueError(f"no noise schedule named {name!r}: {path} does not exist; shipped: {have}")
    return json.loads(path.read_text())


def default_scheduler_config(family: Family | str, prediction_type: str | None = None) -> dict:
    """The family's noise schedule shipped in configs/schedulers/, with `prediction_type` applied.
    A family whose weights do not say their prediction type (SD2.x: 512-base epsilon, 768-v
    v_prediction) needs it given."""
    family = family_named(family) if isinstance(family, str) else family
    cfg = scheduler_config_named(family.schedule(prediction_type))
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return cfg


# --- pipeline folders ------------------------------------------------------------------------------

def _from_pipeline_folder(folder: Path, allow_pickle: bool, dtype, device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        what = ("a single-component folder (config.json beside the weights), perhaps a U-Net alone: load "
                "that with unet.load_unet, or pass the pipeline folder above it"
                if (folder / "config.json").is_file() else f"it holds {_listing(folder)}")
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder: no model_index.json; {what}. "
                              "load_base needs model_index.json with unet/, vae/, text_encoder/, tokenizer/ "
                              "(and scheduler/) beside it, or a single-file .safetensors checkpoint.")
    index = _read_json(index_file, "the pipeline index")
    for family in FAMILIES.values():
        extra = [te.folder for te in family.text_encoders[1:]]
        named = str(index.get("_class_name", "")).startswith(family.pipeline_classes or ("-",))
        if not family.loads and (named or extra and all(p in index for p in extra)):
            raise UnsupportedCheckpoint(f"{folder} is an {family.title} pipeline "
                                        f"({index.get('_class_name')}); adapterkit cannot load {family.title}"
                                        " base models yet.")
    for part, classes in COMPONENT_CLASSES.items():
        entry = index.get(part)
        name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if name is not None and name not in classes:
            raise UnsupportedCheckpoint(f"{index_file} names {name} for {part}; adapterkit loads "
                                        f"{' or '.join(sorted(classes))} there.")
    has_vae = (folder / "vae").is_dir()
    missing = [f"{p}/" for p in ("unet", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(f"the pipeline folder {folder} has no {', '.join(missing)} (it holds "
                              f"{_listing(folder)}); a base model needs the U-Net, the text encoder and "
                              "its tokenizer. Copy the missing subfolders from the model's source.")

    unet = load_unet(folder / "unet", allow_pickle=allow_pickle, dtype=dtype, device=device)
    vae, patch = None, 1
    if has_vae:
        found = _check_weights(folder / "vae", "vae", allow_pickle)
        vae, info = _library_call(folder / "vae", lambda: AutoencoderKL.from_pretrained(
            folder / "vae", local_files_only=True, output_loading_info=True, **found))
        _check_loading_info(folder / "vae", info)
        vae = _to(vae, device, _vae_dtype(vae, dtype))
    else:
        patch = index.get(PIXEL_PATCH_KEY, 1)
        if not _pixel_space(unet.config, patch):
            raise CheckpointError(
                f"the pipeline folder {folder} has no vae/, and its U-Net works on "
                f"{unet.config.in_channels}-channel latents, so it needs one (a pixel-space model has 3 "
                f"channels, or 3 p^2 with \"{PIXEL_PATCH_KEY}\": p in model_index.json; this one says "
                f"{patch}). Copy vae/ from the model's source.")
    found = _check_weights(folder / "text_encoder", "text_encoder", allow_pickle)
    text_encoder, info = _library_call(folder / "text_encoder", lambda: CLIPTextModel.from_pretrained(
        folder / "text_encoder", local_files_only=True, output_loading_info=True, **found))
    _check_loading_info(folder / "text_encoder", info)
    text_encoder = _to(text_encoder, device, dtype)
    tok = _load_tokenizer(folder / "tokenizer", CLIPTokenizer)
    scheduler = None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler = _read_json(scheduler_file, "the scheduler config")
    else:
        logger.warning("%s has no scheduler/scheduler_config.json; using the model family's default "
                       "noise schedule from configs/schedulers/", folder)
    for module, part in ((vae, "vae"), (text_encoder, "text_encoder")):
        if module is not None:
            _check_finite(module.state_dict(), folder / part)
    return unet, vae, text_encoder, tok, scheduler, patch


def _check_weights(folder: Path, part: str, allow_pickle: bool) -> dict:
    """Find the part's weights and classify them (via `read_weights`, reading no tensor) so an LFS
    pointer, an HTML page, a truncated file or an unwanted pickle gets our message. Returns the
    from_pretrained arguments that select that file."""
    for name, variant in _WEIGHTS[part]:
        f = folder / name
        if not f.is_file():
            continue
        files = [f]
        if name.endswith(".index.json"):
            weight_map = _read_json(f, "the shard index").get("weight_map", {})
            files = [folder / n for n in dict.fromkeys(weight_map.values())]
            absent = [p.name for p in files if not p.is_file()]
            if absent:
                raise CheckpointError(f"{f} lists shards missing from {folder}: {', '.join(absent)}")
        for w in files:
            read_weights(w, allow_pickle=allow_pickle, keep=lambda k: False)
        return {"use_safetensors": not name.endswith(".bin"), "variant": variant}
    raise CheckpointError(f"{folder} has no {part} weights: looked for "
                          f"{', '.join(n for n, _ in _WEIGHTS[part])}; it holds {_listing(folder)}.")


def _library_call(where: Path, load):
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where} could not be loaded: {type(e).__name__}: {str(e)[:500]}") from e


def _check_loading_info(where: Path, info: dict) -> None:
    """transformers and diffusers leave missing weights randomly initialised with only a warning."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith("position_ids"))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    problems = [f"{len(v)} {what} ({_few(v)})" for v, what in
                ((missing, "missing tensors"), (unexpected, "unexpected tensors"),
                 (mismatched, "tensors of the wrong shape")) if v]
    if problems:
        raise CheckpointError(f"the weights in {where} do not fit its config.json: {'; '.join(problems)}. "
                              "The folder is incomplete or mixes files from different models.")


def _load_tokenizer(folder: Path, cls):
    if (folder / "tokenizer").is_dir() and not (folder / "vocab.json").is_file():
        folder = folder / "tokenizer"          # a pipeline folder was given
    has_files = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    if not folder.is_dir() or not has_files:
        raise CheckpointError(f"{folder} holds no CLIP tokenizer: expected vocab.json + merges.txt or "
                              f"tokenizer.json{'; it holds ' + _listing(folder) if folder.is_dir() else ''}.")
    return _library_call(folder, lambda: cls.from_pretrained(folder, local_files_only=True))


# --- single files ----------------------------------------------------------------------------------

def _from_single_file(path: Path, allow_pickle: bool, dtype, device, tokenizer, prediction_type,
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
    if holds is not None and holds is not SD1:           # SD2.x: OpenCLIP names, no converter of ours yet
        prefix = holds.text_encoders[0].ldm_prefix
        raise UnsupportedCheckpoint(
            f"{path} is an {holds.title} single file (OpenCLIP text encoder under {prefix}*), which "
            "load_base cannot convert yet. Use the model's diffusers folder instead (or convert the file "
            "once with a tool you trust, e.g. diffusers' StableDiffusionPipeline.from_single_file with a "
            "local config, then save_pretrained). The folder's scheduler config also supplies the "
            "prediction type (epsilon for 512-base, v_prediction for 768-v), which SD2 weights do not "
            "show; without one, pass prediction_type=.")
    unet = load_unet(path, allow_pickle=allow_pickle, dtype=dtype, device=device)
    family = family_of(unet.config)
    if family.text_encoders[0].ldm_prefix != SD1.text_encoders[0].ldm_prefix:
        raise UnsupportedCheckpoint(f"{path} has an {family.title} U-Net (context {family.context_dim}) but "
                                    f"no text encoder under {family.text_encoders[0].ldm_prefix}*; load its "
                                    "diffusers folder instead.")
    clip_prefix = family.text_encoders[0].ldm_prefix
    clip = {k[len(clip_prefix):]: v for k, v in parts.items() if k.startswith(clip_prefix)}
    vae_state = {k: v for k, v in parts.items() if k.startswith(VAE_PREFIXES)}
    if not clip:
        raise CheckpointError(f"{path} holds no text encoder (no {clip_prefix}* tensors): it is a U-Net-only "
                              "or pruned file. Load the full checkpoint or the model's diffusers folder.")
    if not vae_state and not _pixel_space(unet.config):
        raise CheckpointError(f"{path} holds no VAE (no first_stage_model.* or vae.* tensors), and its U-Net "
                              "works on latents. Load the full checkpoint or the model's diffusers folder.")
    configs = config_dir if config_dir is not None else CONFIGS / "base" / (family.configs or family.name)
    vae = None
    if vae_state:
        vae = _vae_from_ldm(vae_state, _component_config(configs, "vae", path, family), path)
        vae = _to(vae, device, _vae_dtype(vae, dtype))
    text_encoder = _clip_from_ldm(clip, _component_config(configs, "text_encoder", path, family), path,
                                  clip_prefix)
    text_encoder = _to(text_encoder, device, dtype)
    tok_dir = Path(tokenizer) if tokenizer is not None else config_dir / "tokenizer"
    tok = _load_tokenizer(tok_dir, CLIPTokenizer)
    scheduler_file = (config_dir / "scheduler" / "scheduler_config.json") if config_dir is not None else None
    scheduler = _read_json(scheduler_file, "the scheduler config") \
        if scheduler_file is not None and scheduler_file.is_file() else None
    return unet, vae, text_encoder, tok, scheduler


def _component_config(configs: Path, part: str, path: Path, family: Family) -> tuple[dict, Path]:
    f = configs / part / "config.json"
    if not f.is_file():
        where = f"config_dir {configs} has no {part}/config.json" if not configs.is_relative_to(CONFIGS) \
            else f"adapterkit ships no default {part} config for the '{family.name}' model family"
        raise CheckpointError(f"{path}: a single file does not hold its {part} config, and {where}. Pass "
                              "config_dir= a diffusers folder of this model (its config files are enough).")
    return {k: v for k, v in _read_json(f, f"the {part} config").items() if not k.startswith("_")}, f


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
    problems = [f"{len(v)} {what} ({_few(v)})" for v, what in
                ((missing, "missing tensors"), (unexpected, "tensors that have no place"),
                 (wrong, "tensors of the wrong shape")) if v]
    if problems:
        raise CheckpointError(f"the {part} in {path} does not fit the config {cfg_file}: "
                              f"{'; '.join(problems)}. If the model's parts are not the standard SD1.x "
                              "ones, pass config_dir= a diffusers folder of this model (its config files "
                              "are enough).")
    _check_finite(state, path, part)


def _check_finite(state: dict[str, Tensor], where: Path, part: str = "") -> None:
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} values)" for k, v in state.items()
           if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float32))
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}{' ' + part if part else ''} has NaN or inf values in {len(bad)} "
                              f"tensors: {_few(bad)}. The weights are corrupt; use another copy.")


# --- checks, dtypes, fingerprints -----------------------------------------------------------------

def _pixel_space(cfg: UNetConfig, patch: int = 1) -> bool:
    return patch in PIXEL_PATCHES and cfg.in_channels == cfg.out_channels == 3 * patch**2


def _check_parts_agree(path: Path, unet: UNet, vae, text_encoder, tok) -> None:
    width = text_encoder.config.hidden_size
    if width != unet.config.context_dim:
        raise CheckpointError(f"{path}: the text encoder's width is {width} but the U-Net attends to "
                              f"{unet.config.context_dim}-wide context; the parts belong to different "
                              "models.")
    if vae is not None and vae.config.latent_channels != unet.config.out_channels:
        raise CheckpointError(f"{path}: the VAE makes {vae.config.latent_channels}-channel latents but the "
                              f"U-Net predicts {unet.config.out_channels} channels; the parts do not match.")
    if len(tok) > text_encoder.config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {len(tok)} tokens but the text encoder embeds only "
                              f"{text_encoder.config.vocab_size}; pass the tokenizer made for this model.")


def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """SD VAEs overflow in float16 (reliability.md §3.4): diffusers' `force_upcast` keeps them fp32."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
        return torch.float32
    return dtype


def _to(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move, and cast only when needed (diffusers warns about any dtype cast through `to`)."""
    module = module.to(device)
    return module.to(dtype) if module.dtype != dtype else module


def _scheduler_config(found: dict | None, family: Family, prediction_type: str | None, path: Path) -> dict:
    if found is None:
        try:
            return default_scheduler_config(family, prediction_type)
        except ValueError as e:
            raise CheckpointError(f"{path} has no scheduler config, so the family default is used; "
                                  f"{e}") from None
    cfg = dict(found)
    if prediction_type is not None and cfg.get("prediction_type", "epsilon") != prediction_type:
        warnings.warn(f"{path}: prediction_type={prediction_type!r} overrides the scheduler config's "
                      f"{cfg.get('prediction_type', 'epsilon')!r}", stacklevel=3)
        cfg["prediction_type"] = prediction_type
    return cfg


def _config_text(cfg) -> str:
    return json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")
                       and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")},
                      sort_keys=True, default=str)


def _tokenizer_text(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()          # vocabulary, merges, normalizer: everything that maps text to ids
    return json.dumps(sorted(tok.get_vocab().items()))


def _module_fingerprint(module: nn.Module, extra: str) -> str:
    """`unet_fingerprint`'s sampled weight hash (any state dict works) folded with the config text."""
    arch, weights = unet_fingerprint(module).split("-")
    return f"{arch}-{hashlib.sha256((weights + extra).encode()).hexdigest()[:16]}"


# --- encoding --------------------------------------------------------------------------------------

def tokenize(base: BaseModel, prompts: list[str]) -> Tensor:
    """Token ids (B, max_length): padded to max_length, truncated with a warning, once per caption,
    that names how many tokens were dropped."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    tok, n = base.tokenizer, base.max_length
    lengths = [len(ids) for ids in tok(list(prompts), truncation=False, verbose=False).input_ids]
    for prompt, length in zip(prompts, lengths):
        if length > n and prompt not in base._truncation_warned:
            base._truncation_warned.add(prompt)
            warnings.warn(f"caption truncated: {length - n} of its {length - 2} tokens dropped (the text "
                          f"encoder reads {n - 2} plus start/end): {prompt[:80]!r}", stacklevel=3)
    return tok(list(prompts), padding="max_length", max_length=n, truncation=True,
               return_tensors="pt").input_ids


def encode_prompts(base: BaseModel, prompts: list[str]) -> Tensor:
    """Text embeddings (B, max_length, D): the text encoder's last hidden state (after the final
    layer norm), as StableDiffusionPipeline.encode_prompt computes it without clip_skip."""
    ids = tokenize(base, prompts)
    te = base.text_encoder
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in te.parameters())):
        return te(ids.to(te.device))[0]                                  # (B, L, D)


def encode_moments(base: BaseModel, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
    """(mean, logvar) of the VAE posterior for pixels (B, 3, H, W) in [-1, 1]; unscaled, in the
    VAE's dtype, each (B, C, H/f, W/f). Without a VAE: (the pixels folded into channels by
    `pixel_patch`, None)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    f = base.latent_scale
    if pixels.shape[-1] % f or pixels.shape[-2] % f:
        raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the VAE's factor {f}")
    if base.vae is None:
        return F.pixel_unshuffle(pixels, base.pixel_patch), None
    vae = base.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.logvar                      # logvar clamped to [-30, 20] by diffusers


def moments_to_latents(base: BaseModel, moments: tuple[Tensor, Tensor | None],
                       generator: torch.Generator | None = None) -> Tensor:
    """Scaled float32 latents from posterior moments: a sample drawn with `generator`, or the mean
    when it is None. The noise is drawn on the generator's device in float32 and then moved, so one
    seed gives one latent on any device (diffusers' randn_tensor does the same)."""
    mean, logvar = moments
    if logvar is None:
        return mean.float()
    z = mean.float()
    if generator is not None:
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        z = z + torch.exp(0.5 * logvar.float()) * noise.to(mean.device)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (z - shift) * base.vae.config.scaling_factor


def encode_images(base: BaseModel, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scaled latents for pixels (B, 3, H, W) in [-1, 1]: `moments_to_latents(encode_moments(...))`."""
    return moments_to_latents(base, encode_moments(base, pixels), generator)


# --- small helpers ---------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} ({what}) is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must hold a JSON object, not {type(data).__name__}")
    return data


def _listing(folder: Path, n: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return (", ".join(names[:n]) + (" ..." if len(names) > n else "")) or "nothing"


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
