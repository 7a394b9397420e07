"""ControlNet files: the diffusers layout (folder or single file) and lllyasviel's original layout.

Key contract (formats.md §4.1-4.2; both tested bit-exact both ways, and against diffusers'
`convert_controlnet_checkpoint`):

    diffusers   folder: config.json (a `ControlNetModel` config derived from the UNetConfig; for SDXL
                with addition_embed_type "text_time", addition_time_embed_dim and
                projection_class_embeddings_input_dim, as diffusers' from_unet writes) +
                diffusion_pytorch_model.safetensors; or one .safetensors. Names = `ControlNet` module
                names (`controlnet_cond_embedding.*`, `controlnet_down_blocks.N`, ...).
    lllyasviel  one .safetensors, every key under `control_model.`:
                    time_embed.*, input_blocks.*, middle_block.*      the encoder, by `unet.ldm_key_map`
                    input_hint_block.{0, 2, ..., 14}                  hint convs (odd indices are SiLU)
                    zero_convs.N.0                                    controlnet_down_blocks.N
                    middle_block_out.0                                controlnet_mid_block
                Read also without the prefix (thibaud's files) and from a full lllyasviel checkpoint
                (the SD parts beside `control_model.` are skipped unread).

`load_controlnet` detects the layout by its keys (`controlnet_cond_embedding.conv_in.weight` /
`[control_model.]input_hint_block.0.weight`); a Control-LoRA (`lora_controlnet` marker) goes to
control_lora.py and needs the base U-Net. The U-Net config comes from, in order: our metadata
(`adapterkit.base_config`, exact), config.json, the `unet=` given (when the tensor shapes agree), or
the tensor shapes (the SD head rule, as `unet.infer_unet_config`). Keys, shapes and finite values
are checked before anything is built: a file never yields "newly initialised" layers.

Metadata (safetensors header, strings): `modelspec.*` (architecture `<base>/controlnet`,
preprocessor), `adapterkit.hint` (the preprocessing contract: range [0, 1], RGB, resize/crop policy,
Canny thresholds), `adapterkit.base_config` and `adapterkit.base_fingerprint` (the base it was made
from). Applying a file to another base fails naming both (`controlnet.check_base`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from adapterkit.unet import (
    CheckpointError,
    UNetConfig,
    atomic_write,
    infer_unet_config,
    read_weights,
)
from adapterkit.unet import write_safetensors as _write_safetensors
from adapterkit.unet.checkpoint import CONFIG_ERRORS
from adapterkit.unet.weights import error_phrase

from .control_lora import control_lora_from_tensors
from .controlnet import HINT_WIDTHS, ControlNet, check_base, family_mismatch, same_architecture
from .controlnet_keys import (
    LDM_CONTROL_PREFIX,
    attach_metadata,
    controlnet_key_map,
    controlnet_metadata,
    hint_geometry,
)
from .lora_keys import describe_config

LAYOUTS = ("diffusers", "lllyasviel")


WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


_DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"


_LDM_MARK = "input_hint_block.0.weight"


# The other parts of a full lllyasviel / SD checkpoint: never read.
_NOT_CONTROL = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.",
                "conditioner.", "vae.", "text_encoder.")


_CONFIG_KEYS = ("in_channels", "down_block_types", "mid_block_type", "block_out_channels",
                "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
                "cross_attention_dim", "use_linear_projection", "norm_num_groups", "norm_eps",
                "upcast_attention", "flip_sin_to_cos", "freq_shift", "act_fn", "downsample_padding",
                "mid_block_scale_factor")


# What diffusers' ControlNetModel.from_unet writes for a text_time U-Net (SDXL), beside the keys above:
# the added embedding's geometry and the defaults its SDXL config.json files carry
# (diffusers/controlnet-canny-sdxl-1.0: addition_embed_type_num_heads 64, encoder_hid_dim null).
_TEXT_TIME_KEYS = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def diffusers_config(cn: ControlNet) -> dict:
    """The `config.json` of the equivalent diffusers `ControlNetModel` (what its `from_unet` writes)."""
    unet_cfg = cn.config.to_diffusers()
    config = {"_class_name": "ControlNetModel", **{k: unet_cfg[k] for k in _CONFIG_KEYS},
              "only_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
              "num_attention_heads": None, "resnet_time_scale_shift": "default",
              "conditioning_channels": cn.hint_channels,
              "conditioning_embedding_out_channels": list(cn.hint_widths),
              "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
    if cn.config.addition_embed:        # SDXL; SD1.x/2.x files keep exactly the keys above
        config |= {k: unet_cfg[k] for k in _TEXT_TIME_KEYS}
        config |= {"addition_embed_type_num_heads": 64, "encoder_hid_dim": None,
                   "encoder_hid_dim_type": None, "num_class_embeds": None}
    return config


def config_from_diffusers(d: dict) -> tuple[UNetConfig, int, tuple[int, ...]]:
    """(U-Net config, hint channels, hint widths) of a diffusers `ControlNetModel` config dict."""
    cls = d.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ValueError(f"_class_name is {cls!r}; adapterkit reads plain ControlNetModel configs only")
    if d.get("global_pool_conditions", False):
        raise ValueError("global_pool_conditions=True (a 'shuffle'-type ControlNet that averages its "
                         "residuals) is not supported")
    order = d.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"controlnet_conditioning_channel_order={order!r}; adapterkit feeds RGB hints "
                         "only (flip the channels of the first hint conv to convert)")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
    cfg = UNetConfig.from_diffusers({**d, "up_block_types": up, "out_channels": d.get("in_channels", 4)})
    widths = tuple(d.get("conditioning_embedding_out_channels") or HINT_WIDTHS)
    return cfg, int(d.get("conditioning_channels", 3)), widths


def save_controlnet(cn: ControlNet, path: str | os.PathLike, layout: str = "diffusers",
                    metadata: dict | None = None, title: str | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `cn` atomically; returns the weights file's path.

    layout "diffusers": a folder (config.json + diffusion_pytorch_model.safetensors), or one file if
    `path` ends in .safetensors. "lllyasviel": one .safetensors with `control_model.` LDM names.
    metadata: extra header keys (modelspec.description, .author, .license, ...); values that are not
    strings are stored as JSON. `adapterkit.*` keys are computed and cannot be given.
    dtype: cast on the way out (e.g. torch.float16); None keeps the ControlNet's.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ControlNet layout {layout!r}; choose one of {list(LAYOUTS)}")
    reserved = sorted(k for k in (metadata or {}) if k.startswith("adapterkit."))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by adapterkit itself (set cn.hint or "
                         "cn.base_fingerprint instead)")
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in cn.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the ControlNet has NaN/inf weights in {len(bad)} tensors ({', '.join(bad[:5])}); "
                         "refusing to save a broken model")
    md = controlnet_metadata(cn, layout, title)
    md |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    if layout == "lllyasviel":
        if path.suffix != ".safetensors":
            raise ValueError(f"the lllyasviel layout is one .safetensors file, got {path.name!r}")
        names = controlnet_key_map(cn.config, cn.hint_widths)
        _write_safetensors({LDM_CONTROL_PREFIX + names[k]: v for k, v in tensors.items()}, path, md)
        return path
    if path.suffix == ".safetensors":
        _write_safetensors(tensors, path, md)
        return path
    if path.suffix:
        raise ValueError(f"layout='diffusers' writes a folder or a .safetensors file, not {path.name!r}")
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS_NAMES[0]
    _write_safetensors(tensors, weights, md)
    _write_text(path / "config.json", json.dumps(diffusers_config(cn), indent=2) + "\n")
    return weights


def _write_text(path: Path, text: str) -> None:
    atomic_write([(path, lambda tmp: tmp.write_text(text))])


def load_controlnet(path: str | os.PathLike, unet: torch.nn.Module | None = None, *,
                    allow_other_base: bool = False, allow_pickle: bool = False,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> ControlNet:
    """Load a ControlNet from a diffusers folder (or a pipeline folder with controlnet/ inside) or one
    file in either layout (auto-detected); a Control-LoRA file too, given `unet`.

    unet: the U-Net it will steer. Then the file must have been made for it: same architecture,
        and, if the file records one, the same base fingerprint (unless `allow_other_base`).
    allow_pickle: read .ckpt/.pth/.bin, with `torch.load(weights_only=True)` only.
    dtype: parameter dtype; None means float32, whatever the file stores.
    Raises CheckpointError (a ValueError) for a file that is not a usable ControlNet.
    """
    weights, config_json = _locate(Path(path))
    seen: list[str] = []        # every name in the file, for error messages

    def keep(name: str) -> bool:
        seen.append(name)
        return not name.startswith(_NOT_CONTROL)

    tensors, metadata = read_weights(weights, allow_pickle=allow_pickle, keep=keep)
    layout, prefix = detect_layout(tensors, seen, weights)
    if layout == "control-lora":
        if unet is None:
            raise CheckpointError(f"{weights} is a Control-LoRA: it stores the difference from its base "
                                  "U-Net, so pass that U-Net as unet=")
        cn = control_lora_from_tensors(tensors, metadata, unet, weights, allow_other_base)
        return cn.to(device, dtype or torch.float32)
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    hint_channels, widths = hint_geometry(state, layout, weights)
    cfg, origin = _resolve_config(state, layout, metadata, config_json, unet, weights)
    if config_json is not None and origin != str(config_json):
        _check_config_json(config_json, cfg, hint_channels, widths)
    if unet is not None and same_architecture(cfg, unet.config):
        cfg = unet.config            # config.json lacks the informative sample_size
    state = _check_and_rename(state, layout, cfg, hint_channels, widths, origin, weights)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        cn = ControlNet(cfg, hint_channels, widths)
    cn.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    cn = cn.to(device)
    attach_metadata(cn, metadata, weights)
    if unet is not None:
        check_base(cn, unet, allow_other_base)
    return cn


def convert_controlnet(src: str | os.PathLike, dst: str | os.PathLike, layout: str = "diffusers",
                       allow_pickle: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Rewrite a ControlNet in another layout, metadata carried over; verified: every tensor read
    back from `dst` equals the source's (bit for bit unless `dtype` casts; None keeps the source's)."""
    dtype = dtype or _stored_dtype(Path(src), allow_pickle)
    cn = load_controlnet(src, allow_pickle=allow_pickle, dtype=dtype)
    out = save_controlnet(cn, dst, layout)
    back = load_controlnet(dst, dtype=dtype).state_dict()
    changed = [k for k, v in cn.state_dict().items() if not torch.equal(v, back[k])]
    if changed:
        raise AssertionError(f"conversion changed {len(changed)} tensors: {changed[:5]}")
    return out


