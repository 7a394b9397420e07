"""LyCORIS files (LoHa, LoKr, DoRA): the kohya/LyCORIS layout ComfyUI and A1111 read, and the
peft/diffusers layout for LoRA and peft's row-wise DoRA.

Key contract (the tensors and what they mean: lycoris.py's module docstring):

    kohya/LyCORIS (default)
        lora_unet_<path with _>.hada_w1_a | hada_w1_b | hada_w2_a | hada_w2_b [| hada_t1 | hada_t2]
        lora_unet_<path with _>.lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b [+ lokr_t2]
        lora_unet_<path with _>.lora_down.weight, .lora_up.weight, .dora_scale   (DoRA, per input column)
        lora_unet_<path with _>.alpha                                          0-dim, every module
        metadata: ss_network_module=lycoris.kohya, ss_network_args (algo, conv_dim, conv_alpha,
        use_tucker, factor, dora_wd, wd_on_output), modelspec.*, adapterkit.kind,
        adapterkit.convention=lycoris (alpha / rank of the file's factors; LoKr with both halves full:
        scale 1; dora_scale per input column), adapterkit.base_config / base_fingerprint
    peft/diffusers (LoRA and peft's DoRA only)
        unet.<path>.lora_A.weight, .lora_B.weight, .lora_magnitude_vector ([out] | [1, out, 1, 1])
        metadata: lora_adapter_metadata (JSON LoraConfig, "unet."-prefixed, use_dora), format=pt,
        adapterkit.convention=peft (magnitude per output row)

Names are the ones lora_keys.py gives plain LoRA (the diffusers-style kohya stem); reading also takes
LDM-style stems given the base config. A module is one kind, told by its tensor names; a module
mixing kinds (hada_* beside lora_up, ...) is refused, as is a DoRA file without its magnitudes.
Nothing is dropped silently: unplaced keys are kept with the reason, and `Lycoris.fit` refuses them.

A LyCORIS-written DoRA (its default wd_on_output=True) holds dora_scale per output row: it is read
with LyCORIS's meaning, but no client computes that (A1111 reads columns only; ComfyUI's output-axis
branch divides by the base weight's norm), so it is written back in the peft layout only.

Writes are atomic and verified: the temp file is read back and every tensor and scale compared with
the source (up to the rounding of `dtype`) before it replaces the destination.

One coherent thing over 450 lines: LyCORIS file I/O (detect, read, write, verify, convert,
summarize), one layout table for both directions.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from adapterkit.unet import UNetConfig, unet_fingerprint
from adapterkit.unet.families import family_of_ss_version

from .lora import Lora, _list, load_lora, lora_names
from .lora_files import (
    FORMAT_VERSION,
    _block_of,
    _config_from_metadata,
    _load,
    _peft_alphas,
    _peft_config_json,
    adapter_metadata,
    modelspec_implementation,
    read_lora,
    save_verified,
)
from .lora_keys import (
    KOHYA_PREFIX,
    check_claims,
    claimed_family,
    guess_base,
    is_ldm_name,
    kohya_text_prefixes,
    ldm_kohya_table,
    parse_kohya_diffusers,
    text_encoder_folders,
    to_kohya,
)
from .lycoris import (
    PARTS,
    Lycoris,
    LycorisModule,
    kind_of_part,
    load_lycoris,
    lycoris_from_model,
    lycoris_spec,
)

LAYOUTS = ("kohya", "peft")
_EXTRA = ("alpha", "dora_scale")
_PEFT_PARTS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
               ".lora_magnitude_vector": "dora_scale"}
_UNSUPPORTED = {"diff": "a full-weight difference (LyCORIS 'full') is not supported",
                "oft_blocks": "OFT is not supported", "oft_diag": "OFT is not supported",
                "w_norm": "a norm-layer adapter is not supported",
                "b_norm": "a norm-layer adapter is not supported"}


def is_lycoris(keys) -> bool:
    """Whether a file's keys hold LoHa/LoKr/DoRA tensors (else it is plain LoRA, lora_files.py)."""
    parts = {k.partition(".")[2] for k in keys}
    return (any(kind_of_part(p) in ("loha", "lokr") or p in ("dora_scale", "lora_mid.weight") for p in parts)
            or any(k.endswith(".lora_magnitude_vector") for k in keys))


