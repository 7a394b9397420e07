"""A picture's generation parameters as A1111's "infotext", in its PNG `parameters` text chunk.

AUTOMATIC1111 writes it (modules/processing.py create_infotext) and reads it back
(modules/infotext_utils.py parse_generation_parameters); civitai, ComfyUI's loaders and the image
browsers read the same chunk:

    <prompt> <lora:NAME:WEIGHT> ...
    Negative prompt: <negative prompt>                       (only when there is one)
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 0123456789,
    Model: sd15, Lora hashes: "style: 0123456789ab"            (one line in the file)

The last line is `key: value` pairs joined by ", "; a value holding a comma, a colon or a newline is
JSON-quoted (infotext_utils.quote), and the parser takes a quoted value whole. `Size` is width x
height; `Model hash` the first 10 hex digits of the checkpoint file's SHA-256 (A1111's short hash; a
diffusers folder has none, `Model` names it); `Lora hashes` the first 12 digits of each LoRA's hash
of its tensors (the safetensors bytes after the header, unet.weights.safetensors_data_sha256). For
a grid A1111 writes the first picture's parameters; so do we.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from adapterkit.unet.weights import file_sha256, safetensors_data_sha256

PARAMETERS = "parameters"                          # the PNG text chunk's key
# our sampler names (train.pipeline.sampling.SAMPLERS) as A1111 spells them
SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras"}
MODEL_HASH_DIGITS, LORA_HASH_DIGITS = 10, 12


def quote(value) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def model_hash(path: str | os.PathLike) -> str | None:
    """A1111's short hash of a single-file checkpoint; None for a folder."""
    return file_sha256(path)[:MODEL_HASH_DIGITS] if Path(path).is_file() else None


def lora_hash(path: str | os.PathLike) -> str:
    return safetensors_data_sha256(path)[:LORA_HASH_DIGITS]


def infotext(prompt: str, *, steps: int, sampler: str, guidance: float, seed: int, size: tuple[int, int],
             negative: str = "", model: str | None = None, model_hash: str | None = None,
             loras: Sequence[tuple[str, float, str | None]] = (),
             extra: Mapping[str, object] | None = None) -> str:
    """The infotext of one picture. `size` is (width, height); `loras` (name, weight, hash or None):
    each becomes a `<lora:name:weight>` tag after the prompt (A1111's extra-networks syntax) and, when
    hashed, an entry of `Lora hashes`; `extra` more `key: value` pairs at the end."""
    tags = " ".join(f"<lora:{name}:{weight:g}>" for name, weight, _ in loras if weight)
    lines = [f"{prompt} {tags}".strip() if tags else prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    params = {"Steps": steps, "Sampler": SAMPLERS.get(sampler, sampler), "CFG scale": f"{guidance:g}",
              "Seed": seed, "Size": f"{size[0]}x{size[1]}"}
    if model_hash:
        params["Model hash"] = model_hash
    if model:
        params["Model"] = model
    hashes = ", ".join(f"{name}: {h}" for name, weight, h in loras if h and weight)
    if hashes:
        params["Lora hashes"] = hashes
    params |= dict(extra or {})
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items()))
    return "\n".join(lines)