def _stored_dtype(path: Path, allow_pickle: bool) -> torch.dtype:
    """The dtype of the file's first ControlNet tensor (reads only that one from a safetensors file)."""
    weights, _ = _locate(path)
    first: list[str] = []

    def keep(name: str) -> bool:
        if first or name.startswith(_NOT_CONTROL) or name == "lora_controlnet":
            return False
        first.append(name)
        return True

    tensors, _ = read_weights(weights, allow_pickle=allow_pickle, keep=keep)
    return next(iter(tensors.values())).dtype if tensors else torch.float32


def detect_layout(tensors, seen=(), label: Path | str = "the state dict") -> tuple[str, str]:
    """('diffusers' | 'lllyasviel' | 'control-lora', key prefix) from key names; raises on anything else."""
    keys = set(tensors)
    if "lora_controlnet" in keys:
        return "control-lora", ""
    if _DIFFUSERS_MARK in keys:
        return "diffusers", ""
    for prefix in (LDM_CONTROL_PREFIX, ""):
        if prefix + _LDM_MARK in keys:
            return "lllyasviel", prefix
    names = sorted(seen or keys)
    what = ""
    if "difference" in keys:
        what = (" It is a 'diff' ControlNet (tensors to add to the U-Net weights), which adapterkit does "
                "not read; rebuild it as a full ControlNet with its base first.")
    elif any(".lora_" in k or k.startswith("lora_") for k in names):
        what = " It looks like a LoRA: load it with load_lora_file onto a U-Net instead."
    elif any(k.startswith(("model.diffusion_model.", "conv_in.", "input_blocks.")) for k in names):
        what = " It looks like a U-Net or SD checkpoint without a ControlNet inside."
    elif any(k.startswith(LDM_CONTROL_PREFIX) for k in names) or any("zero_convs" in k for k in names):
        what = f" It has ControlNet keys but no hint encoder ({_LDM_MARK} is missing): an incomplete file."
    raise CheckpointError(
        f"{label} is not a ControlNet: expected {_DIFFUSERS_MARK!r} (diffusers layout) or "
        f"'{LDM_CONTROL_PREFIX}{_LDM_MARK}' (lllyasviel layout); it has {len(names)} tensors such as "
        f"{', '.join(names[:3]) or 'none'}.{what}")


