"""LoRA files: safetensors in the kohya or the peft/diffusers layout, with their metadata.

Key contract (formats.md §3; names in lora_keys.py):

    kohya (default, for sharing: diffusers, ComfyUI, A1111)
        <stem>.lora_down.weight   [r, in] | [r, in, kh, kw]
        <stem>.lora_up.weight     [out, r] | [out, r, 1, 1]
        <stem>.alpha              0-dim, in the tensors' dtype
        stem: lora_unet_<U-Net path with _> in the base family's naming (diffusers names for SD1.x/2.x,
        LDM block names for SDXL: lora_unet_input_blocks_4_1_...), lora_te_/lora_te1_/lora_te2_<text
        encoder path with _> (lora_keys.py)
        metadata: ss_* minimum keys, modelspec.*, adapterkit.*
    peft (diffusers >= 0.34 `load_lora_weights`)
        unet.<path>.lora_A.weight / unet.<path>.lora_B.weight, text_encoder[_2].<path>.lora_A/B.weight
        (no alpha tensors: every key holds "lora")
        metadata: format=pt, lora_adapter_metadata = JSON LoraConfig per component, keys prefixed
        "unet." / "text_encoder." / "text_encoder_2." (r, lora_alpha, target_modules, rank_pattern,
        alpha_pattern) as diffusers' save_lora_weights writes it, modelspec.*, adapterkit.*

Reading auto-detects the layout and also takes kohya files with LDM block names (placed by the base
config: given, in the file's adapterkit.base_config, or the preset of the family the file claims),
diffusers' `unet.<path>.lora.down.weight` spelling and the attention-processor / `lora_linear_layer`
spellings of diffusers <= 0.20. Nothing is dropped silently: keys that name no layer are kept in
`Lora.unplaced` and refused by `fit`/`convert_lora` unless the caller opts in. A missing alpha is an
error unless the caller opts into alpha = rank (what kohya, ComfyUI, A1111 and diffusers do,
formats.md §3.2).

Writes are atomic (temp file + os.replace) and verified: the temp file is read back and every
layer's ΔW compared with the source before it replaces the destination. Our own metadata carries
nothing personal: no paths, no user names; the base is identified by a weights fingerprint.

One coherent thing over 450 lines: LoRA file I/O in both layouts (read, write, verify,
convert, summarize), one key table for both directions; the key names themselves are lora_keys.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import safetensors.torch
import torch
from peft.utils.other import get_pattern_key
from torch import nn

from adapterkit.unet import (
    PRESETS,
    CheckpointError,
    UNet,
    UNetConfig,
    atomic_write,
    family_of,
    read_weights,
    unet_fingerprint,
)
from adapterkit.unet.checkpoint import CONFIG_ERRORS
from adapterkit.unet.families import TINY, Family, family_like, family_of_ss_version

from .lora import (
    Lora,
    LoraModule,
    _exact,
    _list,
    check_finite,
    fit,
    load_lora,
    lora_from_model,
    lora_names,
    lora_spec,
)
from .lora_keys import (
    KOHYA_PREFIX,
    check_claims,
    claimed_family,
    guess_base,
    is_ldm_name,
    is_text_path,
    kohya_text_prefixes,
    kohya_text_stem,
    kohya_unet_stems,
    ldm_kohya_table,
    parse_kohya_diffusers,
    parse_kohya_text,
    preset_name,
    text_encoder_folders,
    text_path,
)
from .lora_text import text_lora_from_model

FORMATS = ("kohya", "peft")           # "diffusers" is accepted as a synonym of "peft"
FORMAT_VERSION = "1"
_PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up",
               ".lora.down.weight": "down", ".lora.up.weight": "up",               # diffusers' scripts
               ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}  # <= 0.20 TEs
# diffusers <= 0.20 attention processors (early SDXL DreamBooth LoRAs):
# <block>.attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_ATTN_PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0",                 # U-Net attention
              ".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj")  # CLIP
_LYCORIS = ("hada_", "lokr_")           # LoHa / LoKr factors: other adapter forms, named as kohya's
_PATTERN_KEY = re.compile(r"[\^]?[A-Za-z0-9_.\\-]{1,300}\$?")    # a module name, as peft's pattern keys


def _format(fmt: str) -> str:
    fmt = {"diffusers": "peft"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {list(FORMATS)} "
                         "(or 'diffusers', the same as peft)")
    return fmt


# safetensors in and out ------------------------------------------------------------------------------

def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata); unet.read_weights names empty files, LFS pointers, HTML pages, bad headers."""
    if not path.exists():
        raise FileNotFoundError(f"no such LoRA file: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the .safetensors file inside it")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{" and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is a PyTorch pickle, not safetensors; adapterkit reads LoRA files as "
                              "safetensors only (unpickling can run code): convert it with a trusted tool")
    return read_weights(path)


