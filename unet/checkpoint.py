"""Reading and writing U-Net weights: diffusers folders, single-file SD checkpoints, opt-in pickles.

`load_unet(path)` accepts
- a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (or the `.fp16` variant, or
  a sharded `...safetensors.index.json`), or a pipeline folder that holds one in `unet/`;
- one `.safetensors` file: a single-file SD checkpoint with LDM names (`model.diffusion_model.*`; the
  VAE, text encoder, EMA copies and noise schedule of a full checkpoint are ignored), bare LDM U-Net
  names, or bare diffusers names (`conv_in.weight`, ...);
- pickles (`.ckpt/.pt/.pth/.bin`) only with `allow_pickle=True`, and then only through
  `torch.load(weights_only=True)`, which unpickles tensors and plain containers and nothing else.

`save_unet(model, path)` writes a diffusers folder or one LDM-named `.safetensors`, atomically.

Error contract: every problem with a file raises `CheckpointError` naming the file, the problem and
what to do. Files are classified by content, not extension (shared/research/reliability.md §1.2: an
LFS pointer, an HTML page and a renamed pickle all read as "header too large" to safetensors), and the
weights are checked against the config (keys, shapes, finite values) before torch sees them.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import PRESETS, Stage, UNetConfig
from .ldm_keys import LDM_PREFIX, ldm_key_map, ldm_structure, to_ldm_key
from .model import UNet
from .weights import (
    DIFFUSERS_WEIGHTS,
    CheckpointError,
    atomic_write,
    error_phrase,
    few,
    locate_weights,
    read_files,
    write_safetensors,
)

CONFIG_METADATA_KEY = "adapterkit.unet_config"


_LDM_BARE = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.")


_DIFFUSERS = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.", "conv_out.")


# Parts of a full single-file checkpoint that are not the U-Net; never read into memory.


_INFERRED = "the config inferred from the tensor shapes"


# What building a UNetConfig from a file's JSON can raise (a zero norm_groups divides by zero, a list
# where a dict belongs has no .get, ...): all of it means "this config is not usable".
CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError)


def load_unet(path: str | os.PathLike, config: UNetConfig | str | None = None, *,
              allow_pickle: bool = False, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> UNet:
    """Load a U-Net from a diffusers folder, a pipeline folder or a single weights file.

    config: a `UNetConfig` or preset name; it overrides every other source. Otherwise the config is
        the folder's `config.json`, else the `adapterkit.unet_config` metadata that `save_unet` writes
        into LDM files, else inferred from tensor shapes (`infer_unet_config`). Shapes cannot show
        the head count, so inference applies the SD rule: conv proj_in/out (SD1.x, context 768) means
        8 heads, linear proj_in/out (SD2.x, SDXL) means heads of width 64; pass `config=` for a model
        made otherwise.
    allow_pickle: read `.ckpt/.pt/.pth/.bin` files, with `torch.load(weights_only=True)` only.
    dtype: parameter dtype; None means float32 whatever the file stores (as diffusers does).
    device: where the parameters end up.

    Raises CheckpointError for an unreadable file, keys or shapes that do not fit the config, a
    config that disagrees with the weights, or NaN/inf values.
    """
    files, config_json = locate_weights(Path(path))
    label = files[0] if len(files) == 1 else files[0].parent
    tensors, metadata = read_files(files, allow_pickle)
    layout, prefix, state = _unet_tensors(tensors, label)
    cfg, origin = _resolve_config(config, config_json, metadata, state, label)
    _check_config(cfg, origin, state, label)
    state = _check_and_rename(state, layout, prefix, cfg, origin, label)
    dtype = dtype or torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):       # no random init of weights that are about to be replaced
        model = UNet(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


def infer_unet_config(state_dict: Mapping[str, Tensor]) -> UNetConfig:
    """The architecture of the U-Net whose tensors are `state_dict`, from key names and shapes.

    Accepts diffusers names, bare LDM names, or a whole single-file checkpoint (`model.diffusion_model.`
    keys; the rest is ignored). Only shapes are read, so meta tensors work.

    Read from the weights: stage count and channels, which stages have attention, layers per block,
    transformer depth per stage, context width, linear vs conv proj_in/out, in/out channels, and
    whether there is an added embedding (`add_embedding` / LDM `label_emb`: SDXL's text_time) and
    its input width.
    Not in the weights, so set by rule: the head count. Conv proj_in/out (SD1.x, context 768) means
    8 heads per stage; linear proj_in/out (SD2.x, SDXL) means heads of width 64, i.e.
    channels // 64 heads. The added embedding's input splits as SDXL's: 6 ids x 256 sinusoidal
    features, the rest pooled text. norm_groups (32), norm_eps, sample_size and upcast_attention take
    the defaults. If everything the weights show equals a preset (tiny, sd15, sd21, sdxl), that preset
    is returned, with its heads and sample size. Pass `config=` to `load_unet` for anything else.

    Raises ValueError when the names do not form an SD1.x/2.x/SDXL U-Net.
    """
    _, _, state = _unet_tensors(state_dict, None)
    return _infer(state)


def _infer(state: Mapping[str, Tensor]) -> UNetConfig:
    if any(k.startswith(_LDM_BARE) for k in state):
        stages, L, attention = ldm_structure(state)
        up_attention = tuple(reversed(attention))
        name = lambda k: to_ldm_key(k, L, up_attention)
    else:
        down = {int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")}
        if not down:
            raise ValueError("no down_blocks.* tensors")
        stages = max(down) + 1
        L = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")})
        attention = tuple(f"down_blocks.{b}.attentions.0.norm.weight" in state for b in range(stages))
        name = lambda k: k

    def shape(key: str) -> tuple[int, ...]:
        if name(key) not in state:
            raise ValueError(f"tensor {name(key)!r} is missing")
        return tuple(state[name(key)].shape)

    def depth(prefix: str) -> int:
        k = 0
        while name(f"{prefix}.transformer_blocks.{k}.norm1.weight") in state:
            k += 1
        return k

    channels = [shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in range(stages)]
    mid = "mid_block.attentions.0"
    mid_depth = depth(mid)
    depths = [depth(f"down_blocks.{b}.attentions.0") if attention[b] else 1 for b in range(stages)]
    if attention[-1] and depths[-1] != mid_depth:
        raise ValueError(f"last stage has transformer depth {depths[-1]} but the mid block {mid_depth}; "
                         "adapterkit's config ties the two")
    depths[-1] = mid_depth       # the mid block's transformer is configured by the last stage
    linear = len(shape(f"{mid}.proj_in.weight")) == 2
    heads = [_heads_by_rule(c, linear, needed=attention[b] or b == stages - 1, stage=b)
             for b, c in enumerate(channels)]
    added = _added_by_rule(shape("add_embedding.linear_1.weight")[1]) \
        if name("add_embedding.linear_1.weight") in state else {}
    cfg = UNetConfig(
        stages=tuple(Stage(c, a, h, d) for c, a, h, d in zip(channels, attention, heads, depths)),
        in_channels=shape("conv_in.weight")[1], out_channels=shape("conv_out.weight")[0],
        layers_per_block=L, context_dim=shape(f"{mid}.transformer_blocks.0.attn2.to_k.weight")[1],
        linear_projection=linear, **added)
    for preset in PRESETS.values():
        if _visible(preset) == _visible(cfg):
            return preset
    return cfg


def _heads_by_rule(channels: int, linear: bool, needed: bool, stage: int) -> int:
    head_width_64 = linear            # SD2.x: num_head_channels=64; SD1.x: num_heads=8
    if head_width_64 and channels % 64 == 0:
        return channels // 64
    if not head_width_64 and channels % 8 == 0:
        return 8
    if not needed:
        return 1                      # a stage without attention never uses its head count
    rule = "head width 64 (SD2.x rule)" if head_width_64 else "8 heads (SD1.x rule)"
    raise ValueError(f"stage {stage} has {channels} channels, which {rule} does not divide; the head "
                     "count is not visible in the weights, so pass config= with the right heads")


def _added_by_rule(in_dim: int) -> dict:
    """The text_time fields of an `add_embedding` taking `in_dim` inputs. Only the total is in the
    weights; the split is SDXL's: six ids of 256 sinusoidal features each, the rest pooled text."""
    ids, width = UNetConfig.time_ids, UNetConfig.addition_time_embed_dim
    if in_dim <= ids * width:
        raise ValueError(f"add_embedding takes {in_dim} inputs, too few for SDXL's {ids} ids x {width} "
                         "features plus pooled text; pass config= with pooled_dim, time_ids and "
                         "addition_time_embed_dim")
    return {"addition_embed": "text_time", "pooled_dim": in_dim - ids * width}


def _visible(cfg: UNetConfig) -> dict:
    """The config fields that tensor shapes determine (heads, eps and sample size are not among them)."""
    last = len(cfg.stages) - 1
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "layers_per_block": cfg.layers_per_block, "context_dim": cfg.context_dim,
        "linear_projection": cfg.linear_projection,
        "stage channels": tuple(s.channels for s in cfg.stages),
        "stage attention": tuple(s.attention for s in cfg.stages),
        "transformer depth": tuple(s.depth if s.attention or i == last else None
                                   for i, s in enumerate(cfg.stages)),
        "added embedding input": cfg.projection_class_embeddings_input_dim,
    }


