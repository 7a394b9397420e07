"""Base models: the frozen bundle a LoRA or ControlNet is trained on, loaded from local paths only.

    base = load_base("path/to/stable-diffusion-v1-5")                       # diffusers pipeline folder
    base = load_base("v1-5-pruned-emaonly.safetensors", tokenizer="path/to/sd15/tokenizer")

Encoding prompts and pictures with a base: train/pipeline/encoding.py. Converting a single file's
parts: train/pipeline/single_file.py.

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
from torch import nn

from adapterkit.train.pipeline.parts import (
    CONFIGS,
    UnsupportedCheckpoint,
    check_finite,
    few,
    is_pixel_space,
    library_call,
    listing,
    load_tokenizer,
    move_to,
    read_json,
    vae_dtype,
)
from adapterkit.train.pipeline.single_file import from_single_file
from adapterkit.unet import UNet, load_unet, read_weights, unet_fingerprint
from adapterkit.unet.checkpoint import CheckpointError
from adapterkit.unet.families import FAMILIES, Family, family_named, family_of

logger = logging.getLogger(__name__)


PREDICTION_TYPES = ("epsilon", "v_prediction")     # what train/pipeline/schedule.py trains; not x0 ("sample")


PIXEL_PATCH_KEY = "_adapterkit_pixel_patch"        # model_index.json of a pixel-space model without vae/


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
        unet, vae, text_encoder, tok, scheduler = from_single_file(
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


def _from_pipeline_folder(folder: Path, allow_pickle: bool, dtype, device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        what = ("a single-component folder (config.json beside the weights), perhaps a U-Net alone: load "
                "that with unet.load_unet, or pass the pipeline folder above it"
                if (folder / "config.json").is_file() else f"it holds {listing(folder)}")
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder: no model_index.json; {what}. "
                              "load_base needs model_index.json with unet/, vae/, text_encoder/, tokenizer/ "
                              "(and scheduler/) beside it, or a single-file .safetensors checkpoint.")
    index = read_json(index_file, "the pipeline index")
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
                              f"{listing(folder)}); a base model needs the U-Net, the text encoder and "
                              "its tokenizer. Copy the missing subfolders from the model's source.")

    unet = load_unet(folder / "unet", allow_pickle=allow_pickle, dtype=dtype, device=device)
    vae, patch = None, 1
    if has_vae:
        found = _check_weights(folder / "vae", "vae", allow_pickle)
        vae, info = library_call(folder / "vae", lambda: AutoencoderKL.from_pretrained(
            folder / "vae", local_files_only=True, output_loading_info=True, **found))
        _check_loading_info(folder / "vae", info)
        vae = move_to(vae, device, vae_dtype(vae, dtype))
    else:
        patch = index.get(PIXEL_PATCH_KEY, 1)
        if not is_pixel_space(unet.config, patch):
            raise CheckpointError(
                f"the pipeline folder {folder} has no vae/, and its U-Net works on "
                f"{unet.config.in_channels}-channel latents, so it needs one (a pixel-space model has 3 "
                f"channels, or 3 p^2 with \"{PIXEL_PATCH_KEY}\": p in model_index.json; this one says "
                f"{patch}). Copy vae/ from the model's source.")
    found = _check_weights(folder / "text_encoder", "text_encoder", allow_pickle)
    text_encoder, info = library_call(folder / "text_encoder", lambda: CLIPTextModel.from_pretrained(
        folder / "text_encoder", local_files_only=True, output_loading_info=True, **found))
    _check_loading_info(folder / "text_encoder", info)
    text_encoder = move_to(text_encoder, device, dtype)
    tok = load_tokenizer(folder / "tokenizer", CLIPTokenizer)
    scheduler = None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler = read_json(scheduler_file, "the scheduler config")
    else:
        logger.warning("%s has no scheduler/scheduler_config.json; using the model family's default "
                       "noise schedule from configs/schedulers/", folder)
    for module, part in ((vae, "vae"), (text_encoder, "text_encoder")):
        if module is not None:
            check_finite(module.state_dict(), folder / part)
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
            weight_map = read_json(f, "the shard index").get("weight_map", {})
            files = [folder / n for n in dict.fromkeys(weight_map.values())]
            absent = [p.name for p in files if not p.is_file()]
            if absent:
                raise CheckpointError(f"{f} lists shards missing from {folder}: {', '.join(absent)}")
        for w in files:
            read_weights(w, allow_pickle=allow_pickle, keep=lambda k: False)
        return {"use_safetensors": not name.endswith(".bin"), "variant": variant}
    raise CheckpointError(f"{folder} has no {part} weights: looked for "
                          f"{', '.join(n for n, _ in _WEIGHTS[part])}; it holds {listing(folder)}.")


def _check_loading_info(where: Path, info: dict) -> None:
    """transformers and diffusers leave missing weights randomly initialised with only a warning."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith("position_ids"))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    problems = [f"{len(v)} {what} ({few(v)})" for v, what in
                ((missing, "missing tensors"), (unexpected, "unexpected tensors"),
                 (mismatched, "tensors of the wrong shape")) if v]
    if problems:
        raise CheckpointError(f"the weights in {where} do not fit its config.json: {'; '.join(problems)}. "
                              "The folder is incomplete or mixes files from different models.")


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

