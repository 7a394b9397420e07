"""LoRA key names: how each file format spells an adapted layer, and which base a file was made for.

The canonical name of an adapted layer is its module path in our U-Net, which is the diffusers
`UNet2DConditionModel` path (unet/model.py), e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
The formats spell it as follows (shared/research/formats.md §3):

    kohya, diffusers names (what sd-scripts writes for SD1.x/2.x; our export):
        lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{lora_down.weight,lora_up.weight,alpha}
    kohya, LDM names (what sd-scripts writes for SDXL; some SD1.x converters too; import only):
        lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q, lora_unet_middle_block_0_in_layers_2,
        lora_unet_output_blocks_2_1_conv, ...
    peft / diffusers:
        unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight

Diffusers-style kohya names are read without knowing the base (the "_"-joined path is split back by
the U-Net's own segment vocabulary). LDM names need the base config: which LDM block an index means
depends on `layers_per_block` and on which decoder stages have attention (formats.md §2.3).

The LDM names come from unet.ldm_key_map, the table single-file checkpoints are read with.
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
from adapterkit.unet.families import family_of_width

KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
_LDM_STEM = re.compile(r"(input_blocks|middle_block|output_blocks|label_emb|time_embed_\d|out_\d)(_|$)")



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
    tokens, out, i = stem.split("_"), [], 0
    vocab = _segments()
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


# Which base a file was made for ---------------------------------------------------------------------

def describe_config(cfg: UNetConfig) -> str:
    """'preset sd15 (SD1.x: context dim 768, conv proj_in)' or 'custom U-Net (...)'."""
    name = preset_name(cfg)
    family = _family_title(cfg.context_dim)
    proj = "linear proj_in" if cfg.linear_projection else "conv proj_in"
    what = f"preset {name}" if name else "custom U-Net"
    return f"{what} ({family + ': ' if family else ''}context dim {cfg.context_dim}, {proj})"


def _family_title(context_dim: int | None) -> str | None:
    family = family_of_width(context_dim)
    return family.title if family else None


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
    return "; ".join(evidence) if evidence else None