def _unet_tensors(tensors: Mapping[str, Tensor], label) -> tuple[str, str, dict[str, Tensor]]:
    """(layout 'ldm'|'diffusers', stripped prefix, U-Net tensors without the prefix)."""
    if any(k.startswith(LDM_PREFIX) for k in tensors):
        return "ldm", LDM_PREFIX, {k[len(LDM_PREFIX):]: v for k, v in tensors.items()
                                   if k.startswith(LDM_PREFIX)}
    if any(k.startswith(_LDM_BARE) for k in tensors):
        return "ldm", "", dict(tensors)
    if any(k.startswith(_DIFFUSERS) for k in tensors):
        return "diffusers", "", dict(tensors)
    names = sorted(tensors)
    hint = ""
    if any("lora" in k for k in names):
        hint = " It looks like a LoRA file: load it as an adapter onto a U-Net instead."
    elif any(k.startswith(("control_model.", "controlnet_")) for k in names):
        hint = " It looks like a ControlNet: load it as a ControlNet instead."
    where = label if label is not None else "the state dict"
    message = (f"no U-Net tensors found in {where}: expected names under '{LDM_PREFIX}' (single-file SD "
               f"checkpoint) or diffusers names such as 'conv_in.weight'; it has {len(names)} tensors "
               f"such as {few(names, 3) or 'none'}.{hint}")
    raise CheckpointError(message) if label is not None else ValueError(message)