def _locate(path: Path) -> tuple[Path, Path | None]:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a ControlNet folder (config.json + "
                              f"{WEIGHTS_NAMES[0]}) or a .safetensors file")
    if path.is_file():
        return path, None
    folder = path
    if not any((path / n).is_file() for n in WEIGHTS_NAMES) and (path / "controlnet").is_dir():
        folder = path / "controlnet"          # a pipeline folder
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            cfg = folder / "config.json"
            return folder / name, cfg if cfg.is_file() else None
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"no ControlNet weights in {folder}: looked for {', '.join(WEIGHTS_NAMES)}; "
                          f"the folder holds {', '.join(found[:12]) or 'nothing'}")


def _resolve_config(state, layout, metadata, config_json, unet, label) -> tuple[UNetConfig, str]:
    """The U-Net config and a phrase naming where it came from."""
    if "adapterkit.base_config" in metadata:
        origin = f"the adapterkit.base_config metadata of {label}"
        try:
            return UNetConfig.from_dict(json.loads(metadata["adapterkit.base_config"])), origin
        except CONFIG_ERRORS as e:
            raise CheckpointError(f"{origin} is not a valid U-Net config ({error_phrase(e)}); the file was "
                                  "edited or written by a broken tool: re-export it") from None
    if config_json is not None:
        try:
            return config_from_diffusers(json.loads(config_json.read_text()))[0], str(config_json)
        except (OSError, *CONFIG_ERRORS) as e:
            raise CheckpointError(f"{config_json} is not a usable ControlNet config ({error_phrase(e)}); "
                                  "fix it or download it again") from None
    try:
        inferred = _infer(state, layout, label)
    except CheckpointError:
        if unet is None:
            raise
        # e.g. a reduced SDXL geometry, whose added embedding's split into pooled text and ids the
        # shapes do not tell: take the U-Net's config; _check_and_rename then checks every shape.
        return unet.config, "the config of the U-Net passed as unet="
    if unet is not None:
        if _visible(inferred) != _visible(unet.config):
            raise CheckpointError(
                f"{label} holds a ControlNet for {describe_config(inferred)} {_visible(inferred)}, but the "
                f"U-Net is {describe_config(unet.config)} {_visible(unet.config)}"
                f"{family_mismatch(inferred, unet.config, 'ControlNet')}")
        return unet.config, "the config of the U-Net passed as unet="
    return inferred, "the config inferred from the tensor shapes"