T = TypeVar("T")


def save_verified(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                  verify: Callable[[Path], T]) -> T:
    """Write `tensors` as a safetensors file that replaces `path` only after `verify(temp file)`
    returned (its result is returned): one atomic write (unet.atomic_write), never a half-written or
    unverified file where a good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    verified = []

    def write(tmp: Path) -> None:
        # clone: safetensors refuses tensors that share storage (e.g. one factor reused by two layers)
        safetensors.torch.save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp),
                                    metadata={k: str(v) for k, v in metadata.items()})
        verified.append(verify(tmp))
    atomic_write([(path, write)])
    return verified[0]


# Reading -------------------------------------------------------------------------------------------------

def detect_format(keys) -> str:
    """'kohya' or 'peft' from the key names; raises on a file that is neither or both."""
    keys = list(keys)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    peft = any(k.endswith(tuple(_PEFT_PARTS)) or _PROCESSOR.search(k) for k in keys)
    if kohya and peft:
        raise ValueError("the file mixes kohya (lora_unet_*) and peft (*.lora_A/lora_B) keys; "
                         f"loaders disagree on such files, re-export it in one layout: {_list(keys, 6)}")
    if not (kohya or peft):
        raise ValueError(f"not a LoRA: 0 lora_up/lora_down/lora_A/lora_B keys among {len(keys)} keys "
                         f"(a full model or another adapter type?): {_list(keys, 6)}")
    return "kohya" if kohya else "peft"


def read_lora(path: str | os.PathLike, base: UNetConfig | None = None,
              missing_alpha: str = "error") -> Lora:
    """Read a kohya or peft/diffusers LoRA file (layout auto-detected).

    base: the U-Net config, needed only to place LDM-named kohya keys (else taken from the file's
        adapterkit.base_config, else the preset of the family the file claims or shows, e.g. SDXL's
        for a kohya SDXL file; else those keys are left unplaced).
    missing_alpha: "error" (default) refuses modules without an alpha (or alpha 0, which kohya reads as
        rank but diffusers as 0), naming them; "rank" reads them as alpha = rank (scale 1.0).
    """
    if missing_alpha not in ("error", "rank"):
        raise ValueError(f"missing_alpha must be 'error' or 'rank', got {missing_alpha!r}")
    path = Path(path)
    tensors, metadata = _load(path)
    try:
        fmt = detect_format(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_float(tensors, path)
    lora = Lora({}, metadata=metadata, source=f"LoRA file {path.name}", format=fmt)
    if base is None and "adapterkit.base_config" in metadata:
        base = _config_from_metadata(metadata, path)
    elif base is None and fmt == "kohya" and any(is_ldm_name(k.removeprefix(KOHYA_PREFIX)) for k in tensors
                                                 if k.startswith(KOHYA_PREFIX)):
        family = claimed_family(_kohya_shapes(tensors), metadata, tensors)
        if family is not None and family.unet_preset:
            base = PRESETS[family.unet_preset]
            lora.notes.append(f"LDM names placed by the {family.title} U-Net (preset {family.unet_preset}), "
                              "the family the file claims")
    parts: dict[str, dict[str, torch.Tensor]] = {}     # canonical path -> {"down"|"up"|"alpha": tensor}
    for key, t in tensors.items():
        placed = (_place_kohya if fmt == "kohya" else _place_peft)(key, base, lora)
        if placed is not None:
            path_, part = placed
            if part in parts.setdefault(path_, {}):
                raise CheckpointError(f"{lora.source}: layer {path_} appears twice (e.g. under diffusers and "
                                 f"LDM names); keys {lora.key(path_)} and {key}")
            parts[path_][part] = t
    alphas = _peft_alphas(metadata, lora) if fmt == "peft" else {}
    broken, missing = [], []
    for p, d in parts.items():
        if "down" not in d or "up" not in d:
            broken.append(f"{lora.key(p)} (has {sorted(d)}, needs lora_down and lora_up)")
            continue
        down, up = d["down"], d["up"]
        if up.ndim != down.ndim or up.ndim not in (2, 4):
            broken.append(f"{lora.key(p)} (not a linear or conv LoRA: down {tuple(down.shape)}, "
                          f"up {tuple(up.shape)})")
            continue
        if up.shape[1] != down.shape[0]:
            broken.append(f"{lora.key(p)} (rank mismatch: down {tuple(down.shape)}, up {tuple(up.shape)})")
            continue
        if down.shape[0] == 0 or 0 in down.shape[1:] or up.shape[0] == 0:
            broken.append(f"{lora.key(p)} (empty: down {tuple(down.shape)}, up {tuple(up.shape)}; a LoRA "
                          "module has rank >= 1)")
            continue
        alpha = d.get("alpha")
        if alpha is not None:
            if alpha.numel() != 1:
                broken.append(f"{lora.key(p)}.alpha (not a scalar: shape {tuple(alpha.shape)})")
                continue
            alpha = float(alpha.float().item())
        elif p in alphas:
            alpha, rank = alphas[p]
            if rank != down.shape[0]:      # diffusers would build a layer of the metadata's rank
                broken.append(f"{lora.key(p)} (lora_adapter_metadata says rank {rank}, tensors have "
                              f"{down.shape[0]})")
                continue
        if alpha is None or alpha == 0:
            missing.append(lora.key(p))
            alpha = float(down.shape[0])
        if problem := _alpha_problem(alpha, down.shape[0]):
            broken.append(f"{lora.key(p)}.alpha ({problem})")
            continue
        lora.modules[p] = LoraModule(down, up, alpha)
    if broken:
        lycoris = any(k.partition(".")[2].startswith(_LYCORIS) for k in lora.unplaced)
        why = ("It holds LyCORIS LoHa/LoKr factors (hada_*, lokr_*), which adapterkit does not read; convert "
               "it to a LoRA with LyCORIS' own tools" if lycoris else
               "The file is broken or was written by a tool adapterkit cannot read; re-export it")
        raise CheckpointError(f"{lora.source}: {len(broken)} malformed LoRA modules: {_list(broken, 8)}. "
                              + why)
    if missing:
        if missing_alpha == "error":
            raise CheckpointError(
                f"{lora.source}: {len(missing)} of {len(lora.modules)} modules have no alpha (or alpha 0): "
                f"{_list(missing)}. kohya, ComfyUI, A1111 and diffusers read a missing alpha as "
                "alpha = rank (scale 1.0), but diffusers gives modules without one the majority alpha "
                "when others have one; pass missing_alpha='rank' (--missing-alpha rank) to read them as "
                "alpha = rank")
        lora.notes.append(f"alpha read as rank for {len(missing)} modules without one: {_list(missing, 4)}")
    try:
        check_claims(lora.shapes(), metadata, lora.source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return lora


def _config_from_metadata(metadata: dict[str, str], source) -> UNetConfig:
    try:
        return UNetConfig.from_dict(json.loads(metadata["adapterkit.base_config"]))
    except CONFIG_ERRORS as e:
        raise CheckpointError(f"{source}: metadata key adapterkit.base_config is not a valid U-Net config "
                              f"({type(e).__name__}: {str(e)[:200]}); the file was edited or written by a "
                              "broken tool: re-export it") from None


# Largest alpha / rank we accept. Trainers write scales of 1/rank to a few dozen; a file past this is
# broken or hostile (alpha 1e30 turns a merge into inf weights).
MAX_SCALE = 1000.0


def _alpha_problem(alpha: float, rank: int) -> str | None:
    """Why `alpha` cannot be a LoRA module's alpha, or None."""
    if not math.isfinite(alpha):
        return f"{alpha} is not a finite number"
    if alpha < 0:
        return (f"{alpha:g} is negative, which silently inverts the LoRA; to subtract a LoRA on purpose, "
                "give it a negative weight (FILE:-1)")
    if alpha / rank > MAX_SCALE:
        return f"{alpha:g} at rank {rank} scales the update by {alpha / rank:.3g}, over the limit " \
            f"{MAX_SCALE:g}"
    return None


