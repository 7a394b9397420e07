"""Single-file checkpoints (formats.md §2.1) as the parts of a base.

Where a file keeps each part (the family rows' `ldm_prefix`, unet/families.py):

    model.diffusion_model.*                U-Net, through `unet.load_unet` (config inferred)
    first_stage_model.* (or vae.*)         VAE, through diffusers' `convert_ldm_vae_checkpoint`
    cond_stage_model.transformer.*         SD1.x: CLIP ViT-L in transformers' names
    conditioner.embedders.0.transformer.*  SDXL: CLIP ViT-L in transformers' names
    conditioner.embedders.1.model.*        SDXL: OpenCLIP ViT-bigG, OpenCLIP's names (ldm_names.py)

Which text encoders a file must hold follows from its U-Net's layout (`family_like`): an SDXL U-Net needs
both of SDXL's, and a file that lacks one is refused naming the missing prefix. Refused as well: SD2.x
files (`cond_stage_model.model.*`: diffusers' SD2 encoder is the file's OpenCLIP tower cut below its last
block, which this module does not do) and SDXL refiners (`conditioner.embedders.0.model.*`: OpenCLIP
alone, 5 ids).

A file holds no tokenizer and no component configs: the caller passes `tokenizer=` (a bare CLIP
tokenizer folder serves every encoder, adapted by the family's shipped settings in
`configs/base/<family>/<tokenizer folder>/tokenizer_config.json`, e.g. SDXL's second tokenizer pads with
"!"; or a pipeline folder with the family's tokenizer folders); the configs default to the standard ones
the family ships in `configs/base/<family>/` and `config_dir=` overrides them.

The noise schedule is not in the weights, but a file may say it (`file_schedule`): ModelSpec's
`modelspec.prediction_type` metadata ("epsilon" | "v") and the marker tensors ComfyUI reads and writes,
`v_pred` (v-prediction) and `ztsnr` (zero-terminal SNR: Lin et al. 2024, arXiv:2305.08891), as in
ComfyUI's supported_models.py (SDXL.model_type). NoobAI-XL's v-prediction releases carry both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from adapterkit.train.pipeline.ldm_names import CLIP_LEVEL, openclip_names
from adapterkit.train.pipeline.parts import (
    CONFIGS,
    TEXT_PREFIXES,
    VAE_PREFIXES,
    Parts,
    TextPart,
    UnsupportedCheckpoint,
    check_finite,
    few,
    is_pixel_space,
    load_tokenizer,
    move_to,
    read_json,
    refiner_message,
    vae_dtype,
)
from adapterkit.unet import load_unet, read_weights
from adapterkit.unet.families import Family, TextEncoder, family_like, family_of, family_of_single_file
from adapterkit.unet.weights import CheckpointError

# Marker tensors of a file's noise schedule (ComfyUI), and ModelSpec's names for the prediction types.
SCHEDULE_MARKERS = ("v_pred", "ztsnr")
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}

# An SDXL refiner keeps its only text encoder (OpenCLIP bigG) where a base keeps CLIP ViT-L.
_REFINER_PREFIX = "conditioner.embedders.0.model."


def from_single_file(path: Path, allow_pickle: bool, dtype, device, tokenizer,
                     config_dir: Path | None) -> Parts:
    if config_dir is not None and not config_dir.is_dir():
        raise CheckpointError(f"config_dir {config_dir} is not a folder")
    if tokenizer is None and not (config_dir is not None and (config_dir / "tokenizer").is_dir()):
        raise CheckpointError(
            f"{path} is a single-file checkpoint, and those do not contain a tokenizer: pass tokenizer= a "
            "local folder with the CLIP tokenizer files (vocab.json + merges.txt), e.g. the tokenizer/ "
            "folder of any diffusers SD1.x or SDXL pipeline (they all use openai/clip-vit-large-patch14's).")
    parts, metadata = read_weights(path, allow_pickle=allow_pickle, keep=lambda k: k.startswith(
        (*VAE_PREFIXES, *TEXT_PREFIXES)) or k in SCHEDULE_MARKERS)
    _refuse_unconverted(path, parts)
    unet = load_unet(path, allow_pickle=allow_pickle, dtype=dtype, device=device)
    layout = family_like(unet.config)
    _refuse_sd2(path, layout)
    vae_state = {k: v for k, v in parts.items() if k.startswith(VAE_PREFIXES)}
    encoders = {te.folder: _tensors_under(parts, te.ldm_prefix) for te in layout.text_encoders}
    _check_encoders_present(path, parts, layout, encoders)
    if not vae_state and not is_pixel_space(unet.config):
        raise CheckpointError(f"{path} holds no VAE (no first_stage_model.* or vae.* tensors), and its U-Net "
                              "works on latents. Load the full checkpoint or the model's diffusers folder.")
    # The shipped configs are the released models' sizes: a test-sized U-Net (the tiny family) has none.
    family = family_of(unet.config)
    configs = config_dir if config_dir is not None else CONFIGS / "base" / (family.configs or family.name)
    vae = None
    if vae_state:
        vae = _vae_from_ldm(vae_state, _component_config(configs, "vae", path, family), path)
        vae = move_to(vae, device, vae_dtype(vae, dtype))
    text = []
    for te in layout.text_encoders:
        model = _text_encoder_from_ldm(encoders[te.folder], te, _component_config(configs, te.folder, path,
                                                                                 family), path)
        tok = _tokenizer(te, layout, tokenizer, config_dir, configs)
        text.append(TextPart(te, move_to(model, device, dtype), tok))
    scheduler, index = None, {}
    if config_dir is not None:
        if (config_dir / "scheduler" / "scheduler_config.json").is_file():
            scheduler = read_json(config_dir / "scheduler" / "scheduler_config.json", "the scheduler config")
        if (config_dir / "model_index.json").is_file():
            index = read_json(config_dir / "model_index.json", "the pipeline index")
    prediction_type, zero_snr = file_schedule(parts, metadata)
    zeros = index.get("force_zeros_for_empty_prompt", layout.empty_prompt_zeros)
    return Parts(unet, vae, tuple(text), scheduler, 1, prediction_type, zero_snr, bool(zeros))


def text_encoders_of_file(path: Path, dtype, config_dir: Path | None = None
                          ) -> tuple[tuple[TextEncoder, nn.Module], ...]:
    """The text encoders of a single file as transformers modules, without tokenizers (what a merge
    into the file's encoders needs); the configs as `from_single_file` finds them."""
    parts, _ = read_weights(path, keep=lambda k: k.startswith(TEXT_PREFIXES))
    _refuse_unconverted(path, parts)
    unet = load_unet(path, dtype=dtype)
    layout, family = family_like(unet.config), family_of(unet.config)
    _refuse_sd2(path, layout)
    encoders = {te.folder: _tensors_under(parts, te.ldm_prefix) for te in layout.text_encoders}
    _check_encoders_present(path, parts, layout, encoders)
    configs = config_dir if config_dir is not None else CONFIGS / "base" / (family.configs or family.name)
    return tuple((te, move_to(_text_encoder_from_ldm(encoders[te.folder], te,
                                                     _component_config(configs, te.folder, path, family),
                                                     path), "cpu", dtype))
                 for te in layout.text_encoders)


def file_schedule(tensors, metadata: dict[str, str]) -> tuple[str | None, bool]:
    """(prediction type, zero-terminal SNR) as a single file states them: the `v_pred` / `ztsnr` marker
    tensors, else ModelSpec's `modelspec.prediction_type`; (None, False) where it says nothing."""
    prediction = "v_prediction" if "v_pred" in tensors else \
        MODELSPEC_PREDICTION.get(str(metadata.get("modelspec.prediction_type", "")).strip().lower())
    return prediction, "ztsnr" in tensors


# --- refusals ----------------------------------------------------------------------------------------

def _refuse_unconverted(path: Path, parts: dict[str, Tensor]) -> None:
    """SDXL refiners, SD2.x files and families adapterkit does not load (`Family.loads`), recognised by
    their text encoders' prefixes before the U-Net loads."""
    if any(k.startswith(_REFINER_PREFIX) for k in parts):
        raise UnsupportedCheckpoint(refiner_message(path, f"its only text encoder is OpenCLIP under "
                                                    f"{_REFINER_PREFIX}*"))
    holds = family_of_single_file(parts)
    if holds is not None and not holds.loads:
        prefix = holds.text_encoders[0].ldm_prefix.split(".")[0]
        raise UnsupportedCheckpoint(f"{path} is an {holds.title} checkpoint ({prefix}.* text encoders); "
                                    f"adapterkit cannot load {holds.title} base models yet.")
    if holds is not None:
        _refuse_sd2(path, holds)


def _refuse_sd2(path: Path, family: Family) -> None:
    """An OpenCLIP encoder read at its "last" layer is SD2.x's: diffusers' form of it is the file's tower
    cut below the final block, which this module does not convert."""
    cut = [te for te in family.text_encoders if te.openclip and te.layer == "last"]
    if cut:
        raise UnsupportedCheckpoint(
            f"{path} is an {family.title} single file (OpenCLIP text encoder under {cut[0].ldm_prefix}*), "
            "which load_base cannot convert yet. Use the model's diffusers folder instead (or convert the "
            "file once with a tool you trust, e.g. diffusers' from_single_file with a local config, then "
            "save_pretrained)." + ("" if family.prediction else
                                   " The folder's scheduler config also supplies the prediction type "
                                   f"({family.title} weights do not show it); without one, pass "
                                   "prediction_type="))


def _check_encoders_present(path: Path, parts: dict[str, Tensor], layout: Family,
                            encoders: dict[str, dict[str, Tensor]]) -> None:
    """Every text encoder the U-Net's family reads must be in the file; name the missing ones and what
    the file holds instead."""
    missing = [te for te in layout.text_encoders if not encoders[te.folder]]
    if not missing:
        return
    held = sorted({".".join(k.split(".")[:3 if k.startswith("conditioner.") else 2]) + ".*" for k in parts
                   if k.startswith(TEXT_PREFIXES)})
    holds = family_of_single_file(parts)
    names = " or ".join(f"{te.ldm_prefix}*" for te in missing)
    reads = f"{layout.title} U-Net reads {' and '.join(te.ldm_prefix + '*' for te in layout.text_encoders)}"
    if not held:
        has = "it holds no text-encoder tensors at all: it is a U-Net-only or pruned file"
    elif holds is not None and holds is not layout:
        has = f"it holds {holds.title}'s text encoders ({', '.join(held)}) instead: parts of different models"
    else:
        has = f"it holds {', '.join(held)} only: the file is incomplete"
    raise CheckpointError(f"{path} holds no text encoder (no {names} tensors); an {reads}, and {has}. Load "
                          "the full checkpoint or the model's diffusers folder.")


# --- converting the parts ------------------------------------------------------------------------------

def _tensors_under(parts: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in parts.items() if k.startswith(prefix)}


def _component_config(configs: Path, part: str, path: Path, family: Family) -> tuple[dict, Path]:
    f = configs / part / "config.json"
    if not f.is_file():
        where = f"config_dir {configs} has no {part}/config.json" if not configs.is_relative_to(CONFIGS) \
            else f"adapterkit ships no default {part} config for the '{family.name}' model family"
        raise CheckpointError(f"{path}: a single file does not hold its {part} config, and {where}. Pass "
                              "config_dir= a diffusers folder of this model (its config files are enough).")
    return {k: v for k, v in read_json(f, f"the {part} config").items() if not k.startswith("_")}, f


def _tokenizer(te: TextEncoder, family: Family, tokenizer, config_dir: Path | None, configs: Path):
    """The tokenizer of one encoder: `tokenizer=` (a pipeline folder's `te.tokenizer` subfolder, or a
    bare folder adapted by the family's shipped settings for this tokenizer), else config_dir's."""
    from transformers import CLIPTokenizer

    if tokenizer is None:
        return load_tokenizer(config_dir / te.tokenizer, CLIPTokenizer)
    given = Path(tokenizer)
    if (given / te.tokenizer).is_dir() and not (given / "vocab.json").is_file():
        return load_tokenizer(given, CLIPTokenizer, te.tokenizer)
    if te.tokenizer != family.text_encoders[0].tokenizer and (given / "tokenizer").is_dir():
        given = given / "tokenizer"            # a pipeline folder without this tokenizer: its first one
    settings = [configs / te.tokenizer / "tokenizer_config.json",
                CONFIGS / "base" / (family.configs or family.name) / te.tokenizer / "tokenizer_config.json"]
    shipped = next((f for f in settings if f.is_file()), None)
    return load_tokenizer(given, CLIPTokenizer, **(_special_tokens(shipped) if shipped else {}))


def _special_tokens(f: Path) -> dict[str, str]:
    """The special tokens a tokenizer_config.json sets (strings, or transformers' {"content": ...})."""
    cfg = read_json(f, "the tokenizer settings")
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


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


def _text_encoder_from_ldm(state: dict[str, Tensor], te: TextEncoder, config: tuple[dict, Path], path: Path):
    """A text encoder's tensors (the file's prefix removed) -> its transformers class. transformers'
    names are the file's for CLIP ViT-L (`*.transformer.*`); OpenCLIP towers go through
    `openclip_names`. Only the `text_model.` level differs between transformers versions (v5 dropped it
    from CLIPTextModel, not from CLIPTextModelWithProjection): the names follow the model's own."""
    import transformers
    from transformers import CLIPTextConfig

    cls = getattr(transformers, te.cls)
    cfg, cfg_file = config
    config_obj = CLIPTextConfig(**cfg)
    with torch.device("meta"):
        reference = cls(config_obj)
    expected = reference.state_dict()
    unplaced = []
    if te.openclip:
        state, unplaced = openclip_names(state, config_obj.hidden_size)
    renamed = {}
    for k, v in state.items():
        name = k if k in expected else k.removeprefix(CLIP_LEVEL)
        if name not in expected and CLIP_LEVEL + name in expected:
            name = CLIP_LEVEL + name
        if name.endswith("position_ids") and name not in expected:
            continue                 # a buffer older files saved; recomputed by the model
        renamed[name] = v
    _check_state(renamed, reference, path, f"text encoder ({te.ldm_prefix}*)", cfg_file,
                 [te.ldm_prefix + k for k in unplaced])
    # from_pretrained(None, state_dict=...) builds without random init and restores the non-persistent
    # buffers; every key was checked above (it would silently random-init a missing one).
    return cls.from_pretrained(None, config=config_obj, state_dict=renamed, local_files_only=True)


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
                              f"{'; '.join(problems)}. If the model's parts are not the family's standard "
                              "ones, pass config_dir= a diffusers folder of this model (its config files "
                              "are enough).")
    check_finite(state, path, part)