def _infer(state: dict[str, Tensor], layout: str, label: Path) -> UNetConfig:
    # A ControlNet has no decoder; infer_unet_config reads only conv_out's shape from it (out channels).
    conv_in = state.get("input_blocks.0.0.weight" if layout == "lllyasviel" else "conv_in.weight")
    if conv_in is None:
        raise CheckpointError(f"{label}: the encoder's conv_in weight is missing")
    fake = torch.empty(conv_in.shape[1], conv_in.shape[0], 3, 3, device="meta")
    conv_out = "out.2.weight" if layout == "lllyasviel" else "conv_out.weight"
    try:
        return infer_unet_config({**state, conv_out: fake})
    except (*CONFIG_ERRORS, IndexError) as e:
        raise CheckpointError(f"cannot infer the U-Net config of the ControlNet in {label}: {e}. Pass "
                              "unet= (the U-Net it was made for).") from e


def _visible(cfg: UNetConfig) -> dict:
    """The config fields that tensor shapes show (not heads, norm groups/eps, sample size)."""
    last = len(cfg.stages) - 1
    return {"channels": [s.channels for s in cfg.stages], "attention": [s.attention for s in cfg.stages],
            "depth": [s.depth if s.attention or i == last else None for i, s in enumerate(cfg.stages)],
            "layers_per_block": cfg.layers_per_block, "context_dim": cfg.context_dim,
            "linear_projection": cfg.linear_projection, "in_channels": cfg.in_channels}