def _check_float(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """LoRA factors are floating point; integer factors are a broken or foreign file. An alpha may be an
    integer scalar (diffusers' convert_state_dict_to_kohya writes `torch.tensor(alpha)` of an int)."""
    bad = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items()
           if not t.is_floating_point() and "lora" in k and not k.endswith(".alpha")]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} LoRA tensors are not floating point: {_list(bad, 4)}. "
                              "LoRA weights are float16, bfloat16 or float32; re-export the file")


def _kohya_shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """key stem -> (lora_down shape, lora_up shape), for the evidence of which base a file is for."""
    down = {k.removesuffix(".lora_down.weight"): t.shape for k, t in tensors.items()
            if k.endswith(".lora_down.weight")}
    return {stem: (shape, tensors[f"{stem}.lora_up.weight"].shape) for stem, shape in down.items()
            if f"{stem}.lora_up.weight" in tensors}


def _place_kohya(key: str, base: UNetConfig | None, lora: Lora):
    stem, _, part = key.partition(".")
    if part not in _KOHYA_PARTS:
        lora.unplaced[key] = f"unsupported key type .{part}" if part else "not a LoRA key"
        return None
    if stem.startswith(tuple(kohya_text_prefixes())):
        path = parse_kohya_text(stem)
        if path is None:
            lora.unplaced[key] = "text-encoder key that names no CLIP text-encoder layer"
            return None
        lora.names[path] = stem
        return path, _KOHYA_PARTS[part]
    if not stem.startswith(KOHYA_PREFIX):
        lora.unplaced[key] = "not a LoRA key"
        return None
    name = stem[len(KOHYA_PREFIX):]
    if is_ldm_name(name):
        if base is None:
            lora.unplaced[key] = "LDM block names: pass the base U-Net config (--base) to place them"
            return None
        path = ldm_kohya_table(base).get(name)
        why = "LDM name of no layer in this base"
    else:
        path = parse_kohya_diffusers(name)
        why = "not a U-Net layer name"
    if path is None:
        lora.unplaced[key] = why
        return None
    lora.names[path] = stem
    return path, _KOHYA_PARTS[part]