def _resolve_config(config, config_json: Path | None, metadata: dict[str, str],
                    state: dict[str, Tensor], label: Path) -> tuple[UNetConfig, str]:
    """The config and a phrase saying where it came from (for messages)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose one of {sorted(PRESETS)} "
                             "or pass a UNetConfig")
        return PRESETS[config], f"config={config!r}"
    if isinstance(config, UNetConfig):
        return config, "the config= argument"
    if config is not None:
        raise TypeError(f"config must be a UNetConfig, a preset name or None, not {type(config).__name__}")
    if config_json is not None:
        try:
            return UNetConfig.from_diffusers(json.loads(config_json.read_text())), str(config_json)
        except (OSError, *CONFIG_ERRORS) as e:
            raise CheckpointError(f"{config_json} is not a usable U-Net config: {error_phrase(e)}. Fix or "
                                  "remove it (the config is then inferred from the weights), or pass "
                                  "config=.") from e
    if CONFIG_METADATA_KEY in metadata:
        try:
            return (UNetConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY])),
                    f"the {CONFIG_METADATA_KEY} metadata of {label}")
        except CONFIG_ERRORS as e:
            raise CheckpointError(f"{label}: metadata {CONFIG_METADATA_KEY!r} is not a valid U-Net config "
                                  f"({error_phrase(e)}); pass config= to override it.") from e
    try:
        return _infer(state), _INFERRED
    except (*CONFIG_ERRORS, IndexError) as e:
        raise CheckpointError(f"cannot infer the U-Net config from the tensors in {label}: {e}. Pass "
                              "config= (a UNetConfig or preset name) if this is an SD1.x/2.x/SDXL "
                              "U-Net.") from e


def _check_config(cfg: UNetConfig, origin: str, state: dict[str, Tensor], label: Path) -> None:
    """A config from outside the weights must agree with every field the weights show."""
    if origin == _INFERRED:
        return
    try:
        found = _visible(_infer(state))
    except (*CONFIG_ERRORS, IndexError):
        return          # not inferable: the key and shape checks will say what is wrong
    wanted = _visible(cfg)
    diffs = [f"{field}: config {wanted[field]}, weights {found[field]}"
             for field in wanted if wanted[field] != found[field]]
    if diffs:
        raise CheckpointError(
            f"the config from {origin} does not match the weights in {label}: {'; '.join(diffs)}. Pass the "
            "config these weights were made with, or config=None to infer it from the weights.")


def _check_and_rename(state: dict[str, Tensor], layout: str, prefix: str, cfg: UNetConfig,
                      origin: str, label: Path) -> dict[str, Tensor]:
    """Check names, shapes and values against `cfg`; return the tensors under diffusers names."""
    key_map = ldm_key_map(cfg)
    to_file = key_map if layout == "ldm" else {k: k for k in key_map}
    with torch.device("meta"):
        expected = {to_file[k]: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    wrong = [f"{prefix}{k}: expected {list(shape)}, found {list(state[k].shape)}"
             for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({few(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({few(wrong)})")
    if problems:
        raise CheckpointError(
            f"{label} does not fit the U-Net described by {origin}: {'; '.join(problems)}. Check that the "
            "file is a complete SD1.x/2.x/SDXL U-Net and that the config matches it (config=None infers it).")
    not_float = [f"{prefix}{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
                 if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"{label} holds {len(not_float)} U-Net tensors that are not floating point: {few(not_float)}. "
            "U-Net weights are float16, bfloat16 or float32; this file is not a U-Net checkpoint, or was "
            "quantized by a tool adapterkit cannot read. Use the original float weights.")
    bad = []
    for k, v in state.items():
        # A sum is NaN/inf if any element is (and, rarely, on overflow): a fast screen, then count.
        if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float32)):
            count = int((~torch.isfinite(v)).sum())
            if count:
                bad.append(f"{prefix}{k} ({count} of {v.numel()} values)")
    if bad:
        raise CheckpointError(
            f"{label} has NaN or inf values in {len(bad)} tensors: {few(bad)}. The weights are corrupt "
            "(a diverged training run or a bad half-precision conversion); use another copy.")
    from_file = {f: d for d, f in to_file.items()}
    return {from_file[k]: v for k, v in state.items()}


def save_unet(model: UNet, path: str | os.PathLike, layout: str = "diffusers",
              dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model` as a diffusers folder (layout="diffusers") or one LDM-named .safetensors ("ldm").

    diffusers: `path/config.json` (from `config.to_diffusers()`) + `path/diffusion_pytorch_model.safetensors`.
    ldm: `path` itself, keys `model.diffusion_model.<LDM name>`, the config as JSON in the
    `adapterkit.unet_config` metadata (so the head count survives). Both carry `format: pt`.
    dtype: cast on the way out (e.g. torch.float16); None keeps the model's.
    metadata: more header strings for the weights file (e.g. adapters/merge_record.py's record).

    Every file is written to a temporary name in the same folder, fsynced and renamed over the target,
    so a failed save leaves the previous file intact. (The two files of a folder are renamed one after
    the other: a crash between the renames can pair new weights with the old config.json.)
    Returns the path of the weights file.
    """
    if layout not in ("diffusers", "ldm"):
        raise ValueError(f"layout must be 'diffusers' or 'ldm', not {layout!r}")
    path = Path(path)
    if layout == "ldm":
        if path.suffix != ".safetensors":
            raise ValueError(f"an LDM single file must end in .safetensors, got {path.name!r}")
        tensors, header = ldm_tensors(model, dtype)
        write_safetensors(tensors, path, header | dict(metadata or {}))
        return path
    cfg, tensors = model.config, _plain_tensors(model, dtype)
    if path.suffix == ".safetensors":
        raise ValueError(f"layout='diffusers' writes a folder, not {path.name!r}; "
                         "use layout='ldm' for a single file")
    path.mkdir(parents=True, exist_ok=True)
    weights = path / DIFFUSERS_WEIGHTS[0]
    config_text = json.dumps(cfg.to_diffusers(), indent=2) + "\n"
    header = {"format": "pt", **(metadata or {})}
    atomic_write([(weights, lambda tmp: save_file(tensors, tmp, metadata=header)),
                   (path / "config.json", lambda tmp: tmp.write_text(config_text))])
    return weights


