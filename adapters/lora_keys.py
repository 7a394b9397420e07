"""LoRA key names: how each file format spells an adapted layer, and which base a file was made for.

The canonical name of an adapted layer is its module path in our U-Net, which is the diffusers
`UNet2DConditionModel` path (unet/model.py), e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
The formats spell it as follows (shared/research/formats.md §3):

    kohya, diffusers names (what sd-scripts writes for SD1.x/2.x; our export for those families):
        lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{lora_down.weight,lora_up.weight,alpha}
    kohya, LDM names (what sd-scripts writes for SDXL, our export for it; some SD1.x converters too):
        lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q, lora_unet_middle_block_0_in_layers_2,
        lora_unet_output_blocks_2_2_conv, ...
    peft / diffusers:
        unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight

Which kohya naming a U-Net gets is its family's `kohya_unet_naming` (unet/families.py, by `family_like`).
Diffusers-style kohya names are read without knowing the base (the "_"-joined path is split back by
the U-Net's own segment vocabulary). LDM names need the base config: which LDM block an index means
depends on `layers_per_block` and on which decoder stages have attention (formats.md §2.3). The LDM
names come from unet.ldm_key_map, the table single-file checkpoints are read with.

Text-encoder modules are named by their diffusers pipeline component and their transformers path,
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (`text_encoder_2.` for SDXL's bigG): that
is the peft/diffusers key stem itself. kohya spells it with the family's prefix (`lora_te_` SD1.x/2.x,
`lora_te1_`/`lora_te2_` SDXL; sd-scripts networks/lora.py LORA_PREFIX_TEXT_ENCODER*):
`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`. transformers >= 5 builds CLIPTextModel
without its `text_model.` level; file names keep it (what kohya and diffusers write), and a flat
encoder's layers are matched by adding it back (`text_layer_paths`).
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from adapterkit.unet import PRESETS, UNet, UNetConfig, ldm_key_map
from adapterkit.unet.families import (
    FAMILIES,
    TINY,
    Family,
    family_like,
    family_of,
    family_of_modelspec,
    family_of_ss_version,
    family_of_width,
)

KOHYA_PREFIX = "lora_unet_"
_LDM_STEM = re.compile(r"(input_blocks|middle_block|output_blocks|label_emb|time_embed_\d|out_\d)(_|$)")
# The top-level children of transformers' CLIPTextModelWithProjection; every other text path lost the
# `text_model.` level (a flat CLIPTextModel, or a file written from one).
_TEXT_TOP = ("text_model", "text_projection")


def layer_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d a LoRA can adapt, by canonical path. A peft-wrapped layer counts once, as
    its base layer (its `base_layer`, `lora_A`, ... children are not separate targets)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrapped = {}, None
    for name, m in model.named_modules():
        if wrapped is not None and name.startswith(wrapped):
            continue
        if isinstance(m, BaseTunerLayer):
            out[name], wrapped = m.get_base_layer(), name + "."
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            out[name] = m
    return out


@functools.lru_cache(maxsize=8)
def _meta_paths(cfg: UNetConfig) -> tuple[str, ...]:
    with torch.device("meta"):
        return tuple(layer_paths(UNet(cfg)))


# kohya <-> canonical --------------------------------------------------------------------------------

def to_kohya(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


@functools.lru_cache(maxsize=1)
def _segments() -> frozenset[str]:
    """Non-numeric path segments of the U-Net (`down_blocks`, `transformer_blocks`, `to_q`, `proj_in`...)."""
    names = set()
    for path in _meta_paths(PRESETS["tiny"]):
        names.update(s for s in path.split(".") if not s.isdigit())
    return frozenset(names)


def parse_kohya_diffusers(stem: str) -> str | None:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`, or None.

    Greedy longest match against the U-Net's segment vocabulary: `to_out_0` -> `to_out.0`,
    `conv_shortcut` beats `conv`. The result is a plausible path; `fit` checks it exists.
    """
    return _split_segments(stem, _segments())