def read_adapter(path: str | os.PathLike, base: UNetConfig | None = None,
                 missing_alpha: str = "error") -> Lora | Lycoris:
    """A LoRA file as `Lora` (lora_files.read_lora), a LoHa/LoKr/DoRA file as `Lycoris` (by its keys)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            lycoris = is_lycoris(f.keys())
    except (OSError, SafetensorError):
        lycoris = False                           # read_lora names what is wrong with the file
    read = read_lycoris if lycoris else read_lora
    return read(path, base=base, missing_alpha=missing_alpha)


def _layout(fmt: str) -> str:
    fmt = {"diffusers": "peft", "lycoris": "kohya"}.get(fmt, fmt)
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown LyCORIS layout {fmt!r}; choose one of {list(LAYOUTS)}")
    return fmt


# Reading -------------------------------------------------------------------------------------------------

def read_lycoris(path: str | os.PathLike, base: UNetConfig | None = None,
                 missing_alpha: str = "error") -> Lycoris:
    """Read a LoHa/LoKr/DoRA (or plain LoRA) file in the kohya/LyCORIS or peft layout (auto-detected).

    base: the U-Net config, needed only to place LDM-named keys (else the file's adapterkit.base_config).
    missing_alpha: "error" refuses modules without alpha (or alpha 0: A1111/ComfyUI read 0 as no
        effect, LyCORIS as rank); "rank" reads them as the clients read a missing alpha, scale 1.
    """
    if missing_alpha not in ("error", "rank"):
        raise ValueError(f"missing_alpha must be 'error' or 'rank', got {missing_alpha!r}")
    path = Path(path)
    tensors, metadata = _load(path)
    peft = any(k.endswith(tuple(_PEFT_PARTS)) for k in tensors)
    if peft and any(k.startswith(KOHYA_PREFIX) for k in tensors):
        raise ValueError(f"{path.name} mixes kohya (lora_unet_*) and peft (unet.*.lora_A) keys; re-export "
                         "it in one layout")
    if base is None and "adapterkit.base_config" in metadata:
        base = _config_from_metadata(metadata, path)
    lyco = Lycoris({}, metadata=metadata, source=f"LyCORIS file {path.name}",
                   format="peft" if peft else "kohya")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        placed = _place_peft(key, lyco) if peft else _place_kohya(key, base, lyco)
        if placed is not None:
            groups.setdefault(placed[0], {})[placed[1]] = t
    alphas = _peft_alphas(metadata, lyco) if peft else {}
    broken, missing = [], []
    for p, parts in groups.items():
        if peft and "dora_scale" in parts:                # peft's magnitude: [out] | [1, out, 1, 1]
            m = parts["dora_scale"]
            parts["dora_scale"] = m[:, None] if m.ndim == 1 else m.transpose(0, 1)
        module = _module(parts, alphas.get(p, (None, 0))[0], lyco.key(p), broken)
        if module is None:
            continue
        if module.alpha is None or module.alpha == 0:
            missing.append(lyco.key(p))
            module.alpha = None
        lyco.modules[p] = module
    if broken:
        raise ValueError(f"{lyco.source}: {len(broken)} malformed modules: {_list(broken, 8)}")
    _check_dora_claim(lyco)
    if missing:
        if missing_alpha == "error":
            raise ValueError(f"{lyco.source}: {len(missing)} of {len(lyco.modules)} modules have no alpha "
                             f"(or alpha 0): {_list(missing)}. ComfyUI and A1111 read a missing alpha as "
                             "scale 1 but alpha 0 as no effect; pass missing_alpha='rank' "
                             "(--missing-alpha rank) to read both as scale 1")
        lyco.notes.append(f"scale 1 for {len(missing)} modules without alpha: {_list(missing, 4)}")
    check_claims(lyco.shapes(), metadata, lyco.source)
    return lyco


def _text_prefixes() -> tuple[str, ...]:
    """Key prefixes of text-encoder modules in either layout (kohya `lora_te*_`, diffusers/peft
    `text_encoder*.`): LyCORIS adapters here adapt the U-Net only."""
    return (*kohya_text_prefixes(), *(f"{folder}." for folder in sorted(text_encoder_folders())))


def _place_kohya(key: str, base: UNetConfig | None, lyco: Lycoris) -> tuple[str, str] | None:
    stem, _, part = key.partition(".")
    why = None
    if key.startswith(_text_prefixes()):
        why = "text-encoder adapter; adapterkit adapts only the U-Net"
    elif not stem.startswith(KOHYA_PREFIX):
        why = "not a LyCORIS key (no lora_unet_ prefix)"
    elif kind_of_part(part) is None and part not in _EXTRA:
        why = _UNSUPPORTED.get(part, f"unsupported key type .{part}")
    if why:
        lyco.unplaced[key] = why
        return None
    name = stem[len(KOHYA_PREFIX):]
    if is_ldm_name(name):
        path = ldm_kohya_table(base).get(name) if base is not None else None
        why = ("LDM name of no layer in this base" if base is not None
               else "LDM block names: pass the base U-Net config (--base) to place them")
    else:
        path, why = parse_kohya_diffusers(name), "not a U-Net layer name"
    if path is None:
        lyco.unplaced[key] = why
        return None
    if lyco.names.setdefault(path, stem) != stem:
        raise ValueError(f"{lyco.source}: layer {path} appears twice (e.g. under diffusers and LDM names); "
                         f"keys {lyco.names[path]} and {stem}")
    return path, part


def _place_peft(key: str, lyco: Lycoris) -> tuple[str, str] | None:
    suffix = next((s for s in _PEFT_PARTS if key.endswith(s)), None)
    if key.startswith(_text_prefixes()) or suffix is None:
        lyco.unplaced[key] = ("text-encoder adapter; adapterkit adapts only the U-Net"
                              if suffix else "not a lora_A/lora_B/lora_magnitude_vector tensor")
        return None
    stem = key[:-len(suffix)]
    path = stem.removeprefix("unet.").removeprefix("base_model.model.")
    lyco.names[path] = stem
    part = _PEFT_PARTS[suffix]
    return path, part


def _module(parts: dict[str, torch.Tensor], peft_alpha: float | None, key: str,
            broken: list[str]) -> LycorisModule | None:
    """The module these tensors make, or None with the reason appended to `broken`."""
    kinds = sorted({k for p in parts if (k := kind_of_part(p))})
    if len(kinds) > 1:
        broken.append(f"{key} mixes {' and '.join(kinds)} tensors in one module ({sorted(parts)}); "
                      "loaders disagree on which they apply")
        return None
    if not kinds:
        broken.append(f"{key} has only {sorted(parts)}, no factors (a DoRA magnitude without its LoRA?)")
        return None
    kind = kinds[0]
    tensors = {p: t for p, t in parts.items() if p in PARTS[kind]}
    if why := _incomplete(kind, set(tensors)):
        broken.append(f"{key} ({why}; has {sorted(parts)})")
        return None
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        broken.append(f"{key}.alpha (not a scalar: shape {tuple(alpha.shape)})")
        return None
    alpha = float(alpha.float().item()) if alpha is not None else peft_alpha
    return LycorisModule(kind, tensors, alpha, parts.get("dora_scale"))


def _incomplete(kind: str, have: set[str]) -> str | None:
    if kind == "lora":                             # + lora_mid: Tucker LoCon
        return None if {"lora_down.weight", "lora_up.weight"} <= have else "needs lora_down and lora_up"
    if kind == "loha":
        core = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not core <= have:
            return f"LoHa needs {sorted(core)}"
        tucker = have & {"hada_t1", "hada_t2"}
        return "LoHa Tucker needs both hada_t1 and hada_t2" if len(tucker) == 1 else None
    for half in ("w1", "w2"):
        full, pair = f"lokr_{half}" in have, {f"lokr_{half}_a", f"lokr_{half}_b"} <= have
        if full == pair:
            return f"LoKr needs lokr_{half} or both lokr_{half}_a and lokr_{half}_b, not both or neither"
    if "lokr_t2" in have and "lokr_w2" in have:
        return "lokr_t2 belongs to a factored w2, not to a full lokr_w2"
    return None


def _check_dora_claim(lyco: Lycoris) -> None:
    """A file whose metadata says DoRA must carry a magnitude for every module."""
    md = lyco.metadata
    args = _json(md.get("ss_network_args"))
    peft = _json(md.get("lora_adapter_metadata"))
    claims = (md.get("adapterkit.kind") == "dora" or str(args.get("dora_wd", "")).lower() == "true"
              or bool(peft.get("unet.use_dora")))
    lacking = [lyco.key(p) for p, m in lyco.modules.items() if m.dora_scale is None]
    if claims and lacking:
        raise ValueError(f"{lyco.source}: its metadata says DoRA but {len(lacking)} modules have no "
                         f"magnitude (dora_scale / lora_magnitude_vector): {_list(lacking)}; without it the "
                         "file is not the adapter that was trained (re-export it)")


def _json(raw: str | None) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# Writing -------------------------------------------------------------------------------------------------

def write_lycoris(path: str | os.PathLike, lyco: Lycoris, fmt: str = "kohya",
                  dtype: torch.dtype | None = None) -> dict:
    """Write `lyco` atomically in `fmt`, verified by reading it back; returns {"modules", "notes"}."""
    fmt, path = _layout(fmt), Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files are written as .safetensors only; got {path.name}")
    if not lyco.modules:
        raise ValueError(f"{lyco.source}: nothing to write (no U-Net modules)")
    lyco.check_finite()
    _check_layout(lyco, fmt)
    tensors = _tensors(lyco, fmt, dtype)
    save_verified(path, tensors, _metadata(lyco, fmt),
                  lambda tmp: _verify(lyco, read_lycoris(tmp, missing_alpha="rank"), dtype))
    return {"modules": len(lyco.modules), "notes": list(lyco.notes)}


def _check_layout(lyco: Lycoris, fmt: str) -> None:
    """Refuse, naming the modules, what the layout's readers would compute differently."""
    if fmt == "kohya":
        rows = [lyco.key(p) for p, m in lyco.modules.items() if m.dora_axis == "output"]
        if rows:
            raise ValueError(f"{lyco.source}: {len(rows)} modules are peft's row-wise DoRA (one magnitude "
                             f"per output row: {_list(rows, 4)}); ComfyUI and A1111 read dora_scale per "
                             "input column, and no exact conversion exists. Write it in the peft layout "
                             "(fmt='peft'), or train a column-wise DoRA (dora_axis='input')")
        return
    odd = [f"{lyco.key(p)} ({m.label}{', Tucker' if 'lora_mid.weight' in m.tensors else ''})"
           for p, m in lyco.modules.items()
           if m.kind != "lora" or m.dora_axis == "input" or "lora_mid.weight" in m.tensors]
    if odd:
        columns = any(m.kind == "lora" and m.dora_axis == "input" for m in lyco.modules.values())
        tucker = any("lora_mid.weight" in m.tensors for m in lyco.modules.values())
        why = ("diffusers would read a column-wise DoRA as row-wise" if columns else
               "peft's LoRA has no lora_mid (`convert --rank R`, R the module rank, writes the exact plain "
               "LoCon)" if tucker else "peft's LoHa/LoKr layers have no diffusers file form")
        raise ValueError(f"{lyco.source}: the peft layout holds LoRA and peft's row-wise DoRA only, not "
                         f"{_list(odd, 4)}: {why}. Write it in the kohya/LyCORIS layout (fmt='kohya')")


def _tensors(lyco: Lycoris, fmt: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in sorted(lyco.modules.items()):
        parts = {k: (v.to(dtype) if dtype else v) for k, v in m.tensors.items()}
        some = next(iter(parts.values()))
        if fmt == "kohya":
            stem = to_kohya(path)
            out |= {f"{stem}.{k}": v for k, v in parts.items()}
            alpha = m.alpha if m.alpha is not None else float(m.rank or 1)
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=some.dtype)
            if m.dora_scale is not None:
                out[f"{stem}.dora_scale"] = m.dora_scale.to(dtype or m.dora_scale.dtype)
        else:
            out |= {f"unet.{path}.lora_A.weight": parts["lora_down.weight"],
                    f"unet.{path}.lora_B.weight": parts["lora_up.weight"]}
            if m.dora_scale is not None:                 # peft's shapes: [out] | [1, out, 1, 1]
                scale = m.dora_scale.to(dtype or m.dora_scale.dtype)
                out[f"unet.{path}.lora_magnitude_vector"] = (scale.flatten() if scale.ndim == 2
                                                              else scale.transpose(0, 1))
    return out


def _network_args(lyco: Lycoris) -> dict[str, str]:
    """kohya's ss_network_args as LyCORIS writes them (strings)."""
    kinds = Counter(m.kind for m in lyco.modules.values())
    conv = [m for m in lyco.modules.values() if _kernel(m) > 1 and m.rank is not None]
    args = {"algo": kinds.most_common(1)[0][0]}
    if conv:
        args |= {"conv_dim": str(Counter(m.rank for m in conv).most_common(1)[0][0]),
                 "conv_alpha": str(Counter(m.alpha for m in conv).most_common(1)[0][0])}
    if any(m.tensors.keys() & {"hada_t1", "lokr_t2", "lora_mid.weight"} for m in lyco.modules.values()):
        args["use_tucker"] = "True"
    axes = {m.dora_axis for m in lyco.modules.values()} - {None}
    if axes:
        args |= {"dora_wd": "True", "wd_on_output": str(axes == {"output"})}
    return args


def _kernel(m: LycorisModule) -> int:
    """Kernel size of a conv module when its tensors say it (1 for Linear/1x1 or unknown)."""
    for part in ("lora_mid.weight", "lora_down.weight", "hada_t1", "lokr_t2", "lokr_w2"):
        if part in m.tensors and m.tensors[part].ndim == 4:
            return m.tensors[part].shape[-1]
    return 1


def _metadata(lyco: Lycoris, fmt: str) -> dict[str, str]:
    """Source metadata + the keys describing these tensors in this layout (recomputed, never stale)."""
    md = {k: v for k, v in lyco.metadata.items() if k not in ("lora_adapter_metadata", "format")}
    ranks, alphas = lyco.ranks(), lyco.alphas()
    kinds = sorted(lyco.kinds())
    md |= {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(_network_args(lyco)),
           "ss_network_dim": str(ranks.most_common(1)[0][0]),
           "ss_network_alpha": str(alphas.most_common(1)[0][0]),
           "modelspec.sai_model_spec": "1.0.1",
           "adapterkit.format_version": FORMAT_VERSION,
           "adapterkit.kind": kinds[0].removesuffix(" (row)") if len(kinds) == 1 else ",".join(kinds),
           "adapterkit.convention": "lycoris" if fmt == "kohya" else "peft"}
    claimed = claimed_family(lyco.shapes(), lyco.metadata)         # 'unknown' rather than a guess
    md.setdefault("ss_base_model_version", claimed.ss_version if claimed else "unknown")
    md.setdefault("ss_v2", str(md["ss_base_model_version"].startswith("sd_v2")))
    md.setdefault("modelspec.title", "adapterkit LyCORIS")
    family = family_of_ss_version(md["ss_base_model_version"])
    md.setdefault("modelspec.architecture", f"{family.modelspec if family else 'unknown'}/lora")
    md["modelspec.implementation"] = modelspec_implementation(md["ss_base_model_version"], fmt)
    if fmt == "peft":
        cfg = json.loads(_peft_config_json(lyco))
        cfg["unet.use_dora"] = any(m.dora_scale is not None for m in lyco.modules.values())
        md |= {"format": "pt", "lora_adapter_metadata": json.dumps(cfg, indent=2, sort_keys=True)}
    return md


def _verify(src: Lycoris, back: Lycoris, dtype: torch.dtype | None) -> None:
    """Every tensor and scale read back equals the source's (cast to `dtype`)."""
    if src.modules.keys() != back.modules.keys():
        changed = sorted(src.modules.keys() ^ back.modules.keys())
        raise ValueError(f"the write changed the layer set: {_list(changed)}")
    bad = []
    for p, m in src.modules.items():
        b = back.modules[p]
        want = {k: v.to(dtype) if dtype else v for k, v in m.all_tensors().items()}
        got = b.all_tensors()
        same = want.keys() == got.keys() and all(torch.equal(want[k].cpu(), got[k].reshape(want[k].shape))
                                                 for k in want)
        if not same or b.kind != m.kind or abs(b.scale - m.scale) > 1e-6 * max(1.0, abs(m.scale)):
            bad.append(p)
    if bad:
        raise ValueError(f"the written file reads back differently in {len(bad)} modules: {_list(bad)}")


# Models and files -------------------------------------------------------------------------------------------

def base_fingerprint(model: nn.Module) -> str:
    """unet_fingerprint of the base weights under any adapters (peft's `.base_layer` hops removed)."""
    state = {}
    for k, v in model.state_dict().items():
        if not re.search(r"\.(lora_\w+|hada_\w+|lokr_\w+)\.", k + "."):
            state[re.sub(r"(\.base_layer)+\.", ".", k)] = v
    return unet_fingerprint(state)


def save_lycoris(model: nn.Module, path: str | os.PathLike, name: str = "default", fmt: str = "kohya",
                 title: str | None = None, dtype: torch.dtype | None = None,
                 extra_metadata: dict[str, str] | None = None) -> dict:
    """Save adapter `name` of `model` with its metadata (adapter spec, base config and fingerprint)."""
    if name not in lora_names(model):
        raise ValueError(f"no adapter named {name!r}; adapters: {lora_names(model)}")
    lyco = lycoris_from_model(model, name)
    lyco.metadata = adapter_metadata(model, lycoris_spec(model, name), title or Path(path).stem,
                                     extra_metadata)
    return write_lycoris(path, lyco, fmt, dtype)


def load_adapter_file(model: nn.Module, path: str | os.PathLike, name: str = "default", weight: float = 1.0,
                      missing_alpha: str = "error", allow_unmatched: bool = False,
                      trainable: bool = False) -> Lora | Lycoris:
    """Read any adapter file (LoRA, LoHa, LoKr, DoRA; by its keys) against `model` and inject it."""
    cfg = getattr(model, "config", None)
    base = cfg if isinstance(cfg, UNetConfig) else None
    adapter = read_adapter(path, base=base, missing_alpha=missing_alpha)
    load = load_lycoris if isinstance(adapter, Lycoris) else load_lora
    load(model, adapter, name, weight=weight, trainable=trainable, allow_unmatched=allow_unmatched)
    return adapter


def convert_lycoris(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "kohya",
                    base: UNetConfig | None = None, missing_alpha: str = "error",
                    allow_unmatched: bool = False, dtype: torch.dtype | None = None) -> dict:
    """Rewrite a LyCORIS file in another layout where both hold it (else the refusal says why)."""
    lyco = read_lycoris(src, base=base, missing_alpha=missing_alpha)
    if lyco.unplaced and not (allow_unmatched and lyco.modules):
        raise ValueError(f"{lyco.source}: {len(lyco.unplaced)} keys cannot be placed "
                         f"({len(lyco.modules)} modules can): "
                         f"{_list(f'{k} ({why})' for k, why in lyco.unplaced.items())}"
                         + ("; pass allow_unmatched=True (--allow-unmatched) to convert the rest"
                            if lyco.modules else ""))
    report = write_lycoris(dst, lyco, fmt, dtype)
    return report | {"from": lyco.format, "to": _layout(fmt), "unplaced": dict(lyco.unplaced)}


def summarize_lycoris(path: str | os.PathLike, base: UNetConfig | None = None) -> dict:
    """What `inspect` prints: layout, kinds, rank/alpha per block, size, base, problems, metadata."""
    path = Path(path)
    lyco = read_lycoris(path, base=base, missing_alpha="rank")
    blocks: dict[str, dict] = {}
    for p, m in sorted(lyco.modules.items()):
        b = blocks.setdefault(_block_of(p), {"modules": 0, "kinds": Counter(), "ranks": Counter(),
                                             "alphas": Counter()})
        b["modules"] += 1
        b["kinds"][m.label] += 1
        b["ranks"][m.rank] += 1
        b["alphas"][m.alpha] += 1
    values = [t for m in lyco.modules.values() for t in m.all_tensors().values()]
    return {
        "file": path.name, "bytes": path.stat().st_size, "format": lyco.format,
        "kinds": dict(lyco.kinds()), "modules": len(lyco.modules),
        "parameters": sum(t.numel() for t in values),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in values}),
        "base": guess_base(lyco.shapes(), lyco.metadata, lyco.unplaced) or "unknown",
        "blocks": blocks, "unplaced": lyco.unplaced, "notes": lyco.notes,
        "nonfinite_values": sum(int((~torch.isfinite(t)).sum()) for t in values), "metadata": lyco.metadata,
    }
