"""What a ControlNet file and a Control-LoRA file share: the key names of both layouts
(`controlnet_key_map`: diffusers name -> lllyasviel name), the header metadata a ControlNet writes
(`controlnet_metadata`) and reads back (`attach_metadata`), and the hint encoder's geometry as its
weight shapes give it (`hint_geometry`). controlnet_files.py and control_lora.py both build on it."""
from __future__ import annotations

import functools
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

from adapterkit.unet import (
    CheckpointError,
    UNetConfig,
    ldm_key_map,
)

from .controlnet import _ENCODER_PARTS, HINT_WIDTHS, ControlNet, HintSpec
from .lora_files import base_metadata

LDM_CONTROL_PREFIX = "control_model."


FORMAT_VERSION = "1"


def controlnet_key_map(cfg: UNetConfig, hint_widths=HINT_WIDTHS) -> dict[str, str]:
    """`{diffusers name: lllyasviel name}` (without `control_model.`) for every tensor of a ControlNet."""
    return dict(_key_pairs(cfg, tuple(hint_widths)))


@functools.lru_cache(maxsize=16)
def _key_pairs(cfg: UNetConfig, hint_widths: tuple[int, ...]) -> tuple[tuple[str, str], ...]:
    unet_map = ldm_key_map(cfg)
    with torch.device("meta"):
        cn = ControlNet(cfg, hint_widths=hint_widths)
    hint = ["conv_in", *(f"blocks.{j}" for j in range(len(cn.controlnet_cond_embedding.blocks))), "conv_out"]
    convs = {f"controlnet_cond_embedding.{n}": f"input_hint_block.{2 * i}" for i, n in enumerate(hint)}
    convs |= {f"controlnet_down_blocks.{n}": f"zero_convs.{n}.0" for n in range(cfg.num_skips)}
    convs["controlnet_mid_block"] = "middle_block_out.0"
    out = {}
    for k in cn.state_dict():
        if k.startswith(_ENCODER_PARTS):
            out[k] = unet_map[k]
        else:
            module, _, param = k.rpartition(".")
            out[k] = f"{convs[module]}.{param}"
    return tuple(out.items())


def controlnet_metadata(cn: ControlNet, layout: str, title: str | None = None) -> dict[str, str]:
    """Header keys: carried-over ones, then the ones that describe this ControlNet (recomputed)."""
    md = {k: v for k, v in cn.metadata.items() if not k.startswith("adapterkit.") and k != "format"}
    # base_metadata's ss_* keys are kohya LoRA training keys: not for a ControlNet
    base = {k: v for k, v in base_metadata(cn.config, cn.base_fingerprint).items() if not k.startswith("ss_")}
    base["modelspec.architecture"] = base["modelspec.architecture"].removesuffix("/lora") + "/controlnet"
    md |= base
    md.setdefault("modelspec.date", datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    md.setdefault("modelspec.title", "adapterkit ControlNet")
    if title:
        md["modelspec.title"] = title
    md |= {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": "diffusers" if layout == "diffusers"
        else "https://github.com/lllyasviel/ControlNet",
        "modelspec.preprocessor": cn.hint.kind,
        "adapterkit.format_version": FORMAT_VERSION,
        "adapterkit.adapter": json.dumps({"type": "controlnet", "hint_channels": cn.hint_channels,
                                          "hint_widths": list(cn.hint_widths)}),
        "adapterkit.hint": json.dumps(cn.hint.to_dict(), sort_keys=True),
    }
    return md


def hint_convs(state: dict[str, Tensor], layout: str) -> list[str]:
    """Names (without .weight) of the hint encoder's convs in order."""
    if layout == "diffusers":
        n = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
        names = ["conv_in", *(f"blocks.{i}" for i in range(n)), "conv_out"]
        return [f"controlnet_cond_embedding.{name}" for name in names]
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")})
    return [f"input_hint_block.{i}" for i in idx]


def hint_geometry(state: dict[str, Tensor], layout: str, label: Path) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint widths) from the hint encoder's weight shapes."""
    names = hint_convs(state, layout)
    shapes = [tuple(state[n + ".weight"].shape) if n + ".weight" in state else None for n in names]
    if None in shapes or len(shapes) < 2 or len(shapes) % 2 or any(len(s) != 4 for s in shapes):
        raise CheckpointError(f"{label}: the hint encoder is malformed: convs {names} with weight shapes "
                              f"{shapes}; expected conv_in, pairs of blocks, conv_out (all 4-D)")
    return shapes[0][1], tuple(s[0] for s in shapes[0:-1:2])


def attach_metadata(cn: ControlNet, metadata: dict[str, str], label: Path) -> None:
    try:
        cn.hint = HintSpec.from_dict(json.loads(metadata["adapterkit.hint"])) \
            if "adapterkit.hint" in metadata else HintSpec()
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{label}: metadata adapterkit.hint is not a valid hint contract: {e}") from e
    cn.base_fingerprint = metadata.get("adapterkit.base_fingerprint")
    cn.metadata = {k: v for k, v in metadata.items() if not k.startswith("adapterkit.") and k != "format"}

