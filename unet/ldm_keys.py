"""Original LDM (CompVis `openaimodel.py`) key names of the U-Net, derived from our own module tree.

A single-file SD checkpoint stores the U-Net under `model.diffusion_model.` with LDM names; our
modules carry diffusers names. The table between them is not typed out: `ldm_key_map(config)` builds
`UNet(config)` on the meta device and translates each of its parameter names with the rules below
(shared/research/formats.md §2.3, the same rules as diffusers' `convert_ldm_unet_checkpoint`).
With L = layers_per_block:

    conv_in                           input_blocks.0.0
    time_embedding.linear_{1,2}       time_embed.{0,2}
    add_embedding.linear_{1,2}        label_emb.0.{0,2}     (text_time configs: SDXL's `adm` MLP)
    down_blocks.b.resnets.m           input_blocks.(1 + b(L+1) + m).0      (+ resnet renames)
    down_blocks.b.attentions.m        input_blocks.(1 + b(L+1) + m).1
    down_blocks.b.downsamplers.0.conv input_blocks.((b+1)(L+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
    up_blocks.b.resnets.m             output_blocks.(b(L+1) + m).0         (+ resnet renames)
    up_blocks.b.attentions.m          output_blocks.(b(L+1) + m).1
    up_blocks.b.upsamplers.0.conv     output_blocks.(b(L+1) + L).2.conv if the block has attention
                                      else .1.conv (the upsampler follows the last layer's modules)
    conv_norm_out / conv_out          out.0 / out.2

Resnet renames: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1, norm2 out_layers.0,
conv2 out_layers.3, conv_shortcut skip_connection. Transformer sub-names are identical in both.
LDM names here are relative to `LDM_PREFIX`.
"""
from __future__ import annotations

import functools
import re

import torch

from .config import UNetConfig
from .model import UNet

LDM_PREFIX = "model.diffusion_model."

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}


def ldm_key_map(config: UNetConfig) -> dict[str, str]:
    """`{diffusers key: LDM key}` for every tensor of `UNet(config)`; LDM keys lack `LDM_PREFIX`.

    The map is a bijection (checked when built), so `{v: k for k, v in ...}` is the way back.
    """
    return dict(_key_map(config))


@functools.lru_cache(maxsize=16)
def _key_map(config: UNetConfig) -> tuple[tuple[str, str], ...]:
    with torch.device("meta"):      # names and structure only: no memory, no init cost
        model = UNet(config)
    up_attention = tuple(block.attentions is not None for block in model.up_blocks)
    pairs = tuple((k, to_ldm_key(k, config.layers_per_block, up_attention)) for k in model.state_dict())
    if len({ldm for _, ldm in pairs}) != len(pairs):
        raise AssertionError("LDM key map is not one-to-one; the translation rules are wrong")
    return pairs


def to_ldm_key(key: str, layers_per_block: int, up_attention: tuple[bool, ...]) -> str:
    """Translate one diffusers parameter name to its LDM name (without `LDM_PREFIX`).

    Needs only the two facts the LDM numbering depends on: layers per block and which up blocks
    have attention. That is what lets config inference read an LDM file by diffusers names.
    """
    for ours, theirs in _TOP_LEVEL.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    parts = key.split(".")
    group, rest = parts[0], parts[1:]
    L = layers_per_block
    try:
        if group == "down_blocks":
            b, kind, m, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
            if kind == "downsamplers":                        # tail = ["conv", "weight"]
                return f"input_blocks.{(b + 1) * (L + 1)}.0.op." + ".".join(tail[1:])
            return f"input_blocks.{1 + b * (L + 1) + m}." + _sub_block(kind, tail)
        if group == "mid_block":
            kind, m, tail = rest[0], int(rest[1]), rest[2:]
            return f"middle_block.{_MID[kind, m]}." + ".".join(_resnet(tail) if kind == "resnets" else tail)
        if group == "up_blocks":
            b, kind, m, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
            if kind == "upsamplers":
                slot = 2 if up_attention[b] else 1
                return f"output_blocks.{b * (L + 1) + L}.{slot}." + ".".join(tail)
            return f"output_blocks.{b * (L + 1) + m}." + _sub_block(kind, tail)
    except (IndexError, ValueError, KeyError):
        pass
    raise KeyError(f"no LDM name for U-Net key {key!r}")


def _sub_block(kind: str, tail: list[str]) -> str:
    if kind == "resnets":
        return "0." + ".".join(_resnet(tail))
    if kind == "attentions":
        return "1." + ".".join(tail)
    raise KeyError(kind)


def _resnet(tail: list[str]) -> list[str]:
    return [_RESNET[tail[0]], *tail[1:]]


_INPUT = re.compile(r"input_blocks\.(\d+)\.")
_OP = re.compile(r"input_blocks\.(\d+)\.0\.op\.weight$")


def ldm_structure(keys) -> tuple[int, int, tuple[bool, ...]]:
    """(stages, layers_per_block, attention per stage) read from LDM key names alone.

    `input_blocks` holds conv_in plus L+1 entries per stage except the last (no downsampler), i.e.
    S(L+1) entries; downsamplers sit at indices (b+1)(L+1). Raises ValueError if the names do not
    follow that pattern.
    """
    keys = list(keys)
    indices = {int(m.group(1)) for k in keys if (m := _INPUT.match(k))}
    if not indices or indices != set(range(max(indices) + 1)):
        raise ValueError(f"input_blocks indices are not 0..N: {sorted(indices)[:20]}")
    ops = sorted(int(m.group(1)) for k in keys if (m := _OP.match(k)))
    count, stages = max(indices) + 1, len(ops) + 1
    per_stage = ops[0] if ops else count
    if per_stage < 2 or count != stages * per_stage or ops != [(b + 1) * per_stage for b in range(len(ops))]:
        raise ValueError(f"{count} input_blocks with downsamplers at {ops} do not form equal stages")
    L = per_stage - 1
    key_set = set(keys)
    attention = tuple(f"input_blocks.{1 + b * (L + 1)}.1.norm.weight" in key_set for b in range(stages))
    return stages, L, attention