def _split_segments(stem: str, vocab: frozenset[str]) -> str | None:
    tokens, out, i = stem.split("_"), [], 0
    while i < len(tokens):
        for k in range(min(4, len(tokens) - i), 0, -1):
            seg = "_".join(tokens[i:i + k])
            if seg in vocab or (k == 1 and seg.isdigit()):
                out.append(seg)
                i += k
                break
        else:
            return None
    return ".".join(out)


def is_ldm_name(stem: str) -> bool:
    """Whether a kohya stem (without `lora_unet_`) uses LDM block names."""
    return _LDM_STEM.match(stem) is not None


@functools.lru_cache(maxsize=8)
def ldm_kohya_table(cfg: UNetConfig) -> dict[str, str]:
    """kohya LDM stem (without `lora_unet_`) -> canonical path, for every adaptable layer of `cfg`.

    From unet.ldm_key_map, the table single-file checkpoints are read with (formats.md §2.3).
    """
    table = ldm_key_map(cfg)
    return {table[f"{p}.weight"].removesuffix(".weight").replace(".", "_"): p for p in _meta_paths(cfg)}


def kohya_unet_stems(paths: Iterable[str], base: UNetConfig | None) -> dict[str, str]:
    """Canonical U-Net path -> kohya key stem (with `lora_unet_`), in the naming of the base's family:
    LDM block names for SDXL-like U-Nets (kohya's SDXL files), diffusers names otherwise."""
    paths = list(paths)
    if base is None or family_like(base).kohya_unet_naming != "ldm":
        return {p: to_kohya(p) for p in paths}
    by_path = {p: KOHYA_PREFIX + stem for stem, p in ldm_kohya_table(base).items()}
    foreign = [p for p in paths if p not in by_path]
    if foreign:
        raise ValueError(f"{len(foreign)} LoRA modules are not layers of the base U-Net "
                         f"({describe_config(base)}), so they have no LDM name: {', '.join(foreign[:8])}"
                         "; pass the base the LoRA was made for")
    return {p: by_path[p] for p in paths}


# Text encoders: kohya <-> canonical -------------------------------------------------------------------

@functools.cache
def kohya_text_prefixes() -> dict[str, str]:
    """kohya text-encoder prefix -> pipeline component, from the family table
    ({"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"})."""
    out: dict[str, str] = {}
    for te in (te for f in FAMILIES.values() for te in f.text_encoders):
        if out.setdefault(te.kohya_prefix, te.folder) != te.folder:
            raise AssertionError(f"families disagree on the component of kohya prefix {te.kohya_prefix}")
    return out


@functools.cache
def text_encoder_folders() -> frozenset[str]:
    return frozenset(te.folder for f in FAMILIES.values() for te in f.text_encoders)


def is_text_path(path: str) -> bool:
    """Whether a canonical path names a text-encoder layer (`text_encoder.…`, `text_encoder_2.…`)."""
    return path.split(".", 1)[0] in text_encoder_folders()


def text_path(folder: str, path: str) -> str:
    """The canonical path of layer `path` of component `folder`, with the `text_model.` level that
    file names always carry: ("text_encoder", "encoder.layers.0.mlp.fc1") ->
    "text_encoder.text_model.encoder.layers.0.mlp.fc1"."""
    return f"{folder}.{path if path.split('.', 1)[0] in _TEXT_TOP else 'text_model.' + path}"


def text_layer_paths(folder: str, encoder: nn.Module) -> dict[str, nn.Module]:
    """Every Linear of a transformers text encoder, by canonical path under component `folder`."""
    return {text_path(folder, p): m for p, m in layer_paths(encoder).items()}


@functools.lru_cache(maxsize=1)
def _text_segments() -> frozenset[str]:
    """Non-numeric path segments of the families' text encoders (`text_model`, `self_attn`, `q_proj`,
    `fc1`, `text_projection`...), read from the transformers classes the family table names."""
    import transformers

    names = set(_TEXT_TOP)
    for cls_name in sorted({te.cls for f in FAMILIES.values() for te in f.text_encoders}):
        cls = getattr(transformers, cls_name)
        config = cls.config_class(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, projection_dim=8)
        with torch.device("meta"):
            model = cls(config)
        for path in layer_paths(model):
            names.update(s for s in path.split(".") if not s.isdigit())
    return frozenset(names)