def _place_peft(key: str, base: UNetConfig | None, lora: Lora):
    if m := _PROCESSOR.search(key):
        stem, part = key[:m.start()], m.group(2)
        module = stem + "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1))
    elif suffix := next((s for s in _PEFT_PARTS if key.endswith(s)), None):
        stem = module = key[:-len(suffix)]
        part = _PEFT_PARTS[suffix]
    else:
        lora.unplaced[key] = "not a lora_A/lora_B weight (DoRA magnitude, bias or full weight?)"
        return None
    component, _, rest = module.partition(".")
    if component in text_encoder_folders():
        path = text_path(component, rest)
    else:
        path = module.removeprefix("unet.").removeprefix("base_model.model.")
    lora.names[path] = stem
    return path, part


def _component(path: str) -> str:
    """The diffusers pipeline component a canonical path belongs to."""
    return path.split(".", 1)[0] if is_text_path(path) else "unet"


def _peft_alphas(metadata: dict[str, str], lora: Lora) -> dict[str, tuple[float, int]]:
    """Per-module (alpha, rank) from `lora_adapter_metadata` (diffusers >= 0.34), one LoraConfig per
    component; {} when absent. Text-encoder modules are matched with and without the `text_model.`
    level (a flat transformers-5 CLIPTextModel has none)."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    configs = {}
    try:
        cfg = json.loads(raw)
        for component in {_component(p) for p in lora.names}:
            c = {k.removeprefix(f"{component}."): v for k, v in cfg.items() if k.startswith(f"{component}.")}
            if c:
                configs[component] = (int(c["r"]), float(c["lora_alpha"]), c.get("rank_pattern") or {},
                                      c.get("alpha_pattern") or {}, bool(c.get("use_rslora", False)))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{lora.source}: metadata key lora_adapter_metadata is not a valid LoRA "
                              f"config (needs JSON with <component>.r and <component>.lora_alpha, e.g. "
                              f"unet.r): {type(e).__name__}: {str(e)[:200]}") from None
    odd = [k[:80] for c in configs.values() for k in (*c[2], *c[3]) if not _PATTERN_KEY.fullmatch(k)]
    if odd:
        # peft matches these as regular expressions; a module name (dots escaped, ^ anchored) is all a
        # LoRA file needs, and anything more could make matching take unbounded time.
        raise CheckpointError(f"{lora.source}: lora_adapter_metadata has rank/alpha pattern keys that are "
                              f"not module names: {_list(odd, 4)}. Re-export the file with plain module "
                              "names")
    out = {}
    for path in lora.names:
        component = _component(path)
        if component not in configs:
            continue
        r, alpha, rank_pattern, alpha_pattern, rslora = configs[component]
        names = [path]
        if component != "unet":
            rel = path.split(".", 1)[1]
            names = [rel, rel.removeprefix("text_model.")]
        rank = int(_pattern_value(rank_pattern, names, r))
        a = float(_pattern_value(alpha_pattern, names, alpha))
        # rsLoRA scales by alpha/sqrt(r); the file forms here scale by alpha/r.
        out[path] = (a * math.sqrt(rank) if rslora else a, rank)
    return out


def _pattern_value(pattern: dict, names: list[str], default):
    """peft's rank/alpha_pattern lookup for the first of `names` a pattern key matches."""
    for name in names:
        key = get_pattern_key(list(pattern), name)
        if key in pattern:
            return pattern[key]
    return default


