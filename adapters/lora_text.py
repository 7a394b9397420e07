"""LoRA on a pipeline's text encoders (transformers CLIPTextModel / CLIPTextModelWithProjection), through
peft as on the U-Net.

    load_text_lora({"text_encoder": te}, lora, "lora0", weight=0.8)     # a file's text-encoder part
    add_text_lora(te, TextLoraSpec(rank=8, alpha=8), "default")       # a fresh one to train
    lora.modules |= text_lora_from_model("text_encoder", te, "default")  # back to canonical paths

A `Lora` keys a text-encoder module by its canonical path, the pipeline component plus the
transformers path with its `text_model.` level (`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`,
lora_keys.py); inside the encoder the module has its own path (`text_model.encoder...`, or
`encoder.layers...` for transformers >= 5's flat CLIPTextModel). The functions here translate between
the two, so the peft layers, their names and their weights are exactly those `load_lora` and
`lora_from_model` give the U-Net (same adapter names, same weight setting with `set_lora_weights`).

Targets: kohya's text-encoder module set, every Linear of CLIPAttention and CLIPMLP (sd-scripts
networks/lora.py TEXT_ENCODER_TARGET_REPLACE_MODULE = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]):
q_proj, k_proj, v_proj, out_proj, fc1, fc2; `attn` takes the attention projections only. The
projection head of SDXL's second encoder (`text_projection`) is never targeted (kohya leaves it out).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Literal

from peft import LoraConfig
from torch import nn

from .lora import Lora, _inject, all_or_nothing, load_lora, lora_from_model, lora_names
from .lora_keys import is_text_path, layer_paths, text_path

TEXT_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


@dataclass(frozen=True)
class TextLoraSpec:
    """A LoRA to train on a text encoder: rank, alpha (scale alpha/rank) and the targets preset."""
    rank: int = 16
    alpha: float = 16.0
    targets: Literal["attn", "attn-mlp"] = "attn-mlp"

    def __post_init__(self):
        if self.targets not in TEXT_TARGET_PRESETS:
            raise ValueError(f"unknown text-encoder targets {self.targets!r}; choose one of "
                             f"{list(TEXT_TARGET_PRESETS)}")
        if self.rank < 1 or not self.alpha > 0:
            raise ValueError(f"a text-encoder LoRA needs rank >= 1 and alpha > 0, got rank={self.rank} "
                             f"alpha={self.alpha}")

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha,
                          target_modules=list(TEXT_TARGET_PRESETS[self.targets]),
                          init_lora_weights=True)       # A kaiming-uniform, B zeros: no change at init

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def local_paths(folder: str, encoder: nn.Module) -> dict[str, str]:
    """Canonical path (`text_encoder.text_model.…`) -> the layer's path inside `encoder`."""
    return {text_path(folder, p): p for p in layer_paths(encoder)}


def text_part(lora: Lora, folder: str, encoder: nn.Module) -> Lora:
    """The modules of `lora` for component `folder`, keyed by their paths inside `encoder` (their file
    keys kept for messages). A module that names no layer of the encoder keeps its canonical path, so
    `fit` names it as missing."""
    local = local_paths(folder, encoder)
    modules, names = {}, {}
    for path, m in lora.modules.items():
        if path.split(".", 1)[0] == folder:
            inside = local.get(path, path)
            modules[inside], names[inside] = m, lora.key(path)
    return Lora(modules, dict(lora.metadata), {}, names, f"{lora.source} ({folder} part)", [], lora.format)


def unet_part(lora: Lora) -> Lora:
    """`lora` without its text-encoder modules (its unplaced keys stay: `fit` still refuses them)."""
    modules = {p: m for p, m in lora.modules.items() if not is_text_path(p)}
    return dataclasses.replace(lora, modules=modules)


def text_folders(lora: Lora) -> list[str]:
    """The pipeline components `lora` has modules for, sorted (`text_encoder`, `text_encoder_2`)."""
    return sorted({p.split(".", 1)[0] for p in lora.modules if is_text_path(p)})


def load_text_lora(encoders: dict[str, nn.Module], lora: Lora, name: str, weight: float = 1.0,
                   trainable: bool = False) -> dict[str, int]:
    """Inject each encoder's part of `lora` as adapter `name` (its own ranks and alphas, `load_lora`);
    returns {component: modules loaded}. The caller checks placement first (`fit` with
    `text_encoders=`); a part that still fails (it does not fit, or peft fails half-way) takes the
    parts loaded before it out again (`all_or_nothing`): every encoder is left as it was."""
    counts = {}
    with contextlib.ExitStack() as undo:          # closed by an exception: each loaded part is undone
        for folder in text_folders(lora):
            if folder not in encoders:
                raise ValueError(f"{lora.source} has modules for {folder}, which this base does not have "
                                 f"(it has {', '.join(sorted(encoders)) or 'no text encoders'})")
            part = text_part(lora, folder, encoders[folder])
            undo.enter_context(all_or_nothing(encoders[folder], name))
            load_lora(encoders[folder], part, name, weight=weight, trainable=trainable)
            counts[folder] = len(part.modules)
    return counts


def add_text_lora(encoder: nn.Module, spec: TextLoraSpec, name: str = "default", trainable: bool = True,
                  layers: int | None = None) -> int:
    """A fresh LoRA on `encoder`'s `spec.targets` layers (B zero: its outputs are unchanged); returns
    how many layers it adapts. Only the adapter's tensors require grad.

    layers: adapt only the first N transformer layers (`encoder.layers.<i>`, i < N): an encoder read at
    its penultimate hidden states (SDXL's first) never uses its last layer's output, so a LoRA there
    would get no gradient and stay zero."""
    if name in lora_names(encoder):
        raise ValueError(f"the text encoder already has a LoRA named {name!r}")
    config = spec.peft_config()
    if layers is not None:
        suffixes = tuple("." + t for t in config.target_modules)
        config.target_modules = sorted(p for p in layer_paths(encoder) if p.endswith(suffixes)
                                       and int(p.split("encoder.layers.")[1].split(".")[0]) < layers)
    _inject(encoder, config, name, trainable)
    return len(lora_from_model(encoder, name).modules)


def text_lora_from_model(folder: str, encoder: nn.Module, name: str = "default") -> dict:
    """Adapter `name` of `encoder` as {canonical path: LoraModule} (empty when it has none)."""
    if name not in lora_names(encoder):
        return {}
    return {text_path(folder, p): m for p, m in lora_from_model(encoder, name).modules.items()}
