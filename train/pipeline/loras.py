"""Adapter files on a whole base: the U-Net part of a LoRA on the U-Net, its text-encoder part on the
text encoders, under one adapter name and one weight.

    applied = load_lora_on_base(base, "style.safetensors", name="lora0", weight=0.8)
    print(applied.line())        # lora0: style.safetensors x0.8: 192 U-Net modules, text_encoder 72 modules
    set_base_lora_weights(base, {"lora0": 0.0})       # off everywhere (the base alone), on again later

Community LoRAs carry text-encoder modules (`lora_te_*`, kohya's default; `lora_te1_`/`lora_te2_` for
SDXL; `text_encoder[_2].*` in diffusers files): diffusers' `load_lora_weights`, ComfyUI and A1111
apply them to the CLIP encoders, so a picture made here with the U-Net part alone would not be the
picture the LoRA makes there. Here both parts go in through peft (adapters/lora_text.py for the
encoders), so the text conditioning of `encode_text` and the U-Net both carry the LoRA.

A text cache keyed by `base.fingerprint.text_encoder` (train/data/cache.py) must not serve embeddings
of the encoder without the LoRA: loading a text-encoder part folds the file's tensors and weight into
that fingerprint.

LoHa/LoKr/DoRA files (lycoris_files.py) go onto the U-Net; their text-encoder keys are refused by
their placement check, naming them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterkit.adapters.lora import (
    Lora,
    all_or_nothing,
    check_finite,
    fit,
    load_lora,
    lora_names,
    lora_weights,
    set_lora_weights,
)
from adapterkit.adapters.lora_text import load_text_lora, unet_part
from adapterkit.adapters.lycoris import Lycoris, load_lycoris
from adapterkit.adapters.lycoris_files import read_adapter
from adapterkit.adapters.merge_record import check_not_merged
from adapterkit.train.pipeline.base import BaseModel


@dataclass(frozen=True)
class AppliedLora:
    """What `load_lora_on_base` put where: U-Net modules and text-encoder modules per component."""
    name: str
    file: str
    weight: float
    unet: int
    text: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """"lora0: style.safetensors x0.8: 192 U-Net modules, text_encoder 72 modules"."""
        parts = [f"{self.unet} U-Net modules"] + [f"{folder} {n} modules" for folder, n in self.text.items()]
        return f"{self.name}: {self.file} x{self.weight:g}: {', '.join(parts)}"


def text_encoders_of(base: BaseModel) -> dict[str, torch.nn.Module]:
    """{component: text encoder} of a base (`text_encoder`, and `text_encoder_2` for SDXL)."""
    return {part.spec.folder: part.model for part in base.text}


def load_lora_on_base(base: BaseModel, path: str | os.PathLike, name: str, weight: float = 1.0,
                      missing_alpha: str = "error", allow_merged: bool = False,
                      override: str | None = None) -> AppliedLora:
    """Read any adapter file against the base's U-Net and inject it as adapter `name` at `weight`: the
    U-Net part into the U-Net, a LoRA's text-encoder part into the matching text encoders. Everything
    is checked (placement of every key in the U-Net and the encoders, shapes, finite values) before
    any layer changes; a file with modules for an encoder this base lacks is refused, naming it.
    An adapter the base's merge record lists (adapters/merge_record.py: it is in the weights already)
    is refused with AlreadyMergedError unless `allow_merged`; `override`: how the user asks for that
    ("--allow-merged"), named in the message."""
    adapter = read_adapter(path, base=base.unet.config, missing_alpha=missing_alpha)
    if not allow_merged:
        check_not_merged(base.source, path, adapter, override)
    file = Path(path).name
    if isinstance(adapter, Lycoris):
        load_lycoris(base.unet, adapter, name, weight=weight)
        return AppliedLora(name, file, weight, len(adapter.modules))
    encoders = text_encoders_of(base)
    check_finite(adapter)
    fit(adapter, base.unet, text_encoders=encoders)       # all of it, before anything changes
    unet = unet_part(adapter)
    with all_or_nothing(base.unet, name):         # a text part that fails takes the U-Net part out (B9)
        if unet.modules:
            load_lora(base.unet, unet, name, weight=weight)
        text = load_text_lora(encoders, adapter, name, weight=weight)
    if text:
        _fold_into_text_fingerprint(base, adapter, name, weight)
    return AppliedLora(name, file, weight, len(unet.modules), text)


def set_base_lora_weights(base: BaseModel, weights: dict[str, float]) -> None:
    """`adapters.lora.set_lora_weights` on the U-Net and on every text encoder, each given the adapters
    it holds (a LoRA without a text-encoder part has none there, a text-encoder-only one none in the
    U-Net). An adapter on none of them is a ValueError."""
    models = [base.unet, *text_encoders_of(base).values()]
    known = {n for m in models for n in lora_names(m)}
    if set(weights) - known:
        raise ValueError(f"no LoRA named {sorted(set(weights) - known)}; adapters: {sorted(known)}")
    for model in models:
        here = set(lora_names(model))
        if here:
            set_lora_weights(model, {k: w for k, w in weights.items() if k in here})


def base_lora_weights(base: BaseModel) -> dict[str, float]:
    """The active adapters and their weights, over the U-Net and the text encoders."""
    out = {}
    for model in (*text_encoders_of(base).values(), base.unet):
        out |= lora_weights(model)
    return out


def _fold_into_text_fingerprint(base: BaseModel, lora: Lora, name: str, weight: float) -> None:
    h = hashlib.sha256(f"{name}:{weight!r}".encode())
    for path in sorted(p for p in lora.modules if p.split(".", 1)[0] in text_encoders_of(base)):
        m = lora.modules[path]
        h.update(path.encode())
        for t in (m.down, m.up):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(repr(m.alpha).encode())
    base.fingerprint = dataclasses.replace(
        base.fingerprint, text_encoder=f"{base.fingerprint.text_encoder}+lora-{h.hexdigest()[:16]}")



def write_merged_pipeline(base: BaseModel, source: Path, out: Path, dtype: torch.dtype,
                          metadata: dict[str, str] | None = None) -> list[str]:
    """A whole diffusers pipeline folder at `out`: the base's U-Net and text encoders as they are now
    (LoRAs merged into them) in `dtype`, every other part (VAE, tokenizers, scheduler, model_index.json)
    copied from the pipeline folder `source`. Built in a hidden folder beside `out` and renamed into
    place, so a failure leaves no half-written pipeline; `out` must not exist or be empty.
    Returns the components written anew."""
    import secrets
    import shutil

    from adapterkit.unet import save_unet

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: a merged pipeline is written into a new or empty folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    written = ["unet", *text_encoders_of(base)]
    try:
        tmp.mkdir(parents=True)
        for item in sorted(Path(source).iterdir()):
            if item.name in written or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        save_unet(base.unet, tmp / "unet", dtype=dtype, metadata=metadata)   # the merge record
        for folder, encoder in text_encoders_of(base).items():
            encoder.to(dtype).save_pretrained(tmp / folder, safe_serialization=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