# Metadata -------------------------------------------------------------------------------------------------

def base_fingerprint(model: nn.Module) -> str:
    """unet_fingerprint of the model's base weights (adapter layers looked through)."""
    return unet_fingerprint({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                             if ".lora_" not in k})


def base_metadata(cfg: UNetConfig, fingerprint: str | None = None) -> dict[str, str]:
    """The base-model keys: what A1111 filters by (ss_base_model_version, ss_v2), ModelSpec's
    architecture and resolution, and our own exact config + weights fingerprint."""
    name, family = preset_name(cfg), family_of(cfg)
    if family.ss_version and name == family.unet_preset:          # a released family's own architecture
        version, arch = family.ss_version, family.modelspec_of(cfg)
    else:
        version, arch = f"adapterkit_{name or 'custom'}", f"adapterkit-{name or 'custom'}"
    px = cfg.sample_size * 8
    md = {"ss_base_model_version": version, "ss_v2": str(version.startswith("sd_v2")),
          "modelspec.architecture": f"{arch}/lora", "modelspec.resolution": f"{px}x{px}",
          "adapterkit.base_config": json.dumps(cfg.to_dict(), sort_keys=True)}
    if fingerprint:
        md["adapterkit.base_fingerprint"] = fingerprint
    return md


# sd-scripts library/sai_model_spec.py determine_implementation: an SDXL LoRA in kohya's LDM names is
# Stability's generative-models implementation, any other LoRA diffusers'.
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"


def modelspec_implementation(ss_version: str, fmt: str) -> str:
    """modelspec.implementation of an adapter file for a base of `ss_version` in layout `fmt`."""
    return IMPL_STABILITY if fmt == "kohya" and ss_version.startswith("sdxl") else "diffusers"


def _format_metadata(lora: Lora, fmt: str) -> dict[str, str]:
    """Source metadata + the keys that describe these tensors in this layout (recomputed, never stale)."""
    md = {k: v for k, v in lora.metadata.items() if k not in ("lora_adapter_metadata", "format")}
    rank = lora.ranks().most_common(1)[0][0] if lora.modules else 0
    alpha = lora.alphas().most_common(1)[0][0] if lora.modules else 0.0
    conv = [m for p, m in lora.modules.items() if m.down.ndim == 4 and m.down.shape[-1] > 1]
    args = {}
    if conv:
        args = {"conv_dim": str(Counter(m.rank for m in conv).most_common(1)[0][0]),
                "conv_alpha": str(Counter(m.alpha for m in conv).most_common(1)[0][0])}
    md.update({
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
        "modelspec.sai_model_spec": "1.0.1",
        "adapterkit.format_version": FORMAT_VERSION, "adapterkit.rank": str(rank),
        "adapterkit.alpha": str(alpha)})
    claimed = claimed_family(lora.shapes(), lora.metadata)         # 'unknown' rather than a guess
    md.setdefault("ss_base_model_version", claimed.ss_version if claimed else "unknown")
    md.setdefault("ss_v2", str(md["ss_base_model_version"].startswith("sd_v2")))
    md.setdefault("modelspec.title", "adapterkit LoRA")
    family = family_of_ss_version(md["ss_base_model_version"])
    arch = family.modelspec if family else "unknown"
    md.setdefault("modelspec.architecture", f"{arch}/lora")
    md["modelspec.implementation"] = modelspec_implementation(md["ss_base_model_version"], fmt)
    if fmt == "peft":
        md["format"] = "pt"
        md["lora_adapter_metadata"] = _peft_config_json(lora)
    return md


def _peft_config_json(lora: Lora) -> str:
    """LoraConfig per component as diffusers' save_lora_weights writes it: to_dict(), keys prefixed
    "unet." / "text_encoder." / "text_encoder_2.". Text-encoder targets drop the `text_model.` level,
    so that they match (by suffix) nested and flat transformers encoders alike."""
    from peft import LoraConfig

    d = {}
    for component, modules in _by_component(lora).items():
        if component != "unet":
            modules = {p.split(".", 1)[1].removeprefix("text_model."): m for p, m in modules.items()}
        rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
        key = _exact if component == "unet" else re.escape
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(modules),
                         rank_pattern={key(p): m.rank for p, m in modules.items() if m.rank != rank},
                         alpha_pattern={key(p): m.alpha for p, m in modules.items() if m.alpha != alpha})
        d |= {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}
    return json.dumps(d, indent=2, sort_keys=True, default=str)


