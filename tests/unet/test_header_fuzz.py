"""Random and mutated safetensors headers through every loader entry point: each file either loads or
raises CheckpointError (whose message names the file), never a raw exception (safetensors' own
SafetensorError, a KeyError, TypeError, OverflowError, MemoryError, ...).

Entry points: `read_header`, `read_weights` and `load_unet` (the base single-file path, also what
`adapterkit merge --base` reads), `stored_dtype`, `read_lora` (every LoRA command) and
`load_controlnet`. The seeds are fixed, so a failure reproduces; each failure message carries the
mutation that made it.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapterkit.adapters.controlnet import ControlNet
from adapterkit.adapters.controlnet_files import load_controlnet, save_controlnet
from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
from adapterkit.adapters.lora_files import read_lora, save_lora
from adapterkit.unet import (
    CheckpointError,
    Stage,
    UNet,
    UNetConfig,
    load_unet,
    read_header,
    read_weights,
    save_unet,
    stored_dtype,
)

MICRO = UNetConfig(stages=(Stage(8, attention=False, heads=2), Stage(16, heads=2)), layers_per_block=1,
                   context_dim=16, norm_groups=4, sample_size=8)
ROUNDS = 120                      # mutations per entry point (a few seconds each)

ODD_VALUES = [None, True, -1, 0, 1, 2**31, 2**63, 2**64 + 1, -(2**63), 1.5, float("1e308"), "", "F32",
              "x" * 300, [], [0], [-1, 4], [4, 0], [0, 2**64], [[0, 4]], {}, {"a": 1}, ["0", "4"]]
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "F99",
          "f32", "F8_E8M0", "C64", "", 32]


def split(raw: bytes) -> tuple[int, bytes, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return n, raw[8:8 + n], raw[8 + n:]


def pack(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


# --- mutations: each takes (rng, file bytes) and returns (bytes, description) ------------------------------

def flip_header_bytes(rng, raw):
    n, header, data = split(raw)
    h = bytearray(header)
    for _ in range(rng.randint(1, 4)):
        h[rng.randrange(len(h))] = rng.randrange(256)
    return pack(bytes(h), data), "header bytes flipped"


def cut(rng, raw):
    at = rng.randrange(len(raw))
    return raw[:at], f"cut at byte {at} of {len(raw)}"


def extend(rng, raw):
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return raw + extra, f"{len(extra)} bytes appended"


def length_field(rng, raw):
    n, header, data = split(raw)
    value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(raw), 2**40, 2**63, 2**64 - 1, 100_000_001])
    value = max(0, min(value, 2**64 - 1))
    return value.to_bytes(8, "little") + header + data, f"length field {value} (header is {n})"


def header_text(rng, raw):
    n, header, data = split(raw)
    text = rng.choice([b"[]", b"[1, 2]", b"null", b"7", b'"x"', b"{", b"{}", b'{"__metadata__": {}}',
                       b"\xff\xfe{}", b"{" * 5000 + b"}" * 5000, b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                       b'{"a": NaN}', b'{"a": 1e999}'])
    return pack(text, data), f"header replaced by {text[:30]!r}"


def entry_field(rng, raw):
    n, header, data = split(raw)
    h = json.loads(header)
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    field = rng.choice(["dtype", "shape", "data_offsets", "extra", "drop"])
    if field == "drop":
        del h[name][rng.choice(list(h[name]))]
        what = "a field dropped"
    elif field == "dtype":
        h[name]["dtype"] = rng.choice(DTYPES)
        what = f"dtype {h[name]['dtype']!r}"
    elif field == "extra":
        h[name]["extra"] = 1
        what = "an extra field"
    else:
        h[name][field] = rng.choice(ODD_VALUES)
        what = f"{field} {h[name][field]!r}"[:80]
    return pack(json.dumps(h).encode(), data), f"tensor {name}: {what}"


def entries(rng, raw):
    n, header, data = split(raw)
    h = json.loads(header)
    names = [k for k in h if k != "__metadata__"]
    a, b = rng.sample(names, 2)
    kind = rng.choice(["delete", "swap offsets", "rename", "copy", "shift"])
    if kind == "delete":
        del h[a]
    elif kind == "swap offsets":
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    elif kind == "rename":
        h[rng.choice(["", "model.diffusion_model.", "x" * 200, "lora_unet_x.alpha", "\u2603"])] = h.pop(a)
    elif kind == "copy":
        h[a + "_copy"] = dict(h[b])
    else:
        delta = rng.choice([-4, -1, 1, 4, 2**32])
        h[a]["data_offsets"] = [o + delta for o in h[a]["data_offsets"]]
    return pack(json.dumps(h).encode(), data), f"{kind} ({a}, {b})"[:120]


def metadata(rng, raw):
    n, header, data = split(raw)
    h = json.loads(header)
    md = h.setdefault("__metadata__", {})
    keys = list(md) or ["k"]
    key = rng.choice(keys + ["adapterkit.base_config", "lora_adapter_metadata", "adapterkit.hint",
                             "adapterkit.unet_config"])
    value = rng.choice(ODD_VALUES + ["{", "[]", "null", json.dumps({"stages": [{"channels": 0}]}),
                                     json.dumps({"norm_groups": 0}), json.dumps({"stages": 5}),
                                     json.dumps({"unet.r": "x", "unet.lora_alpha": 1}),
                                     json.dumps({"unet.r": 2, "unet.lora_alpha": 2,
                                                 "unet.rank_pattern": {"(a+)+$": 2}}),
                                     json.dumps({"range": "x"})])
    if isinstance(value, str) and key in md and rng.random() < 0.3:
        value = md[key][:rng.randrange(len(md[key]) + 1)]        # a cut-off JSON string
    md[key] = value
    if rng.random() < 0.1:
        h["__metadata__"] = rng.choice(ODD_VALUES)
    return pack(json.dumps(h).encode(), data), f"metadata {key} = {str(value)[:60]!r}"


MUTATIONS = [flip_header_bytes, cut, extend, length_field, header_text, entry_field, entries, metadata]


# --- the files and entry points -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    unet = UNet(MICRO)
    save_unet(unet, root / "unet.safetensors", layout="ldm")
    lora_model = UNet(MICRO)
    add_lora(lora_model, LoraSpec(rank=2, alpha=2, targets="attn"))
    with torch.no_grad():
        for layer in lora_layers(lora_model).values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    save_lora(lora_model, root / "lora.safetensors")
    save_controlnet(ControlNet.from_unet(unet, hint_widths=(16, 32)), root / "cn.safetensors")
    return {name: root / f"{name}.safetensors" for name in ("unet", "lora", "cn")}


ENTRY_POINTS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "read_header": ("unet", read_header),
    "read_weights": ("unet", read_weights),
    "load_unet": ("unet", load_unet),
    "stored_dtype": ("unet", stored_dtype),
    "read_lora": ("lora", read_lora),
    "load_controlnet": ("cn", load_controlnet),
}


def test_the_unmutated_files_load(files):
    for source, load in ENTRY_POINTS.values():
        load(files[source])


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_mutated_headers_load_or_raise_checkpoint_error(entry, files, tmp_path):
    source, load = ENTRY_POINTS[entry]
    good = files[source].read_bytes()
    rng = random.Random(f"{entry}-19")
    path = tmp_path / "mutant.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(ROUNDS):
        raw, how = good, []
        for _ in range(rng.choice([1, 1, 2])):
            try:
                raw, what = rng.choice(MUTATIONS)(rng, raw)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
                break                                  # the header no longer parses: mutate no further
            how.append(what)
            if len(raw) < 8 or int.from_bytes(raw[:8], "little") > len(raw):
                break                                  # nothing structured left to mutate
        path.write_bytes(raw)
        try:
            load(path)
        except CheckpointError as e:
            assert path.name in str(e) or "mutant" in str(e), (i, how, str(e))
            outcomes["refused"] += 1
        except Exception as e:
            raise AssertionError(f"round {i} ({'; '.join(how)}): raw {type(e).__name__}: {e}") from e
        else:
            outcomes["loaded"] += 1
    assert outcomes["refused"] > ROUNDS // 2, outcomes          # the mutations do break files
