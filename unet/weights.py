"""Weight files: finding them (diffusers folders, shards, single files), reading them through our own
checks before a library sees them, and writing them atomically.

Content decides, not the extension: a Git LFS pointer, an HTML page, a pickle or a truncated file
under a `.safetensors` name is named as such. A safetensors header is parsed by `read_header` first
(its length against the file, UTF-8 JSON, no duplicate names, metadata a map of strings, each
tensor's dtype, shape and offsets), pickles (`.ckpt/.pt/.pth/.bin`) are read only on request and
then only with `torch.load(weights_only=True)`. Every problem is a CheckpointError naming the file.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor


class CheckpointError(ValueError):
    """A weights file (or folder) that cannot be loaded as asked; the message says why and what to do."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


DIFFUSERS_WEIGHTS = (   # in order of preference, as diffusers' `from_pretrained` looks for them
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


NOT_UNET = ("first_stage_model.", "cond_stage_model.", "conditioner.", "model_ema.", "vae.", "text_encoder.")
_MAX_HEADER = 100_000_000      # safetensors' own limit on the JSON header


def locate_weights(path: Path) -> tuple[list[Path], Path | None]:
    """The weights file(s) to read and the config.json beside them (if any)."""
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist. load_unet expects a diffusers U-Net folder (config.json + "
            "diffusion_pytorch_model.safetensors), a pipeline folder with unet/ inside, or a weights "
            "file (.safetensors; .ckpt/.pt/.pth/.bin with allow_pickle=True).")
    if path.is_file():
        return [path], None
    folder = path
    if not any((path / n).is_file() for n in DIFFUSERS_WEIGHTS) and (path / "unet").is_dir():
        folder = path / "unet"
    config_json = folder / "config.json" if (folder / "config.json").is_file() else None
    for name in DIFFUSERS_WEIGHTS:
        weights = folder / name
        if weights.is_file():
            return (_shards(weights) if name.endswith(".index.json") else [weights]), config_json
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    raise CheckpointError(
        f"no U-Net weights in folder {folder}: looked for {', '.join(DIFFUSERS_WEIGHTS)}"
        f"{' and in its unet/ subfolder' if folder == path else ''}; the folder holds "
        f"{', '.join(found[:12]) or 'nothing'}{' ...' if len(found) > 12 else ''}. "
        "Pass the diffusers U-Net folder (or the pipeline folder above it) or a weights file.")


def _shards(index: Path) -> list[Path]:
    try:
        names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a readable shard index ({error_phrase(e)}); download it "
                              "again") from e
    odd = [str(n)[:80] for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if odd:
        raise CheckpointError(f"{index} names shards that are not file names in its folder: {few(odd)}. "
                              "A shard index lists files beside it; download it again.")
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are not in {index.parent}: {', '.join(missing)}. "
                              "Download the missing shard files.")
    return files