def _by_component(lora: Lora) -> dict[str, dict[str, LoraModule]]:
    out: dict[str, dict[str, LoraModule]] = {}
    for p, m in sorted(lora.modules.items()):
        out.setdefault(_component(p), {})[p] = m
    return out


# Writing -------------------------------------------------------------------------------------------------

def _diffusers_alphas(lora: Lora) -> Lora:
    """diffusers gives every attention projection of a kohya file (U-Net to_q/to_k/to_v/to_out.0, CLIP
    self_attn q/k/v/out_proj) its component's most frequent alpha: their alpha_pattern keys never match
    (formats.md P2; `_get_alpha_name` cuts at ".lora." and their names carry "_lora."; checked for the
    text encoders in tests/adapters/test_sdxl_lora_files.py). Fold any other alpha of those into lora_up."""
    modules, odd = dict(lora.modules), []
    for part in _by_component(lora).values():
        common = Counter(m.alpha for m in part.values()).most_common(1)[0][0]
        for p, m in part.items():
            if m.alpha != common and p.endswith(_ATTN_PROJ):
                modules[p] = LoraModule(m.down, (m.up.float() * (m.alpha / common)).to(m.up.dtype), common)
                odd.append(p)
    if not odd:
        return lora
    return Lora(modules, dict(lora.metadata), dict(lora.unplaced), dict(lora.names), lora.source,
                lora.notes + [f"alpha of {len(odd)} attention modules folded into lora_up (diffusers P2)"],
                lora.format)


def _naming_base(lora: Lora, base: UNetConfig | None = None) -> tuple[UNetConfig | None, Family]:
    """The U-Net config and family a LoRA's file names follow: `base`, else the config in its
    metadata, else the released U-Net of the family it claims or shows (claimed_family), else none
    (the tiny family: diffusers names)."""
    if base is None and "adapterkit.base_config" in lora.metadata:
        base = _config_from_metadata(lora.metadata, lora.source)
    if base is not None:
        return base, family_like(base)
    family = claimed_family(lora.shapes(), lora.metadata, lora.unplaced) or TINY
    return (PRESETS[family.unet_preset] if family is not TINY else None), family


def _tensors(lora: Lora, fmt: str, dtype: torch.dtype | None, base: UNetConfig | None,
             family: Family) -> dict[str, torch.Tensor]:
    if fmt == "kohya":
        names = kohya_unet_stems([p for p in lora.modules if not is_text_path(p)], base)
        names |= {p: kohya_text_stem(p, family) for p in lora.modules if is_text_path(p)}
    else:
        names = {p: p if is_text_path(p) else f"unet.{p}" for p in lora.modules}
    out = {}
    for path, m in sorted(lora.modules.items()):
        down, up = (m.down.to(dtype), m.up.to(dtype)) if dtype else (m.down, m.up)
        k = names[path]
        if fmt == "kohya":
            out |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up,
                    f"{k}.alpha": torch.tensor(m.alpha, dtype=up.dtype)}
        else:
            out |= {f"{k}.lora_A.weight": down, f"{k}.lora_B.weight": up}
    return out


def write_lora(path: str | os.PathLike, lora: Lora, fmt: str = "kohya",
               dtype: torch.dtype | None = None, base: UNetConfig | None = None) -> dict:
    """Write `lora` atomically in `fmt`, verified: the written file is read back and each layer's ΔW
    must equal the source's (up to the rounding of `dtype` / alpha folding) before it replaces `path`.

    base: the U-Net the kohya names follow (`_naming_base`: default the config in the LoRA's metadata,
        else the released U-Net of the family it claims); SDXL-like bases get LDM block names.
    Returns the verification report {"modules", "max_rel_error", "notes"}.
    """
    fmt, path = _format(fmt), Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors only; got {path.name}")
    if not lora.modules:
        raise ValueError(f"{lora.source}: nothing to write (no LoRA modules)")
    check_finite(lora)
    base, family = _naming_base(lora, base)
    out = _diffusers_alphas(lora) if fmt == "kohya" else lora
    tensors = _tensors(out, fmt, dtype, base, family)
    overflow = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if overflow:                       # finite in fp32, not in the dtype asked for (a large merge ratio)
        raise ValueError(f"{lora.source}: {len(overflow)} tensors overflow to inf in {dtype} "
                         f"({_list(overflow, 4)}); write float32 (--dtype fp32) or use smaller ratios")
    err = save_verified(path, tensors, _format_metadata(out, fmt),
                        lambda tmp: delta_error(lora, read_lora(tmp, base=base), tol=_tolerance(lora, dtype)))
    return {"modules": len(lora.modules), "max_rel_error": err, "notes": out.notes}