def ldm_tensors(model: UNet, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The U-Net's tensors as a single file stores them (`model.diffusion_model.<LDM name>`, on the CPU,
    cast to `dtype`), and the metadata that keeps its config (`adapterkit.unet_config`): what
    save_unet(layout="ldm") writes, and the U-Net part of a whole checkpoint."""
    key_map = ldm_key_map(model.config)
    tensors = _plain_tensors(model, dtype)
    return ({LDM_PREFIX + key_map[k]: v for k, v in tensors.items()},
            {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})


def _plain_tensors(model: UNet, dtype: torch.dtype | None) -> dict[str, Tensor]:
    state, key_map = model.state_dict(), ldm_key_map(model.config)
    if state.keys() != key_map.keys():
        odd = sorted(state.keys() ^ key_map.keys())
        raise ValueError(f"the model's tensors are not a plain U-Net's ({len(odd)} names differ, e.g. "
                         f"{few(odd, 3)}): merge or remove adapter layers before saving")
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


_SAMPLES = 1024


def unet_fingerprint(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """A short stable identity of a U-Net's weights, "<arch>-<weights>" (8 + 16 hex digits).

    arch: SHA-256 of the sorted tensor names and shapes; equal for every model of one architecture.
    weights: SHA-256 of the names, shapes and up to 1024 evenly strided values of each tensor, taken
    at fp16 precision, so one set of weights gives one fingerprint whether it is held in fp32 or fp16
    and on any device (bf16 copies round differently and differ). Adapter files record it to name the
    base they were made for. It identifies, it does not verify: a change confined to unsampled
    elements goes unseen. Cost: about 0.7M values for SD1.5, not 860M.
    Pass a plain U-Net: adapter layers (peft's `base_layer`, `lora_A`) change the names.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) \
        else model_or_state_dict
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach()
        line = f"{k}:{list(t.shape)}\n".encode()
        arch.update(line)
        weights.update(line)
        flat = t.reshape(-1)
        step = max(1, -(-flat.numel() // _SAMPLES))      # ceil: the samples span the whole tensor
        sample = flat[::step][:_SAMPLES].to("cpu", torch.float16).contiguous()
        weights.update(sample.view(torch.int16).numpy().tobytes())
    return f"{arch.hexdigest()[:8]}-{weights.hexdigest()[:16]}"