def parse_kohya_text(stem: str) -> str | None:
    """`lora_te2_text_model_encoder_layers_0_self_attn_q_proj` ->
    `text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj`, or None if it names no such layer."""
    prefix = next((p for p in kohya_text_prefixes() if stem.startswith(p)), None)
    if prefix is None:
        return None
    path = _split_segments(stem[len(prefix):], _text_segments())
    return text_path(kohya_text_prefixes()[prefix], path) if path else None


def kohya_text_stem(path: str, family: Family) -> str:
    """The kohya stem of a canonical text-encoder path in `family`'s prefixes."""
    folder, rest = path.split(".", 1)
    te = next((te for te in family.text_encoders if te.folder == folder), None)
    if te is None:
        raise ValueError(f"{path}: {family.title} pipelines have no {folder}, so this text-encoder "
                         f"module has no kohya name there (its components: "
                         f"{', '.join(t.folder for t in family.text_encoders)})")
    return te.kohya_prefix + rest.replace(".", "_")


# Which base a file was made for ---------------------------------------------------------------------

def describe_config(cfg: UNetConfig) -> str:
    """'preset sd15 (SD1.x: context dim 768, conv proj_in)' or 'custom U-Net (...)'."""
    name = preset_name(cfg)
    family = family_of(cfg)
    title = family.title if family is not TINY else None
    proj = "linear proj_in" if cfg.linear_projection else "conv proj_in"
    added = (f", text_time embedding of {cfg.pooled_dim}-d pooled text + {cfg.time_ids} ids"
             if cfg.addition_embed == "text_time" else "")
    what = f"preset {name}" if name else "custom U-Net"
    return f"{what} ({title + ': ' if title else ''}context dim {cfg.context_dim}, {proj}{added})"


def _family_title(context_dim: int | None) -> str | None:
    family = family_of_width(context_dim)
    return family.title if family else None


def claimed_family(shapes: dict[str, tuple[torch.Size, torch.Size]], metadata: dict[str, str],
                   other_keys: Iterable[str] = ()) -> Family | None:
    """The released family a LoRA says or shows it was made for, or None: its metadata's claim
    (adapterkit.base_config, modelspec.architecture, ss_base_model_version), else the cross-attention
    input width, else names only one family's pipeline has (SDXL's second text encoder, label_emb)."""
    claims = []
    if "adapterkit.base_config" in metadata:
        try:
            claims.append(family_of(UNetConfig.from_dict(json.loads(metadata["adapterkit.base_config"]))))
        except (ValueError, TypeError):
            pass
    claims += [family_of_modelspec(metadata.get("modelspec.architecture", "")),
               family_of_ss_version(metadata.get("ss_base_model_version", "")),
               family_of_width(context_width(shapes))]
    names = [n.replace(".", "_") for n in [*shapes, *other_keys]]
    for family in FAMILIES.values():
        own = _own_text_prefixes(family.name)
        if (own and any(n.startswith(own) for n in names)) or (
                family.time_ids and any("label_emb" in n or "add_embedding" in n for n in names)):
            claims.append(family)
    return next((f for f in claims if f is not None and f is not TINY), None)


def check_claims(shapes: dict[str, tuple[torch.Size, torch.Size]], metadata: dict[str, str],
                 source: str) -> None:
    """A file whose metadata names one released family while its tensors show another is refused,
    citing both (reliability.md B6): its `modelspec.architecture` / `ss_base_model_version` (what A1111
    and civitai file it under) against the cross-attention input width its attn2 K/V layers take."""
    width = context_width(shapes)
    shown = family_of_width(width)
    if shown is None or shown is TINY:
        return
    for key, family_of_claim in (("modelspec.architecture", family_of_modelspec),
                                 ("ss_base_model_version", family_of_ss_version)):
        claimed = family_of_claim(metadata.get(key, ""))
        if claimed is not None and claimed is not TINY and claimed is not shown:
            raise ValueError(
                f"{source}: its metadata says {claimed.title} ({key}={metadata[key]}) but its tensors are "
                f"{shown.title}'s (cross-attention input dim {width}); the file is mislabelled or damaged. "
                f"Use it with a {shown.title} base only after correcting its {key}, or get a good copy")