def read_weights(path: str | os.PathLike, *, allow_pickle: bool = False,
                 keep: Callable[[str], bool] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one file, classified by content first.

    `keep` selects tensors by name before they are read (safetensors reads only those). Pickles need
    `allow_pickle=True` and are read with `torch.load(weights_only=True)`; a top-level "state_dict"
    entry is unwrapped and non-tensor entries are dropped. Raises CheckpointError.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; give the .safetensors file inside it "
                              "(or, where a folder is accepted, a diffusers folder with config.json).")
    kind = _classify(path)
    if kind == "safetensors":
        return _read_safetensors(path, keep)
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} is named .safetensors but holds a PyTorch pickle ({kind}, as torch.save writes). "
            "Rename it to .ckpt and, if you trust its source, load it with allow_pickle=True, or convert "
            "it to real safetensors.")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a PyTorch pickle checkpoint ({kind}). Unpickling can run arbitrary code, so "
            "adapterkit does not read pickles unless asked: if you trust the file's source, pass "
            "allow_pickle=True (it is then read with torch.load(weights_only=True), tensors only); "
            "better, convert it to .safetensors once.")
    return _read_pickle(path, keep), {}


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The float dtype a U-Net's weights are stored in: that of its first U-Net tensor, read from the
    checked safetensors header (no tensor is read); float32 for pickles or when no float is found.
    `path` is what `load_unet` accepts. Raises CheckpointError as `load_unet` does."""
    files, _ = locate_weights(Path(path))
    for f in files:
        if f.is_dir() or _classify(f) != "safetensors":
            continue
        header, _ = read_header(f)
        for name in sorted(header):
            if not name.startswith(NOT_UNET) and header[name]["dtype"] in FLOAT_DTYPES:
                return FLOAT_DTYPES[header[name]["dtype"]]
    return torch.float32


def _classify(path: Path) -> str:
    """'safetensors' (header checked), 'zip pickle' or 'pickle'; raises CheckpointError otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); check the path and its "
                              "permissions.") from None
    text = head.lstrip().lower()
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a download or copy did not complete. "
                              "Get the file again.")
    # safetensors: a u64 header length (text files read as absurd lengths), then the JSON header
    declared = int.from_bytes(head[:8], "little")
    if len(head) > 8 and head[8:9] in (b"{", b" ") and declared <= _MAX_HEADER:
        read_header(path)
        return "safetensors"
    if len(head) > 8 and head[8:9] == b"{":
        raise CheckpointError(
            f"{path} declares a safetensors header of {declared:,} bytes (the file has {size:,}; the format "
            f"allows at most {_MAX_HEADER:,}): the length field is corrupt. Get the file again.")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is a Git LFS pointer ({size} bytes of text), not the weights: the repository was "
            "cloned without Git LFS. Run `git lfs install && git lfs pull` in the repository, or download "
            "the file directly.")
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        raise CheckpointError(
            f"{path} is an HTML page, not weights: the download saved an error or login page (wrong URL, "
            "missing token, gated model). Download the file again from its direct link.")
    if head.startswith(b"PK\x03\x04"):
        return "zip pickle"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:     # pickle protocol 2-5
        return "pickle"
    if len(head) <= 8:
        raise CheckpointError(f"{path} is only {size} bytes: too short for a weights file, probably "
                              "truncated. Get the file again.")
    raise CheckpointError(
        f"{path} is not a safetensors file (nor a PyTorch pickle): it starts with {head[:16]!r}. Check "
        "that the download completed and that the path names a weights file.")


# Bytes per element of the safetensors dtypes that torch can hold (safetensors README, "Format").
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) < len(pairs):
        raise _DuplicateKey(sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1))
    return out


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The checked header of a safetensors file: ({tensor: {"dtype", "shape", "data_offsets"}}, metadata).

    Our own parse, before safetensors sees the file: its errors for these cases do not name the cause
    (reliability.md §1.2), and it loads duplicate keys silently. Checked: the length field against the
    file, UTF-8 JSON object, no duplicate names, metadata a map of strings, every entry's dtype (one
    torch can hold), shape (non-negative integers) and offsets (byte length = elements x dtype size,
    contiguous from 0, no overlap or hole), and that the data ends exactly at the end of the file.
    Raises CheckpointError naming the file, the tensor and the problem.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path} declares a safetensors header of {n:,} bytes, over the format's "
                                  f"limit of {_MAX_HEADER:,}: the file is corrupt. Get it again.")
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{path} is truncated: its header declares {n} bytes but the file has only "
                              f"{size}. The download or copy did not complete; get the file again.")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        names = few([repr(k) for k in e.args[0]])
        raise CheckpointError(f"{path} names tensors more than once in its header ({names}); the file was "
                              "written by a broken tool. Re-export it.") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header (not UTF-8 JSON: "
                              f"{type(e).__name__}: {str(e)[:120]}). Get the file again.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, "
                              "not an object of tensors. Get the file again.")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ must map names to strings; it holds "
                              f"{_type_names(metadata)}. The file was written by a broken tool; "
                              "re-export it.")
    end = 0
    for name, info in sorted(header.items(), key=_start_offset):
        begin = _check_entry(path, name, info)
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a hole of {begin - end} bytes"
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, where the "
                                  f"previous one ends at {end}: it {what}. The file is corrupt; get it "
                                  "again.")
        end = info["data_offsets"][1]
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(
            f"{path} is truncated: its header describes {expected} bytes of data but the file has only "
            f"{size} ({expected - size} missing). The download or copy did not complete; get the file again.")
    if size > expected:
        raise CheckpointError(f"{path} has {size - expected} unexpected bytes after its last tensor "
                              f"(header describes {expected} bytes, file has {size}); the file is corrupt.")
    return header, metadata