def _tolerance(lora: Lora, dtype: torch.dtype | None) -> float:
    dtypes = {m.up.dtype for m in lora.modules.values()} | ({dtype} if dtype else set())
    return 8 * max(torch.finfo(d).eps for d in dtypes)


def delta_error(a: Lora, b: Lora, tol: float = 0.0) -> float:
    """Largest relative ΔW difference over layers, ||ΔW_a - ΔW_b|| / ||ΔW_a||; raises naming the layers
    missing on either side or over `tol`."""
    if a.modules.keys() != b.modules.keys():
        lost, extra = sorted(a.modules.keys() - b.modules.keys()), sorted(b.modules.keys() - a.modules.keys())
        raise ValueError(f"conversion changed the layer set: lost {_list(lost)}; gained {_list(extra)}")
    worst, bad = 0.0, []
    for p, m in a.modules.items():
        da = m.delta()
        db = b.modules[p].delta().to(da.device)          # a file read back is on the CPU; a model may not be
        if torch.equal(da, db):
            continue
        err = float((da - db).norm() / da.norm().clamp_min(1e-30))
        worst = max(worst, err)
        if err > tol:
            bad.append(f"{p} ({err:.2e})")
    if bad:
        raise ValueError(f"ΔW changed beyond {tol:.1e} in {len(bad)} layers: {_list(bad)}")
    return worst


def save_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", fmt: str = "kohya",
              title: str | None = None, dtype: torch.dtype | None = None,
              extra_metadata: dict[str, str] | None = None,
              text_encoders: dict[str, nn.Module] | None = None) -> dict:
    """Save adapter `name` of `model` with full metadata (adapter config, base config and fingerprint).

    extra_metadata: more header strings, e.g. the training config (`adapterkit.training_config`).
    text_encoders: {component: transformers text encoder}; their adapter `name` (a trained text-encoder
        LoRA, lora_text.py) goes into the same file (kohya `lora_te*_`, peft `text_encoder[_2].`)."""
    if name not in lora_names(model):
        raise ValueError(f"no LoRA named {name!r}; adapters: {lora_names(model)}")
    lora = lora_from_model(model, name)
    for folder, encoder in (text_encoders or {}).items():
        lora.modules |= text_lora_from_model(folder, encoder, name)
    lora.metadata = adapter_metadata(model, lora_spec(model, name), title or Path(path).stem, extra_metadata)
    return write_lora(path, lora, fmt, dtype)


def adapter_metadata(model: nn.Module, spec, title: str,
                     extra: dict[str, str] | None = None) -> dict[str, str]:
    """The header a saved adapter starts from: its title and date, its spec (`adapterkit.adapter`),
    the base it was trained on (config and fingerprint, when `model` is our U-Net) and `extra`."""
    md = {"modelspec.title": title,
          "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
          "adapterkit.adapter": json.dumps(spec.to_dict() if spec else {"targets": "custom"}, sort_keys=True)}
    cfg = getattr(model, "config", None)
    if isinstance(cfg, UNetConfig):
        md |= base_metadata(cfg, base_fingerprint(model))
    return md | (extra or {})


def split_lora_spec(spec: str) -> tuple[str, float]:
    """A "FILE[:WEIGHT]" argument: "file.safetensors:0.8" -> ("file.safetensors", 0.8); without a
    (numeric) suffix -> (spec, 1.0), so "C:\\x.safetensors" and "a:b.safetensors" stay whole.
    A suffix that is meant as a weight but is not a number ("F:strong", "F:": an existing F, or a word
    with no path character) is a ValueError saying so, not a "no such file" for "F:strong" later."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            if not Path(spec).exists() and (Path(head).exists() or not any(c in tail for c in "./\\")):
                raise ValueError(f"{spec}: the weight {tail!r} is not a number; write FILE:WEIGHT with a "
                                 f"number (e.g. {head}:0.8), or FILE alone for weight 1") from None
    return spec, 1.0


def load_lora_file(model: nn.Module, path: str | os.PathLike, name: str = "default", weight: float = 1.0,
                   missing_alpha: str = "error", allow_unmatched: bool = False,
                   trainable: bool = False) -> Lora:
    """Read a LoRA file against `model`'s config (so LDM-named keys place too) and inject it."""
    cfg = getattr(model, "config", None)
    lora = read_lora(path, base=cfg if isinstance(cfg, UNetConfig) else None, missing_alpha=missing_alpha)
    load_lora(model, lora, name, weight=weight, trainable=trainable, allow_unmatched=allow_unmatched)
    return lora