def _check_config_json(config_json: Path, cfg: UNetConfig, hint_channels: int, widths) -> None:
    """config.json beside weights whose config came from metadata must describe the same model."""
    try:
        c, ch, w = config_from_diffusers(json.loads(config_json.read_text()))
    except (OSError, *CONFIG_ERRORS) as e:
        raise CheckpointError(f"{config_json} is not a usable ControlNet config ({error_phrase(e)}); fix it "
                              "or download it again") from None
    if _visible(c) != _visible(cfg) or (ch, tuple(w)) != (hint_channels, tuple(widths)):
        raise CheckpointError(f"{config_json} contradicts the weights' metadata: {_visible(c)} vs "
                              f"{_visible(cfg)}, hint {ch}/{list(w)} vs {hint_channels}/{list(widths)}")


def _check_and_rename(state, layout, cfg, hint_channels, widths, origin, label) -> dict[str, Tensor]:
    """Check names, shapes and values against `cfg`; return the tensors under diffusers names."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ControlNet(cfg, hint_channels, widths).state_dict().items()}
    to_file = controlnet_key_map(cfg, widths) if layout == "lllyasviel" else {k: k for k in expected}
    prefix = LDM_CONTROL_PREFIX if layout == "lllyasviel" else ""
    missing = [prefix + to_file[k] for k in expected if to_file[k] not in state]
    known = set(to_file.values())
    unexpected = [prefix + k for k in state if k not in known]
    wrong = [f"{prefix}{to_file[k]}: expected {list(s)}, found {list(state[to_file[k]].shape)}"
             for k, s in expected.items() if to_file[k] in state and tuple(state[to_file[k]].shape) != s]
    problems = [f"{len(items)} {what} ({_few(items)})" for what, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("tensors of the wrong shape", wrong)) if items]
    if problems:
        raise CheckpointError(f"{label} does not fit the ControlNet described by {origin}: "
                              f"{'; '.join(problems)}. The file is incomplete or made for another U-Net.")
    not_float = [f"{prefix}{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
                 if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{label} holds {len(not_float)} ControlNet tensors that are not floating "
                              f"point: {_few(not_float)}. ControlNet weights are float16, bfloat16 or "
                              "float32; use the original float weights")
    bad = [f"{prefix}{k}" for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{label} has NaN or inf values in {len(bad)} tensors: {_few(bad)}; the "
                              "weights are corrupt, use another copy")
    return {k: state[to_file[k]] for k in expected}


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")

