"""Base models: the frozen bundle a LoRA or ControlNet is trained on, loaded from local paths only.

    base = load_base("path/to/stable-diffusion-v1-5")                       # diffusers pipeline folder
    base = load_base("path/to/stable-diffusion-xl-base-1.0")                # SDXL: two text encoders
    base = load_base("v1-5-pruned-emaonly.safetensors", tokenizer="path/to/sd15/tokenizer")
    base = load_base("sd_xl_base_1.0.safetensors", tokenizer="path/to/clip-vit-large-patch14")

Encoding prompts and pictures with a base: train/pipeline/encoding.py. Converting a single file's
parts: train/pipeline/single_file.py.

A `BaseModel` is our U-Net plus diffusers' `AutoencoderKL`, the family's text encoders (transformers'
`CLIPTextModel`, and for SDXL also `CLIPTextModelWithProjection`) with their `CLIPTokenizer`s, and the
noise schedule as a diffusers scheduler-config dict (DESIGN.md §5). All of it is frozen
(`requires_grad=False`, eval mode); adapters add the trainable parts.

Text encoders. Which ones a base has, in which subfolders, which of their hidden states condition the
U-Net and whose pooled output does: the rows of its family (unet/families.py `TextEncoder`), chosen by
the U-Net's layout (`family_like`, so a reduced SDXL U-Net gets SDXL's two rows). SD1.x/SD2.x: one
encoder (`text_encoder/`, `tokenizer/`); SDXL: `text_encoder/` (CLIP ViT-L) and `text_encoder_2/`
(OpenCLIP ViT-bigG, with projection) and their tokenizers. `base.text` holds one `TextPart` per row, in
the order their hidden states are concatenated; `base.text_encoder` / `base.tokenizer` are the first's.

Sources (nothing is ever fetched: every library call gets `local_files_only=True`):
- a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, the text encoders' and tokenizers'
  folders, `scheduler/`): the U-Net through `unet.load_unet`, the rest through the libraries' own
  `from_pretrained`, with missing or unexpected weights turned into errors (both libraries only
  warn and leave such weights randomly initialised);
- a single-file checkpoint (formats.md §2.1), SD1.x or SDXL: train/pipeline/single_file.py. Such a
  file holds no tokenizer and no component configs: pass `tokenizer=`; the configs default to the
  family's standard ones in `configs/base/<family>/` and `config_dir=` overrides them. SD2.x single
  files are refused; convert them to a diffusers folder.
SDXL refiners (one text encoder, an aesthetic score among the ids) are refused, naming the base to use.

Family (unet/families.py; decides the default noise schedule and what a single file holds): the
U-Net's context width, projection and added embedding say it: 768 with conv proj_in/out is SD1.x,
1024 with linear projections SD2.x, 2048 with the text_time embedding SDXL, anything else the tiny
family (the bundled tiny model and test-sized U-Nets). Whether an SD2 model predicts epsilon
(512-base) or v (768-v) is not in its weights; without a scheduler config it must be given as
`prediction_type=`. SDXL bases are eps (SDXL 1.0, Pony, Illustrious) or v (NoobAI-XL v-pred): the
scheduler config says it, a single file's metadata or marker tensors may, else `prediction_type=`.

Pixel-space models (the bundled tiny base): no vae/; the U-Net works on the pixels themselves,
each p x p patch folded into 3 p^2 channels (`pixel_patch`, from `_adapterkit_pixel_patch` in
model_index.json; 1 = plain RGB). Folding by 2 makes a 64 px picture a 32 x 32 x 12 "latent", so
the `tiny` preset runs at its native 32 x 32 at a quarter of the cost of working on 64 x 64 pixels,
and unlike a small VAE it loses nothing (stripes 3 px apart survive).

One coherent thing over 450 lines: loading a base from a folder, with the checks each part
needs; single files, encoding and shared checks live in single_file.py, encoding.py and parts.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.train.pipeline.parts import (
    CONFIGS,
    Parts,
    TextPart,
    UnsupportedCheckpoint,
    check_finite,
    few,
    is_pixel_space,
    library_call,
    listing,
    load_tokenizer,
    move_to,
    read_json,
    refiner_message,
    vae_dtype,
)
from adapterkit.train.pipeline.single_file import from_single_file
from adapterkit.unet import UNet, load_unet, read_weights, unet_fingerprint
from adapterkit.unet.families import FAMILIES, SDXL, Family, TextEncoder, family_like, family_named, family_of
from adapterkit.unet.weights import CheckpointError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")     # what train/pipeline/schedule.py trains; not x0 ("sample")


PIXEL_PATCH_KEY = "_adapterkit_pixel_patch"        # model_index.json of a pixel-space model without vae/


def _component_classes() -> dict[str, set[str]]:
    """Classes a pipeline folder may name for each part (model_index.json); others are refused. The
    text encoders' and tokenizers' folders are the families' rows."""
    classes = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"}}
    for family in FAMILIES.values():
        for te in family.text_encoders:
            classes.setdefault(te.folder, set()).add(te.cls)
            classes[te.tokenizer] = {"CLIPTokenizer", "CLIPTokenizerFast"}
    return classes