def convert_lora(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "kohya",
                 base: UNetConfig | None = None, missing_alpha: str = "error",
                 allow_unmatched: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Rewrite a LoRA file in another layout; every layer's ΔW is verified equal after the write.

    Keys that cannot be placed (text encoder, unknown types, LDM names without `base`) fail the
    conversion, naming them, unless `allow_unmatched`; then they are listed in the report's
    "unplaced". The source metadata is carried over; the layout keys are recomputed.
    """
    lora = read_lora(src, base=base, missing_alpha=missing_alpha)
    check_finite(lora)
    notes = _check_layers(lora, base, allow_unmatched)
    if lora.unplaced and not (allow_unmatched and lora.modules):
        raise ValueError(f"{lora.source}: {len(lora.unplaced)} keys cannot be placed in a U-Net LoRA "
                         f"({len(lora.modules)} modules can): "
                         f"{_list(f'{k} ({why})' for k, why in lora.unplaced.items())}"
                         + ("; pass allow_unmatched=True (--allow-unmatched) to convert the rest"
                            if lora.modules else ""))
    report = write_lora(dst, lora, fmt, dtype, base=base)
    return report | {"from": lora.format, "to": _format(fmt), "unplaced": dict(lora.unplaced),
                     "notes": lora.notes + notes + report["notes"]}


def _check_layers(lora: Lora, base: UNetConfig | None, allow_unmatched: bool) -> list[str]:
    """Every module fits its layer of the base (given, or the one the file records): shapes checked on
    a meta-device U-Net, so a converted file never carries a factor no loader can apply. Returns
    notes (none, or that nothing could be checked)."""
    cfg = base or (_config_from_metadata(lora.metadata, Path(lora.source))
                   if "adapterkit.base_config" in lora.metadata else None)
    if cfg is None:
        return ["layer shapes not checked: the file records no base config; pass --base to check them"]
    with torch.device("meta"):
        model = UNet(cfg)
    unet_only = {p: m for p, m in lora.modules.items() if not is_text_path(p)}    # no encoders here
    fit(dataclasses.replace(lora, modules=unet_only), model, allow_unmatched=allow_unmatched)
    return []


def summarize(path: str | os.PathLike, base: UNetConfig | None = None) -> dict:
    """What `inspect` prints: layout, base, rank/alpha per block, size, problems, metadata."""
    path = Path(path)
    lora = read_lora(path, base=base, missing_alpha="rank")
    blocks: dict[str, dict] = {}
    for p, m in sorted(lora.modules.items()):
        block = _block_of(p)
        b = blocks.setdefault(block, {"modules": 0, "ranks": Counter(), "alphas": Counter()})
        b["modules"] += 1
        b["ranks"][m.rank] += 1
        b["alphas"][m.alpha] += 1
    nonfinite = sum(int((~torch.isfinite(t)).sum()) for m in lora.modules.values() for t in (m.down, m.up))
    return {
        "file": path.name, "bytes": path.stat().st_size, "format": lora.format,
        "modules": len(lora.modules),
        "parameters": sum(m.down.numel() + m.up.numel() for m in lora.modules.values()),
        "dtypes": sorted({str(m.up.dtype).removeprefix("torch.") for m in lora.modules.values()}),
        "base": guess_base(lora.shapes(), lora.metadata, lora.unplaced) or "unknown",
        "blocks": blocks, "unplaced": lora.unplaced, "notes": lora.notes,
        "nonfinite_values": nonfinite, "metadata": lora.metadata,
    }


def _block_of(path: str) -> str:
    p = path.split(".")
    if p[0] in ("down_blocks", "up_blocks"):
        return ".".join(p[:4]) if p[2] != "downsamplers" and p[2] != "upsamplers" else ".".join(p[:3])
    if p[0] == "mid_block":
        return ".".join(p[:3])
    return p[0]