@functools.cache
def _own_text_prefixes(name: str) -> tuple[str, ...]:
    """How keys of the text encoders only family `name` has begin, "_"-joined: their kohya prefixes
    and component names (SDXL: lora_te1_, lora_te2_, text_encoder_2_)."""
    family = FAMILIES[name]
    others = [te for f in FAMILIES.values() if f is not family for te in f.text_encoders]
    prefixes = {te.kohya_prefix for te in family.text_encoders} - {te.kohya_prefix for te in others}
    folders = {te.folder for te in family.text_encoders} - {te.folder for te in others}
    return tuple(sorted(prefixes | {f + "_" for f in folders}))


def preset_name(cfg: UNetConfig) -> str | None:
    """The preset whose architecture `cfg` has (sample size and upcast flag do not count)."""
    for name, p in PRESETS.items():
        if cfg.replace(sample_size=p.sample_size, upcast_attention=p.upcast_attention) == p:
            return name
    return None


def context_width(shapes: dict[str, tuple[torch.Size, torch.Size]]) -> int | None:
    """The text-embedding width a LoRA's attn2.to_k/to_v layers take (their lora_down input), if any."""
    ctx = Counter(down[1] for name, (down, _) in shapes.items()
                  if "attn2" in name and name.replace(".", "_").endswith(("to_k", "to_v")) and len(down) >= 2)
    return ctx.most_common(1)[0][0] if ctx else None


def guess_base(shapes: dict[str, tuple[torch.Size, torch.Size]], metadata: dict[str, str],
               other_keys: Iterable[str] = ()) -> str | None:
    """What a LoRA was made for, from its metadata, its tensors and its key names.

    shapes: canonical path (or key stem) -> (down shape, up shape); other_keys: file keys that could
    not be placed (their names are evidence too). Evidence, in order: the
    metadata's own claim (adapterkit.base_config, modelspec.architecture, ss_base_model_version); the
    cross-attention K/V input width (768 SD1.x, 1024 SD2.x, 2048 SDXL); SDXL-only names
    (`label_emb`, transformer depth > 1); linear vs 1x1-conv `proj_in`.
    """
    evidence = []
    if "adapterkit.base_config" in metadata:
        try:
            evidence.append(describe_config(UNetConfig.from_dict(json.loads(metadata["adapterkit.base_config"]))))
        except (ValueError, TypeError):
            evidence.append("adapterkit.base_config (unreadable)")
    for key in ("modelspec.architecture", "ss_base_model_version"):
        if metadata.get(key):
            evidence.append(f"{key}={metadata[key]}")
    width = context_width(shapes)
    if width:
        family = _family_title(width)
        evidence.append(f"{family + ' ' if family else ''}cross-attention input dim {width}")
    names = [n.replace(".", "_") for n in [*shapes, *other_keys]]
    if any("label_emb" in n or "add_embedding" in n for n in names):
        evidence.append("SDXL label_emb/add_embedding keys")
    deep = [n for n in names
            if "transformer_blocks_" in n and not n.split("transformer_blocks_")[1].startswith("0_")]
    if deep:
        evidence.append(f"transformer depth > 1 ({'SDXL' if width in (None, 2048) else 'deep'}-style, "
                        f"e.g. {deep[0]})")
    proj = [len(down) for n, (down, _) in shapes.items() if n.replace(".", "_").endswith("proj_in")]
    if proj:
        evidence.append("linear proj_in (SD2.x/SDXL-style)" if proj[0] == 2
                        else "1x1-conv proj_in (SD1.x-style)")
    folders = sorted({p.split(".", 1)[0] for p in shapes if is_text_path(p)})
    if folders:
        evidence.append(f"text-encoder modules for {' and '.join(folders)}")
    family = claimed_family(shapes, metadata, other_keys)
    if evidence and family:
        evidence.append(f"family {family.title}")
    return "; ".join(evidence) if evidence else None
