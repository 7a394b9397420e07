"""What a merged model holds: the record `adapterkit merge` writes of every adapter merged into it,
and the check that refuses applying one of them again (which would double its effect).

Contract: the merged U-Net's weights file (a diffusers U-Net folder's or a pipeline's
`unet/diffusion_pytorch_model.safetensors`, or the single-file checkpoint) carries the metadata key
`adapterkit.merged_adapters`: a JSON list, oldest merge first, of

    {"file": "style.safetensors", "sha256": "<hex of the file>", "fingerprint": "delta-<16 hex>",
     "weight": 0.8}

`sha256` names the exact file; `fingerprint` names its content whatever the layout (a kohya file and
its peft conversion share it): SHA-256 over each module's path, shape and up to 256 evenly strided
values of its scaled ΔW at fp16 precision, as `unet_fingerprint` samples a U-Net. A merge into a base
that already has a record carries it over, so a chain of merges keeps every entry.

What it cannot see: a base merged by another tool carries no record (kohya's merge script, ComfyUI
and A1111 write none). Its fingerprint differs from the one the LoRA records for its base, but so
does any other fine-tune's, and the merged weights cannot be told from W0 + ΔW by a hash: another
tool's fp16 rounding of W0 + ΔW differs from ours in the last bit of some values.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapterkit.unet.weights import DIFFUSERS_WEIGHTS, CheckpointError, read_header

from .lora import Lora
from .lycoris import Lycoris

MERGED_KEY = "adapterkit.merged_adapters"
_SAMPLES = 256


@dataclass(frozen=True)
class MergedAdapter:
    """One adapter merged into a model, as the record holds it."""
    file: str
    sha256: str
    fingerprint: str
    weight: float

    def line(self) -> str:
        return f"{self.file} (weight {self.weight:g}, sha256 {self.sha256[:12]}, {self.fingerprint})"


class AlreadyMergedError(ValueError):
    """An adapter the base's merge record lists is being applied to it again."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_fingerprint(adapter: Lora | Lycoris) -> str:
    """A layout-independent identity of an adapter's weights (see the module docstring). LyCORIS
    modules are hashed by their factors (a DoRA's ΔW depends on the base it is applied to)."""
    h = hashlib.sha256()
    for path in sorted(adapter.modules):
        m = adapter.modules[path]
        if isinstance(adapter, Lycoris):
            h.update(f"{path}:{m.kind}:{m.alpha!r}\n".encode())
            tensors = [m.tensors[k] for k in sorted(m.tensors)]
            tensors += [m.dora_scale] if m.dora_scale is not None else []
        else:
            tensors = [m.delta()]
        for t in tensors:
            flat = t.detach().float().reshape(-1)
            h.update(f"{path}:{list(t.shape)}\n".encode())
            step = max(1, -(-flat.numel() // _SAMPLES))
            h.update(flat[::step][:_SAMPLES].to(torch.float16).contiguous().view(torch.int16).numpy().tobytes())
    return f"delta-{h.hexdigest()[:16]}"


def identify(path: str | os.PathLike, adapter: Lora | Lycoris, weight: float) -> MergedAdapter:
    """The record entry of adapter file `path` (read as `adapter`) merged at `weight`."""
    return MergedAdapter(Path(path).name, file_sha256(path), adapter_fingerprint(adapter), float(weight))


def record_metadata(entries: list[MergedAdapter]) -> dict[str, str]:
    """The header entry a merged model's weights file carries."""
    return {MERGED_KEY: json.dumps([asdict(e) for e in entries])}


def unet_weights_file(base: str | os.PathLike) -> Path | None:
    """The file whose header holds a base's record: a single file itself, or the (unsharded) weights
    of a pipeline folder's unet/ or of a U-Net folder. None where there is none such."""
    base = Path(base)
    if base.is_file():
        return base
    for folder in (base / "unet", base):
        for name in (DIFFUSERS_WEIGHTS[0], DIFFUSERS_WEIGHTS[2]):
            if (folder / name).is_file():
                return folder / name
    return None


def merged_into(base: str | os.PathLike | None) -> list[MergedAdapter]:
    """The adapters a base's record lists ([] without one). A record that does not parse is an error
    naming the file: a damaged record must not silently pass a double merge."""
    file = unet_weights_file(base) if base is not None else None
    if file is None or file.suffix != ".safetensors":
        return []
    raw = read_header(file)[1].get(MERGED_KEY)
    if raw is None:
        return []
    try:
        return [MergedAdapter(str(e["file"]), str(e["sha256"]), str(e["fingerprint"]), float(e["weight"]))
                for e in json.loads(raw)]
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: its metadata {MERGED_KEY} (the adapters merged into it) is not a list"
                              " "
                              f"of {{file, sha256, fingerprint, weight}} ({type(e).__name__}: {e}); the file "
                              "was edited by hand or by a broken tool. Remove the key to use it") from None


def find_merged(entries: list[MergedAdapter], path: str | os.PathLike, adapter: Lora | Lycoris
                ) -> MergedAdapter | None:
    """The entry naming this adapter (same file bytes, or same weights in another layout), or None."""
    if not entries:
        return None
    sha, fingerprint = file_sha256(path), adapter_fingerprint(adapter)
    return next((e for e in entries if e.sha256 == sha or e.fingerprint == fingerprint), None)


def check_not_merged(base: str | os.PathLike | None, path: str | os.PathLike, adapter: Lora | Lycoris,
                     override: str | None, entries: list[MergedAdapter] | None = None
                     ) -> MergedAdapter | None:
    """Refuse (AlreadyMergedError) to apply adapter file `path` to `base` when the base's record lists
    it. `override`: how the caller lets it through (e.g. "--allow-merged"), named in the message; None
    when there is no override there. Returns the entry found, or None."""
    entries = merged_into(base) if entries is None else entries
    hit = find_merged(entries, path, adapter)
    if hit is None:
        return None
    how = (f"; to apply it again on purpose (its effect then adds up), pass {override}" if override
           else "")
    raise AlreadyMergedError(
        f"{path} is already merged into {base}: the base's record ({MERGED_KEY} in "
        f"{unet_weights_file(base)}) lists {hit.line()}. Applying it again would count it twice. Use the "
        f"base without this LoRA (it is in the weights already), or the unmerged base with it{how}")