def _start_offset(item) -> tuple:
    """Sort key of a header entry: its (begin, end) bytes, as safetensors orders them (malformed
    entries first, so that they are the ones named)."""
    offsets = item[1].get("data_offsets") if isinstance(item[1], dict) else None
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    return tuple(offsets) if ok else (-1, -1)


def _check_entry(path: Path, name: str, info) -> int:
    """One tensor's header entry is well formed; returns its first data byte."""
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} in the header {problem}. The file is corrupt or "
                               "was written by a tool adapterkit cannot read; get it again or re-export it.")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"is not an entry of dtype, shape and data_offsets ({_type_names(info)})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {str(dtype)[:20]!r}; "
                              f"adapterkit reads {', '.join(SAFETENSORS_DTYPES)}. Re-export the file in "
                              "float16, bfloat16 or float32.")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has a shape that is not a list of non-negative integers ({str(shape)[:60]})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"has data_offsets that are not [begin, end] with 0 <= begin <= end ({str(offsets)[:60]})")
    count = math.prod(shape)
    if count * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
        raise bad(f"covers {offsets[1] - offsets[0]} bytes, but shape {shape[:8]} of {dtype} needs "
                  f"{count * SAFETENSORS_DTYPES[dtype]}")
    return offsets[0]


def _type_names(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{str(k)[:40]}: {type(v).__name__}" for k, v in list(value.items())[:4]) + \
            (", ..." if len(value) > 4 else "") + "}"
    return type(value).__name__


def _read_safetensors(path: Path, keep: Callable[[str], bool] | None
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path} could not be read as safetensors: {e}. The file is corrupt or uses "
                              "a dtype this torch lacks; get it again or re-export it.") from e


def _read_pickle(path: Path, keep: Callable[[str], bool] | None) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        what = f"it contains Python objects other than tensors ({', '.join(unsafe)})" if unsafe else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True): {what}. adapterkit never falls "
            "back to full unpickling; convert the file to safetensors with a tool you trust, in an "
            "isolated environment.") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor) and (keep is None or keep(k))}


def read_files(files: list[Path], allow_pickle: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors, metadata = {}, {}
    for f in files:
        part, meta = read_weights(f, allow_pickle=allow_pickle, keep=lambda k: not k.startswith(NOT_UNET))
        clash = part.keys() & tensors.keys()
        if clash:
            raise CheckpointError(f"{f} repeats tensors of another shard: {few(sorted(clash))}")
        tensors.update(part)
        metadata.update(meta)
    return tensors, metadata


def few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, object] | None = None) -> None:
    """Atomically write a .safetensors file; metadata values that are not str are stored as JSON."""
    meta = {"format": "pt"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tensors, path = dict(tensors), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write([(path, lambda tmp: save_file(tensors, tmp, metadata=meta))])


def atomic_write(items: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write each file to a temp name beside it, fsync all, then rename over the targets.

    `items` pairs a final path with `write(tmp_path)`. The temp names start with a dot, so a leftover
    from a killed process is hidden from folder scans. On any error no target is touched (except the
    renames already done when several files are written: each file is replaced atomically, the set not).
    The files get the permissions of a file created under the user's umask (some writers, safetensors'
    among them, create their file mode 0600).
    """
    temps: list[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for final, write in items:
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            temps.append(tmp)
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for (final, _), tmp in zip(items, temps):
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for folder in {final.parent for final, _ in items}:
        _fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0o022)      # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:                # makes the rename durable; not possible on every platform (Windows)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def error_phrase(e: Exception) -> str:
    """An exception as a short phrase for a message (a KeyError's str is only the quoted key)."""
    text = str(e)[:200]
    return f"missing key {text}" if isinstance(e, KeyError) else f"{type(e).__name__}: {text}"