COMPONENT_CLASSES = _component_classes()


# Weight files of the library-loaded parts, in order of preference: (file name, variant).
_WEIGHTS = {
    "vae": (("diffusion_pytorch_model.safetensors", None),
            ("diffusion_pytorch_model.safetensors.index.json", None),
            ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
            ("diffusion_pytorch_model.bin", None), ("diffusion_pytorch_model.fp16.bin", "fp16")),
    "text encoder": (("model.safetensors", None), ("model.safetensors.index.json", None),
                     ("model.fp16.safetensors", "fp16"), ("pytorch_model.bin", None),
                     ("pytorch_model.fp16.bin", "fp16")),
}


@dataclass(frozen=True)
class Fingerprint:
    """Identity of each weighted part. `unet` is `unet.unet_fingerprint`, the value adapter files
    record as their base; `vae` (None for a pixel-space model) and `text_encoder` (which covers the
    tokenizers too; several encoders' joined by "+") key the latent and text-embedding caches."""
    unet: str
    vae: str | None
    text_encoder: str

    def __str__(self) -> str:
        return f"unet {self.unet}, vae {self.vae or '-'}, text encoder {self.text_encoder}"


@dataclass(eq=False)
class BaseModel:
    """A loaded base model. `vae` is None only for a pixel-space U-Net, which works on the image's
    pixels folded into channels: `pixel_patch` p (1, 2, 4) puts each p x p patch of RGB pixels into
    3 p^2 channels (`F.pixel_unshuffle`), an exact, lossless "VAE" that downsamples p x.

    text: one TextPart per text encoder, in the order their hidden states are concatenated.
    empty_prompt_zeros: guidance's unconditional conditioning is all zeros rather than the encoded empty
        prompt (diffusers' `force_zeros_for_empty_prompt`, on in SDXL pipelines).
    """
    unet: UNet
    vae: Any                          # diffusers AutoencoderKL | None
    text: tuple[TextPart, ...]
    scheduler_config: dict
    family: Family
    fingerprint: Fingerprint
    source: Path | None = None
    pixel_patch: int = 1
    empty_prompt_zeros: bool = False
    _truncation_warned: set[str] = field(default_factory=set, repr=False)

    @property
    def text_encoder(self):
        """The first text encoder (SD1.x/SD2.x: the only one)."""
        return self.text[0].model

    @property
    def tokenizer(self):
        return self.text[0].tokenizer

    @property
    def text_encoders(self) -> tuple:
        return tuple(part.model for part in self.text)

    @property
    def tokenizers(self) -> tuple:
        return tuple(part.tokenizer for part in self.text)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def max_length(self) -> int:
        """Tokens per prompt, start and end tokens included (77 for SD; every encoder reads as many)."""
        return self.text[0].max_length

    @property
    def context_dim(self) -> int:
        """Width of the text context: the encoders' widths added up (SDXL: 768 + 1280)."""
        return sum(part.width for part in self.text)

    @property
    def time_ids(self) -> int:
        """Size/crop ids per picture the U-Net's added embedding takes (SDXL: 6; else 0)."""
        cfg = self.unet.config
        return cfg.time_ids if cfg.addition_embed == "text_time" else 0

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
    """Load a base model from a local diffusers pipeline folder or a single-file checkpoint.

    dtype, device: where every part ends up. Under float16 a VAE whose config sets `force_upcast`
        (diffusers' default, and what the SD and SDXL VAEs need to stay finite) is kept in float32; a
        VAE made for fp16 (config `force_upcast: false`, e.g. the fp16-fixed SDXL VAE) runs in fp16.
    allow_pickle: read `.ckpt`/`.bin` weights, with `torch.load(weights_only=True)` only.
    tokenizer: for a single file (which holds none): a folder with the CLIP tokenizer files
        (vocab.json + merges.txt, or tokenizer.json), or a pipeline folder with the family's tokenizer
        folders inside (tokenizer/, and tokenizer_2/ for SDXL). A bare folder serves every encoder; the
        family's shipped settings (configs/base/<family>/<tokenizer folder>/) adapt it to each.
    prediction_type: "epsilon" | "v_prediction"; overrides the scheduler config's and the file's, and
        is required for an SD2 model that has no scheduler config.
    config_dir: for a single file: a diffusers pipeline folder (weights not needed) whose component
        configs (vae/, text_encoder/[, text_encoder_2/]), scheduler/ and tokenizer folders describe the
        file's parts; default: the family's standard configs shipped in configs/base/<family>/.

    Raises CheckpointError naming the path and what is missing or wrong; UnsupportedCheckpoint
    (also a NotImplementedError) for SD2 single files and SDXL refiners.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist. load_base expects a local diffusers pipeline folder "
                              "(with model_index.json) or a single-file SD checkpoint (.safetensors).")
    if path.is_dir():
        parts = _from_pipeline_folder(path, allow_pickle, dtype, device)
    else:
        parts = from_single_file(path, allow_pickle, dtype, device, tokenizer,
                                 Path(config_dir) if config_dir is not None else None)
    unet, vae = parts.unet, parts.vae
    family = family_of(unet.config)
    _check_parts_agree(path, unet, vae, parts.text)
    for part in parts.text:
        if part.tokenizer.model_max_length > part.model.config.max_position_embeddings:
            # a tokenizer read from bare vocab.json/merges.txt has no limit (1e30); the encoder has one
            part.tokenizer.model_max_length = part.model.config.max_position_embeddings
    scheduler = _scheduler_config(parts, family, prediction_type, path)
    for module in (unet, vae, *(part.model for part in parts.text)):
        if module is not None:
            module.requires_grad_(False).eval()
    fingerprint = Fingerprint(unet_fingerprint(unet),
                              _module_fingerprint(vae, _config_text(vae.config)) if vae is not None
                              else None if parts.pixel_patch == 1 else f"pixels/{parts.pixel_patch}",
                              _text_fingerprint(parts.text))
    return BaseModel(unet, vae, parts.text, scheduler, family, fingerprint, path, parts.pixel_patch,
                     parts.empty_prompt_zeros)


def move_encoders(base: BaseModel, device: torch.device | str) -> None:
    """The VAE and text encoders to `device`; the U-Net stays. A training job parks them on the CPU once
    the cache holds every latent and caption (SDXL's are 3.6 GB in fp32); what it encodes later (a
    corrupt cache entry) is encoded there."""
    for module in (base.vae, *base.text_encoders):
        if module is not None:
            module.to(device)


@contextmanager
def encoders_on(base: BaseModel, device: torch.device | str):
    """The VAE and text encoders on `device` inside the block (a job's samples), then back where they
    were (each text encoder with the first's device)."""
    where = base.text_encoder.device
    vae_where = base.vae.device if base.vae is not None else None
    move_encoders(base, device)
    try:
        yield base
    finally:
        move_encoders(base, where)
        if base.vae is not None:
            base.vae.to(vae_where)


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


# --- pipeline folders ---------------------------------------------------------------------------------

def _from_pipeline_folder(folder: Path, allow_pickle: bool, dtype, device) -> Parts:
    from diffusers import AutoencoderKL

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        what = ("a single-component folder (config.json beside the weights), perhaps a U-Net alone: load "
                "that with unet.load_unet, or pass the pipeline folder above it"
                if (folder / "config.json").is_file() else f"it holds {listing(folder)}")
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder: no model_index.json; {what}. "
                              "load_base needs model_index.json with unet/, vae/, text_encoder/, tokenizer/ "
                              "(and scheduler/) beside it, or a single-file .safetensors checkpoint.")
    index = read_json(index_file, "the pipeline index")
    _check_index(folder, index)
    if not (folder / "unet").is_dir():
        raise CheckpointError(f"the pipeline folder {folder} has no unet/ (it holds {listing(folder)}); a "
                              "base model needs the U-Net, the text encoders and their tokenizers. Copy the "
                              "missing subfolders from the model's source.")
    unet = load_unet(folder / "unet", allow_pickle=allow_pickle, dtype=dtype, device=device)
    layout = family_like(unet.config)
    rows = layout.text_encoders
    _check_listed_encoders(folder, index, layout)
    missing = [f"{p}/" for te in rows for p in (te.folder, te.tokenizer) if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(f"the pipeline folder {folder} has no {', '.join(missing)} (it holds "
                              f"{listing(folder)}); a base model needs the U-Net, the text encoder"
                              f"{'s' if len(rows) > 1 else ''} and {'their' if len(rows) > 1 else 'its'} "
                              "tokenizer. Copy the missing subfolders from the model's source.")
    vae, patch = None, 1
    if (folder / "vae").is_dir():
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
    text = tuple(_text_part(folder, te, allow_pickle, dtype, device) for te in rows)
    scheduler = None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler = read_json(scheduler_file, "the scheduler config")
    else:
        logger.warning("%s has no scheduler/scheduler_config.json; using the model family's default "
                       "noise schedule from configs/schedulers/", folder)
    if vae is not None:
        check_finite(vae.state_dict(), folder / "vae")
    zeros = index.get("force_zeros_for_empty_prompt", layout.empty_prompt_zeros)
    return Parts(unet, vae, text, scheduler, patch, empty_prompt_zeros=bool(zeros))


def _text_part(folder: Path, te: TextEncoder, allow_pickle: bool, dtype, device) -> TextPart:
    """The text encoder and tokenizer of one family row, from their subfolders."""
    import transformers

    where = folder / te.folder
    found = _check_weights(where, "text encoder", allow_pickle)
    cls = getattr(transformers, te.cls)
    model, info = library_call(where, lambda: cls.from_pretrained(
        where, local_files_only=True, output_loading_info=True, **found))
    _check_loading_info(where, info)
    check_finite(model.state_dict(), where)
    tok = load_tokenizer(folder / te.tokenizer, transformers.CLIPTokenizer)
    return TextPart(te, move_to(model, device, dtype), tok)


def _listed(index: dict, part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _check_index(folder: Path, index: dict) -> None:
    """The classes model_index.json names, families adapterkit does not load (`Family.loads`), and SDXL
    refiners (their first text encoder is absent and their U-Net takes an aesthetic score among its
    ids)."""
    index_file = folder / "model_index.json"
    for part, classes in COMPONENT_CLASSES.items():
        entry = index.get(part)
        name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        if name is not None and name not in classes:
            raise UnsupportedCheckpoint(f"{index_file} names {name} for {part}; adapterkit loads "
                                        f"{' or '.join(sorted(classes))} there.")
    for family in FAMILIES.values():
        extra = [te.folder for te in family.text_encoders[1:]]
        named = str(index.get("_class_name", "")).startswith(family.pipeline_classes or ("-",))
        if not family.loads and (named or extra and all(_listed(index, p) for p in extra)):
            raise UnsupportedCheckpoint(f"{folder} is an {family.title} pipeline "
                                        f"({index.get('_class_name')}); adapterkit cannot load "
                                        f"{family.title} base models yet.")
    first, *later = [te.folder for te in SDXL.text_encoders]
    if any(_listed(index, p) for p in later) and not _listed(index, first):
        raise UnsupportedCheckpoint(refiner_message(folder, f"its model_index.json lists no {first} beside "
                                                    f"{', '.join(later)}"))
    if index.get("requires_aesthetics_score"):
        raise UnsupportedCheckpoint(refiner_message(folder, "its model_index.json sets "
                                                    "requires_aesthetics_score"))


def _check_listed_encoders(folder: Path, index: dict, layout: Family) -> None:
    """model_index.json must not list text encoders the U-Net's family does not have (an SD1.x U-Net
    beside an SDXL index: parts of different models)."""
    own = {te.folder for te in layout.text_encoders}
    others = sorted({te.folder for f in FAMILIES.values() for te in f.text_encoders} - own)
    extra = [p for p in others if _listed(index, p)]
    if extra:
        raise CheckpointError(f"{folder / 'model_index.json'} lists {', '.join(extra)}, but the U-Net in "
                              f"{folder / 'unet'} is built like an {layout.title} U-Net, which reads "
                              f"{len(own)} text encoder{'s' if len(own) > 1 else ''} "
                              f"({', '.join(sorted(own))}); the folder mixes parts of different models.")


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


# --- what every base must satisfy ----------------------------------------------------------------------

def _check_parts_agree(path: Path, unet: UNet, vae, text: tuple[TextPart, ...]) -> None:
    cfg = unet.config
    widths = [part.width for part in text]
    if sum(widths) != cfg.context_dim:
        what = (f"the text encoder's width is {widths[0]}" if len(widths) == 1 else
                f"the text encoders' widths add up to {' + '.join(map(str, widths))} = {sum(widths)}")
        raise CheckpointError(f"{path}: {what} but the U-Net attends to {cfg.context_dim}-wide context; the "
                              "parts belong to different models.")
    if cfg.addition_embed == "text_time":
        _check_pooled(path, cfg, text)
    if vae is not None and vae.config.latent_channels != cfg.out_channels:
        raise CheckpointError(f"{path}: the VAE makes {vae.config.latent_channels}-channel latents but the "
                              f"U-Net predicts {cfg.out_channels} channels; the parts do not match.")
    for part in text:
        if len(part.tokenizer) > part.model.config.vocab_size:
            raise CheckpointError(f"{path}: the tokenizer of {part.spec.folder} has {len(part.tokenizer)} "
                                  f"tokens but the text encoder embeds only {part.model.config.vocab_size}; "
                                  "pass the tokenizer made for this model.")
    lengths = {part.spec.folder: part.max_length for part in text}
    if len(set(lengths.values())) > 1:
        raise CheckpointError(f"{path}: the text encoders read prompts of different lengths {lengths}; their "
                              "hidden states are concatenated token by token, so they must agree.")


def _check_pooled(path: Path, cfg, text: tuple[TextPart, ...]) -> None:
    """A text_time U-Net (SDXL) takes the pooled output of its pooled encoder: the widths must agree.
    A refiner's U-Net (5 ids: 2560 = 1280 + 5 x 256 inputs) read as a base's shows up here."""
    pooled = [part for part in text if part.spec.pooled]
    inputs = cfg.pooled_dim + cfg.time_ids * cfg.addition_time_embed_dim
    if not pooled:
        raise CheckpointError(f"{path}: the U-Net's added embedding takes a pooled text embedding but none "
                              "of its text encoders gives one; the parts belong to different models.")
    projection = pooled[0].model.config.projection_dim
    if projection != cfg.pooled_dim:
        raise CheckpointError(
            f"{path}: the U-Net's added embedding takes {inputs} inputs, read as {cfg.pooled_dim} pooled + "
            f"{cfg.time_ids} ids x {cfg.addition_time_embed_dim}, but {pooled[0].spec.folder} projects to "
            f"{projection}. An SDXL base takes {projection} + 6 x {cfg.addition_time_embed_dim}; "
            f"{projection + 5 * cfg.addition_time_embed_dim} inputs is an SDXL refiner's U-Net (5 ids, with "
            "an aesthetic score), which adapterkit does not load. Otherwise the parts belong to different "
            "models.")


def _scheduler_config(parts: Parts, family: Family, prediction_type: str | None, path: Path) -> dict:
    """The noise schedule: the scheduler config found, else the family default; then the file's word on
    the prediction type and zero-terminal SNR, then `prediction_type=` (which wins, with a warning
    where it contradicts what was found)."""
    found = parts.scheduler
    if prediction_type is None:
        prediction_type = parts.prediction_type
    elif parts.prediction_type not in (None, prediction_type):
        warnings.warn(f"{path}: prediction_type={prediction_type!r} overrides the file's own "
                      f"{parts.prediction_type!r}", stacklevel=3)
    if found is None:
        try:
            cfg = default_scheduler_config(family, prediction_type)
        except ValueError as e:
            raise CheckpointError(f"{path} has no scheduler config, so the family default is used; "
                                  f"{e}") from None
    else:
        cfg = dict(found)
        if prediction_type is not None and cfg.get("prediction_type", "epsilon") != prediction_type:
            if prediction_type != parts.prediction_type:
                warnings.warn(f"{path}: prediction_type={prediction_type!r} overrides the scheduler config's "
                              f"{cfg.get('prediction_type', 'epsilon')!r}", stacklevel=3)
            cfg["prediction_type"] = prediction_type
    if parts.zero_snr:
        cfg["rescale_betas_zero_snr"] = True
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


def _text_fingerprint(text: tuple[TextPart, ...]) -> str:
    """Each encoder's weights, config and tokenizer; several joined by "+" in their order."""
    return "+".join(_module_fingerprint(part.model, _config_text(part.model.config.to_dict())
                                        + _tokenizer_text(part.tokenizer)) for part in text)


def _module_fingerprint(module: nn.Module, extra: str) -> str:
    """`unet_fingerprint`'s sampled weight hash (any state dict works) folded with the config text."""
    arch, weights = unet_fingerprint(module).split("-")
    return f"{arch}-{hashlib.sha256((weights + extra).encode()).hexdigest()[:16]}"
