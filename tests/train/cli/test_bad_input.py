"""Bad and hostile input through the command line, one row per case (issue 19, reliability.md §5).

Each row builds its inputs in a fresh folder, runs `adapterkit ...` in-process and asserts
- the exit status: 2 for bad input (1 only where the row plays one of our bugs; canny's own 1 means
  "some pictures skipped", its documented status),
- a phrase of the message (stderr + stdout, case-insensitive), and a message of at most a few lines,
- that no exception escaped (a traceback would reach the user),
- that nothing changed on disk: every file and folder of the row's folder and of the shared inputs
  (base U-Nets, LoRA, ControlNet, tiny pipeline, pictures) has the same bytes before and after, and
  nothing new appeared (no half-written output, no `out/` inside the picture folder, no sentinel
  file from a pickle or YAML payload).
Faults that cannot be made for real in a test (a full disk, a read-only folder when the tests run as
root) are injected by replacing the functions that would fail.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import adapterkit.train.cli.main as cli
from adapterkit.adapters.controlnet import ControlNet, hint_widths_for
from adapterkit.adapters.controlnet_files import save_controlnet
from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
from adapterkit.adapters.lora_files import save_lora
from adapterkit.unet import PRESETS, Stage, UNet, UNetConfig, load_unet, save_unet
from adapterkit.unet.weights import DIFFUSERS_WEIGHTS
from support.pictures import png_bytes, shape_image

# A U-Net small enough to write a dozen broken copies of per test run (~60 KB).
MICRO = UNetConfig(stages=(Stage(8, attention=False, heads=2), Stage(16, heads=2)), layers_per_block=1,
                   context_dim=16, norm_groups=4, sample_size=8)


# --- shared inputs -------------------------------------------------------------------------------------

@dataclass
class Kit:
    root: Path          # micro base (folder and single file), LoRAs, ControlNet, pictures
    pipeline: Path      # the tiny SD pipeline folder (conftest's lora_pipeline)
    images: Path        # its captioned pictures (conftest's lora_images)

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def single(self) -> Path:
        return self.root / "base.safetensors"

    @property
    def lora(self) -> Path:
        return self.root / "lora.safetensors"

    @property
    def tiny_lora(self) -> Path:
        return self.root / "tiny_lora.safetensors"

    @property
    def cn(self) -> Path:
        return self.root / "cn.safetensors"

    @property
    def hint(self) -> Path:
        return self.root / "hint.png"


def _lora_on(model, path: Path, seed: int) -> None:
    add_lora(model, LoraSpec(rank=2, alpha=2, targets="attn"), "default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    save_lora(model, path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, lora_pipeline, lora_images):
    root = tmp_path_factory.mktemp("kit")
    torch.manual_seed(0)
    micro = UNet(MICRO)
    save_unet(micro, root / "base")
    save_unet(micro, root / "base.safetensors", layout="ldm")
    _lora_on(load_unet(root / "base"), root / "lora.safetensors", 1)
    _lora_on(UNet(PRESETS["tiny"]), root / "tiny_lora.safetensors", 2)
    unet = load_unet(lora_pipeline)
    save_controlnet(ControlNet.from_unet(unet, hint_widths=hint_widths_for(2)), root / "cn.safetensors")
    shape_image(1, (32, 32)).save(root / "hint.png")
    return Kit(root, lora_pipeline, lora_images)


# --- builders of bad files -------------------------------------------------------------------------------

def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header: dict | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def mutated(src: Path, change: Callable[[dict], None]) -> bytes:
    """`src` with its header changed by `change` (the data bytes kept)."""
    header, data = header_and_data(src)
    change(header)
    return with_header(header, data)


def tensors_sorted(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def set_offsets(i: int, fn):
    def change(h):
        name = tensors_sorted(h)[i]
        h[name]["data_offsets"] = fn(h[name]["data_offsets"])
    return change


def set_entry(field: str, value, i: int = 0):
    def change(h):
        h[tensors_sorted(h)[i]][field] = value
    return change


def torch_pickle(path: Path, obj) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


class Payload:
    """Unpickling this runs `touch <sentinel>`; nothing may ever unpickle it."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def lora_file(src: Path, dst: Path, tensors=None, metadata=None) -> Path:
    """A copy of the LoRA `src` with its tensors / metadata passed through the given functions."""
    t = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    t = tensors(t) if tensors else t
    md = metadata(md) if metadata else md
    save_file(t, str(dst), metadata=md)
    return dst


def scale_alphas(value: float):
    return lambda t: {k: (torch.tensor(value) if k.endswith(".alpha") else v) for k, v in t.items()}


def first_key(t: dict, suffix: str) -> str:
    return sorted(k for k in t if k.endswith(suffix))[0]


def replace_first(suffix: str, fn):
    def change(t):
        k = first_key(t, suffix)
        return t | {k: fn(t[k])}
    return change


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h 1-bit pixels (its data would decode to w*h pixels)."""
    rows = zlib.compress(b"\0" * (1 + (w + 7) // 8) * 16)       # only 16 rows of data: a bomb that lies
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))


def folder(path: Path) -> Path:
    """A folder holding one empty file (given where a file is expected)."""
    write(path / "x", "")
    return path


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copy(src, dst))


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def pictures(path: Path) -> Path:
    """A folder with one good picture."""
    write(path / "a.png", picture("png"))
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


# --- faults ----------------------------------------------------------------------------------------------

def deny_writes(monkeypatch, folder: Path) -> None:
    """Make `folder` behave as read-only (the tests may run as root, whom chmod does not stop)."""
    folder = Path(os.path.realpath(folder))

    def inside(p) -> bool:
        try:
            return Path(os.path.realpath(os.fspath(p))).is_relative_to(folder)
        except TypeError:           # a file descriptor
            return False

    def denied(p):
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(p))

    real_access, real_mkdir, real_replace, real_open = os.access, os.mkdir, os.replace, builtins.open
    real_os_open = os.open

    def access(p, mode, *a, **kw):
        return False if (mode & os.W_OK and inside(p)) else real_access(p, mode, *a, **kw)

    def mkdir(p, *a, **kw):
        if inside(p):
            raise denied(p)
        return real_mkdir(p, *a, **kw)

    def replace(src, dst, *a, **kw):
        if inside(dst):
            raise denied(dst)
        return real_replace(src, dst, *a, **kw)

    def open_(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and inside(file):
            raise denied(file)
        return real_open(file, mode, *a, **kw)

    def os_open(p, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(p):
            raise denied(p)
        return real_os_open(p, flags, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def disk_full(monkeypatch) -> None:
    """Writes fail as on a full disk: safetensors' error (errno lost), PIL's OSError, and the file
    system reports 4 KiB free."""
    def safetensors_full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def pil_full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", safetensors_full)
    monkeypatch.setattr("adapterkit.unet.checkpoint.save_file", safetensors_full)
    monkeypatch.setattr("adapterkit.unet.weights.save_file", safetensors_full)
    monkeypatch.setattr(Image.Image, "save", pil_full)
    monkeypatch.setattr("adapterkit.train.cli.checks.shutil.disk_usage",
                        lambda p: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 4096, 4096))


def job_raises(error: Exception):
    """The LoRA job fails with `error` at its first step (what torch raises on a full disk, or a bug)."""
    def fault(monkeypatch):
        def main(cfg):
            raise error
        monkeypatch.setattr("adapterkit.train.jobs.lora.main", main)
    return fault


def full_disk_job(monkeypatch):
    """What torch.save says when the disk fills during a checkpoint, on a disk with 4 KiB free."""
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    job_raises(torch_error)(monkeypatch)
    disk_full(monkeypatch)


# --- the table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Kit, Path], list]       # builds the inputs in the row's folder; returns the command
    phrase: str                             # the message must contain it (case-insensitive)
    code: int = 2
    fault: Callable | None = None           # fault(monkeypatch) or fault(monkeypatch, folder)
    may_create: tuple[str, ...] = ()        # empty folders (relative to the row's) the command may leave


def merge_base(make: Callable[[Kit, Path], bytes | Path], name: str = "base.safetensors"):
    """merge a good LoRA into the base `make` writes (bytes for a file; a Path it built itself)."""
    def argv(k, t):
        made = make(k, t)
        base = made if isinstance(made, Path) else write(t / name, made)
        return ["merge", "--base", base, k.lora, "-o", t / "merged"]
    return argv


def convert(make: Callable[[Kit, Path], Path | bytes], name: str = "in.safetensors"):
    def argv(k, t):
        made = make(k, t)
        src = made if isinstance(made, Path) else write(t / name, made)
        return ["convert", src, t / "out.safetensors"]
    return argv


def merge_lora(make: Callable[[Kit, Path], Path], *extra):
    return lambda k, t: ["merge", "--base", k.base, make(k, t), "-o", t / "merged", *extra]


def sample_lora(make: Callable[[Kit, Path], Path]):
    return lambda k, t: ["sample", "--base", k.pipeline, "--lora", make(k, t), "--prompt", "a",
                         "--steps", "1", "--device", "cpu", "-o", t / "grid.png"]


def sample_hint(make: Callable[[Kit, Path], Path | bytes], cn=None):
    def argv(k, t):
        made = make(k, t)
        hint = made if isinstance(made, Path) else write(t / "hint.png", made)
        net = cn(k, t) if cn else k.cn
        return ["sample", "--base", k.pipeline, "--controlnet", net, "--hint", hint, "--prompt", "a",
                "--steps", "1", "--device", "cpu", "-o", t / "grid.png"]
    return argv


def recipe(k: Kit, t: Path, text: str | None = None, job: str = "lora", **sections) -> Path:
    if text is None:
        cfg = {"model": {"base": str(k.pipeline)},
               "data": {"root": str(k.images), "resolution": 32, "bucket_step": 8, "min_side": 32},
               "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
               "train": {"steps": 1, "batch_size": 2},
               "output": {"dir": str(t / "out"), "checkpoint_every": 0, "log_every": 1}}
        if job == "pretrain":
            cfg = {"output": {"dir": str(t / "out")}, "train": {"steps": 1}}
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        text = json.dumps(cfg)                                       # JSON is YAML
    return write(t / "recipe.yaml", text)


def train(*overrides: str, job: str = "lora", text: Callable[[Kit, Path], str] | None = None, **sections):
    def argv(k, t):
        out = [o.format(t=t, images=k.images, pipeline=k.pipeline) for o in overrides]
        return ["train", job, recipe(k, t, text(k, t) if text else None, job=job, **sections), *out]
    return argv


def canny(files: dict[str, bytes]):
    def argv(k, t):
        for name, data in files.items():
            write(t / "in" / name, data)
        return ["canny", t / "in", t / "edges"]
    return argv


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs recipe: train.steps set to `width ** levels` strings from a few hundred bytes
    (the anchors sit inside the value, so the type error would print all of them)."""
    anchors = ["&a0 [" + ", ".join(["lol"] * width) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "train:\n  steps: [" + ",\n    ".join(anchors) + "]\n"


def many_aliases(n: int) -> str:
    return "a: &a 1\nb: [" + ", ".join(["*a"] * n) + "]\n"


def huge_type_error() -> str:
    """train.steps set to a list of 48000 items (through aliases): the message must show a few."""
    return ("sample: {seeds: &big [" + ", ".join(["1"] * 16000) + "]}\nmodel: {base: x}\ndata: {root: x}\n"
            "train: {steps: [*big, *big, *big]}\n")


def good_half(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[:len(raw) // 2]


DUPLICATE_KEY = with_header(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4)
LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 3438167536\n"
HTML = b"\n<!DOCTYPE html><html><body>Access denied</body></html>"


def one_tensor_header(**entry) -> bytes:
    info = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} | entry
    return with_header({"w": info}, b"\0" * 8)


def base_copy(k: Kit, t: Path) -> Path:
    shutil.copytree(k.base, t / "b")
    return t / "b"


def pipeline_with_half_vae(k: Kit, t: Path) -> Path:
    shutil.copytree(k.pipeline, t / "p")
    vae = t / "p" / "vae" / DIFFUSERS_WEIGHTS[0]
    vae.write_bytes(good_half(vae))
    return t / "p"


def base_with_config(text: str):
    def make(k, t):
        folder = base_copy(k, t)
        (folder / "config.json").write_text(text)
        return folder
    return make


def shard_index_escaping(k, t):
    folder = t / "b"
    write(folder / "config.json", (k.base / "config.json").read_text())
    write(folder / "diffusion_pytorch_model.safetensors.index.json",
          json.dumps({"weight_map": {"conv_in.weight": "../../../secret.safetensors"}}))
    return folder


def lora_with(tensors=None, metadata=None):
    """A builder: the good LoRA with its tensors and/or metadata changed."""
    return lambda k, t: lora_file(k.lora, t / "l.safetensors", tensors, metadata)


def peft_lora(metadata: str):
    """The good LoRA in the peft layout, with `lora_adapter_metadata` replaced."""
    def make(k, t):
        cli.main(["convert", str(k.lora), str(t / "peft.safetensors"), "--to", "peft"])
        out = lora_file(t / "peft.safetensors", t / "l.safetensors",
                        metadata=lambda md: md | {"lora_adapter_metadata": metadata})
        (t / "peft.safetensors").unlink()
        return out
    return make


def with_foreign_module(t):
    extra = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    return t | {f"{extra}.lora_down.weight": torch.zeros(2, 16),
                f"{extra}.lora_up.weight": torch.zeros(16, 2),
                f"{extra}.alpha": torch.tensor(2.0)}


def to_loha(t):
    """The LoRA's modules renamed to LyCORIS LoHa parts (hada_w1_a/b, hada_w2_a/b), which we do not read."""
    parts = {"lora_down.weight": ("hada_w1_a", "hada_w2_a"), "lora_up.weight": ("hada_w1_b", "hada_w2_b")}
    out = {}
    for k, v in t.items():
        stem, _, part = k.partition(".")
        for name in parts.get(part, (part,)):
            out[f"{stem}.{name}"] = v.clone()
    return out


def last_module_too_wide(t):
    """The module last in key order with a lora_down one input column too wide: it fails its layer after
    every other module was placed (B9: nothing of the file may stay on the model)."""
    down = sorted(k for k in t if k.endswith("lora_down.weight"))[-1]
    return t | {down: torch.zeros(t[down].shape[0], t[down].shape[1] + 1)}


def to_int64(t):
    return {k: v.long() for k, v in t.items()}


def only_foreign(t):
    return with_foreign_module({})


def rank_zero(t):
    """The first module with rank 0: lora_down [0, in], lora_up [out, 0]."""
    down = first_key(t, "lora_down.weight")
    up = down.replace("lora_down", "lora_up")
    return t | {down: torch.zeros(0, *t[down].shape[1:]), up: torch.zeros(t[up].shape[0], 0)}


def drop_alphas(t):
    return {k: v for k, v in t.items() if not k.endswith(".alpha")}


def fp16_base(k, t):
    save_unet(load_unet(k.base), t / "b16", dtype=torch.float16)
    return t / "b16"


def cn_without_a_key(k, t):
    tensors = load_file(str(k.cn))
    with safe_open(str(k.cn), framework="pt") as f:
        md = dict(f.metadata())
    del tensors[sorted(tensors)[0]]
    save_file(tensors, str(t / "cn.safetensors"), metadata=md)
    return t / "cn.safetensors"


def picture(kind: str) -> bytes:
    img = shape_image(0, (32, 32))
    if kind == "png":
        return png_bytes(img)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def no_model(monkeypatch):
    """Loading the base is a bug here: the command must stop at the pictures, before any model loads."""
    def load(*a, **kw):
        raise AssertionError("a model was loaded before the pictures were checked")
    monkeypatch.setattr("adapterkit.train.jobs.lora.load_frozen_base", load)


def train_on(make: Callable[[Kit, Path], None]):
    """`train lora` on the picture folder t/imgs that `make` writes."""
    def argv(k, t):
        make(k, t)
        return train("data.root={t}/imgs")(k, t)
    return argv


def all_filtered(k, t):
    write(t / "imgs" / "a.png", b"")
    write(t / "imgs" / "b.jpg", picture("jpg")[:300])
    write(t / "imgs" / "b.txt", "a broken picture")
    write(t / "imgs" / ".DS_Store", b"\0" * 8)


def one_uncaptioned(k, t):
    shutil.copytree(k.images, t / "imgs")
    next(iter(sorted((t / "imgs").glob("*.txt")))).unlink()


def read_only_out(argv_of: Callable[[Kit, Path, Path], list]):
    def argv(k, t):
        (t / "ro").mkdir()
        return argv_of(k, t, t / "ro")
    return argv


CASES = [
    # A. base weights through `merge --base` (a broken single file used to bypass the checked loader)
    Case("merge base: empty file (A1)", merge_base(lambda k, t: b""), "empty (0 bytes)"),
    Case("merge base: Git LFS pointer (A2)", merge_base(lambda k, t: LFS), "git lfs pull"),
    Case("merge base: HTML page (A3)", merge_base(lambda k, t: HTML), "HTML page"),
    Case("merge base: torch pickle named .safetensors (A4)",
         merge_base(lambda k, t: torch_pickle(t / "x.pt", {"w": torch.zeros(2)})), "holds a PyTorch pickle"),
    Case("merge base: truncated (A5)", merge_base(lambda k, t: good_half(k.single)), "truncated"),
    Case("merge base: trailing bytes (A5)", merge_base(lambda k, t: k.single.read_bytes() + b"\0" * 8),
         "8 unexpected bytes"),
    Case("merge base: header length 2^40 (A6)",
         merge_base(lambda k, t: (1 << 40).to_bytes(8, "little") + k.single.read_bytes()[8:]),
         "declares a safetensors header of 1,099,511,627,776 bytes"),
    Case("merge base: header not UTF-8 (A6)", merge_base(lambda k, t: with_header(b'{"\xff\xfe": 1}')),
         "not UTF-8 JSON"),
    Case("merge base: header not JSON (A6)", merge_base(lambda k, t: with_header(b"{not json}")),
         "corrupt safetensors header"),
    Case("merge base: header a JSON array (A6)", merge_base(lambda k, t: with_header(b"[1, 2, 3]")),
         "not a safetensors file"),
    Case("merge base: negative offset (A7)",
         merge_base(lambda k, t: mutated(k.single, set_offsets(0, lambda o: [-8, o[1]]))),
         "data_offsets that are not [begin, end]"),
    Case("merge base: overlapping offsets (A7)",
         merge_base(lambda k, t: mutated(k.single, set_offsets(1, lambda o: [o[0] - 4, o[1] - 4]))),
         "overlaps"),
    Case("merge base: a hole between tensors (A7)",
         merge_base(lambda k, t: mutated(k.single, set_offsets(1, lambda o: [o[0] + 4, o[1] + 4]))),
         "leaves a hole of 4 bytes"),
    Case("merge base: byte length != shape x dtype (A7)",
         merge_base(lambda k, t: one_tensor_header(shape=[3])), "shape [3] of F32 needs 12"),
    Case("merge base: shape product overflow (A7)",
         merge_base(lambda k, t: one_tensor_header(shape=[2**62, 8])), "needs 147573952589676412928"),
    Case("merge base: unknown dtype F99 (A8)", merge_base(lambda k, t: one_tensor_header(dtype="F99")),
         "unsupported dtype 'F99'"),
    Case("merge base: a dtype torch lacks (A8)", merge_base(lambda k, t: one_tensor_header(dtype="F8_E8M0")),
         "unsupported dtype 'F8_E8M0'"),
    Case("merge base: duplicate tensor key (A9)", merge_base(lambda k, t: DUPLICATE_KEY), "more than once"),
    Case("merge base: metadata value not a string (A6)",
         merge_base(lambda k, t: mutated(k.single, lambda h: h.update({"__metadata__": {"n": 1}}))),
         "__metadata__ must map names to strings"),
    Case("merge base: NaN weights (A10)",
         merge_base(lambda k, t: k.single.read_bytes()[:-4] + struct.pack("<f", float("nan"))), "NaN or inf"),
    Case("merge base: int32 weights",
         merge_base(lambda k, t: mutated(k.single, set_entry("dtype", "I32", -1))), "not floating point"),
    Case("merge base: .ckpt with a code payload (A11, A12)",
         merge_base(lambda k, t: torch_pickle(t / "x.pt", {"state_dict": {"w": torch.zeros(1)},
                                                            "x": Payload(t / "PWNED")}), name="model.ckpt"),
         "does not read pickles unless asked"),
    Case("merge base: folder without weights",
         merge_base(lambda k, t: write(t / "b" / "config.json", "{}").parent), "no U-Net weights"),
    Case("merge base: config.json not JSON", merge_base(base_with_config("{")), "not a usable U-Net config"),
    Case("merge base: config.json norm_num_groups 0",
         merge_base(base_with_config(json.dumps(MICRO.to_diffusers() | {"norm_num_groups": 0}))),
         "not a usable U-Net config"),
    Case("merge base: shard index naming ../ files", merge_base(shard_index_escaping), "not file names"),
    Case("merge base: missing", merge_base(lambda k, t: t / "nope.safetensors"), "no such file"),
    Case("merge base: a LoRA given as the base", merge_base(lambda k, t: k.lora), "looks like a LoRA file"),
    Case("sample --base: a pipeline whose VAE is truncated",
         lambda k, t: ["sample", "--base", pipeline_with_half_vae(k, t), "--prompt", "a", "--steps", "1",
                       "--device", "cpu", "-o", t / "g.png"],
         "vae/diffusion_pytorch_model.safetensors is truncated"),
    Case("sample --base: a truncated single file",
         lambda k, t: ["sample", "--base", write(t / "sd.safetensors", good_half(k.single)), "--tokenizer",
                       k.pipeline / "tokenizer", "--prompt", "a", "-o", t / "g.png"], "truncated"),

    # B. LoRA files (read_lora behind merge, convert, resize, inspect, sample)
    Case("convert: a U-Net given as LoRA (B1)", convert(lambda k, t: k.single), "not a LoRA"),
    Case("merge: LoRA keys that name no layer (B2)", merge_lora(lora_with(only_foreign)),
         "not a U-Net layer name"),
    Case("merge: LoRA with one foreign module (B3)", merge_lora(lora_with(with_foreign_module)),
         "--allow-unmatched"),
    Case("merge: LoRA made for another base (B4)", merge_lora(lambda k, t: k.tiny_lora), "preset tiny"),
    Case("merge: LoRA whose last module does not fit its layer (B9)",
         merge_lora(lora_with(last_module_too_wide)), "1 shape mismatches"),
    Case("sample: LoRA whose last module does not fit its layer (B9)",
         sample_lora(lambda k, t: lora_file(k.tiny_lora, t / "l.safetensors", last_module_too_wide)),
         "1 shape mismatches"),
    Case("convert: a LyCORIS LoHa file to the peft layout", convert(lora_with(to_loha)),
         "LoHa/LoKr layers have no diffusers file form"),
    Case("convert: rank mismatch (B5)",
         convert(lora_with(replace_first("lora_down.weight", lambda v: torch.zeros(3, *v.shape[1:])))),
         "rank mismatch"),
    Case("convert: alpha missing (B5)", convert(lora_with(drop_alphas)), "have no alpha"),
    Case("convert: alpha not a scalar (B5)",
         convert(lora_with(replace_first(".alpha", lambda v: torch.ones(2)))), "not a scalar"),
    Case("convert: lora_adapter_metadata not JSON (B7)", convert(peft_lora("{not json")),
         "lora_adapter_metadata is not a valid LoRA config"),
    Case("convert: pattern key is a regular expression",
         convert(peft_lora(json.dumps({"unet.r": 2, "unet.lora_alpha": 2,
                                       "unet.alpha_pattern": {"(a+)+$": 1}}))),
         "not module names"),
    Case("convert: adapterkit.base_config with norm_groups 0",
         convert(lora_with(metadata=lambda md: md | {"adapterkit.base_config": json.dumps(
             MICRO.to_dict() | {"norm_groups": 0})})), "adapterkit.base_config is not a valid U-Net config"),
    Case("convert: rank-0 LoRA", convert(lora_with(rank_zero)), "rank >= 1"),
    Case("convert: int64 LoRA", convert(lora_with(to_int64)), "not floating point"),
    Case("sample: int64 LoRA", sample_lora(lora_with(to_int64)), "not floating point"),
    Case("convert: alpha -4", convert(lora_with(scale_alphas(-4.0))), "is negative"),
    Case("merge: alpha -4", merge_lora(lora_with(scale_alphas(-4.0))), "is negative"),
    Case("sample: alpha -4", sample_lora(lora_with(scale_alphas(-4.0))), "is negative"),
    Case("convert: alpha 1e30", convert(lora_with(scale_alphas(1e30))), "over the limit"),
    Case("merge: alpha 1e30", merge_lora(lora_with(scale_alphas(1e30))), "over the limit"),
    Case("sample: alpha 1e30", sample_lora(lora_with(scale_alphas(1e30))), "over the limit"),
    Case("resize: alpha 1e30", lambda k, t: ["resize", lora_with(scale_alphas(1e30))(k, t), "--rank", "1",
                                             "-o", t / "r.safetensors"], "over the limit"),
    Case("convert: NaN in lora_up",
         convert(lora_with(replace_first("lora_up.weight", lambda v: v * float("nan")))), "NaN/inf"),
    Case("convert: lora_down that does not fit its layer",
         convert(lora_with(replace_first("lora_down.weight", lambda v: torch.zeros(v.shape[0], 17)))),
         "do not fit a layer of weight"),
    Case("convert: truncated LoRA", convert(lambda k, t: good_half(k.lora)), "truncated"),
    Case("convert: HTML page as LoRA", convert(lambda k, t: HTML), "HTML page"),
    Case("convert: torch pickle LoRA",
         convert(lambda k, t: torch_pickle(t / "l.pt", {"w": torch.zeros(2)}), name="l.pt"), "pickle"),
    Case("convert: a folder as LoRA", convert(lambda k, t: folder(t / "d")), "is a folder"),
    Case("inspect: truncated LoRA",
         lambda k, t: ["inspect", write(t / "l.safetensors", good_half(k.lora))], "truncated"),
    Case("merge: LoRA ratio nan",
         lambda k, t: ["merge", "--base", k.base, f"{k.lora}:nan", "-o", t / "m"], "finite"),
    Case("merge LoRAs: a ratio that overflows fp16",
         lambda k, t: ["merge", f"{k.lora}:1e9", k.lora, "--dtype", "fp16", "-o", t / "ab.safetensors"],
         "overflow to inf in torch.float16"),
    Case("merge: ratio that overflows an fp16 base",
         lambda k, t: ["merge", "--base", fp16_base(k, t), f"{k.lora}:1e7", "-o", t / "m"],
         "non-finite weights"),

    # B8. ControlNet files (read after the base is loaded)
    Case("sample: truncated ControlNet (B8)",
         sample_hint(lambda k, t: k.hint, cn=lambda k, t: write(t / "cn.safetensors", good_half(k.cn))),
         "truncated"),
    Case("sample: ControlNet missing a tensor (B8)", sample_hint(lambda k, t: k.hint, cn=cn_without_a_key),
         "1 missing tensors"),

    # D6/D2. --hint pictures: size checked on the header, full decode
    Case("sample: hint declaring 15000 x 15000 (decompression bomb)",
         sample_hint(lambda k, t: png_declaring(15000, 15000)), "resize it to at most 16.8 Mpx"),
    Case("sample: hint declaring 10000 x 10000 (291 KB, 3.9 GB decoded)",
         sample_hint(lambda k, t: png_declaring(10000, 10000)), "resize it to at most 16.8 Mpx"),
    Case("sample: hint of 5000 x 5000, over our cap", sample_hint(lambda k, t: png_declaring(5000, 5000)),
         "25.0 Mpx > max_pixels 16.8 Mpx"),
    Case("sample: truncated hint PNG", sample_hint(lambda k, t: picture("png")[:80]), "truncated or damaged"),
    Case("sample: text named .png as hint", sample_hint(lambda k, t: b"not a picture\n"), "not a "),
    Case("sample: a folder as hint", sample_hint(lambda k, t: folder(t / "h")), "is a folder"),
    Case("sample: missing hint", sample_hint(lambda k, t: t / "nope.png"), "no such file"),

    # Recipes: YAML limits
    Case("train: YAML alias bomb (508 bytes, 4e8 strings)", train(text=lambda k, t: alias_bomb()),
         "alias bomb"),
    Case("train: more than 100 aliases", train(text=lambda k, t: many_aliases(101)), "more than 100 aliases"),
    Case("train: recursive alias", train(text=lambda k, t: "a: &a [*a]\n"), "cannot be recursive"),
    Case("train: recipe over 1 MiB", train(text=lambda k, t: "# " + "x" * (1 << 20) + "\n"), "too large"),
    Case("train: YAML nested 5000 deep", train(text=lambda k, t: "a: " + "[" * 5000 + "]" * 5000 + "\n"),
         "nested too deeply"),
    Case("train: type error on a 48000-item value", train(text=lambda k, t: huge_type_error()),
         "train.steps: expected int"),
    Case("train: top level a list", train(text=lambda k, t: "- a\n- b\n"), "must be a mapping"),
    Case("train: YAML syntax error", train(text=lambda k, t: "a: [1, 2\n"), "not valid YAML"),
    Case("train: duplicate key", train(text=lambda k, t: "a: 1\na: 2\n"), "duplicate key"),
    Case("train: python tag payload",
         train(text=lambda k, t: f'a: !!python/object/apply:os.system ["touch {t}/PWNED"]\n'),
         "not valid YAML"),
    Case("train: recipe not UTF-8",
         lambda k, t: ["train", "lora", write(t / "r.yaml", b"a: \xff\xfe\n")], "UTF-8"),
    Case("train: recipe missing", lambda k, t: ["train", "lora", t / "nope.yaml"], "does not exist"),
    Case("train: recipe is a folder", lambda k, t: ["train", "lora", folder(t / "r")], "is a folder"),

    # Recipes: ranges and names
    Case("train: train.steps 0", train("train.steps=0"), "train.steps: must be >= 1, got 0"),
    Case("train: train.steps -5", train("train.steps=-5"), "train.steps: must be >= 1, got -5"),
    Case("train: train.grad_accum 0", train("train.grad_accum=0"), "train.grad_accum: must be >= 1"),
    Case("train: train.batch_size 0", train("train.batch_size=0"), "train.batch_size: must be >= 1"),
    Case("train: output.log_every -1", train("output.log_every=-1"), "output.log_every: must be >= 0"),
    Case("train: output.checkpoint_every -1", train("output.checkpoint_every=-1"),
         "output.checkpoint_every: must be >= 0 (0 = only at the end)"),
    Case("train: output.keep_checkpoints -1", train("output.keep_checkpoints=-1"), "output.keep_checkpoints"),
    Case("train: optim.max_grad_norm -1", train("optim.max_grad_norm=-1"),
         "optim.max_grad_norm: must be >= 0 (0 = no clipping)"),
    Case("train: optim.lr -1", train("optim.lr=-1"), "optim.lr: must be >= 0"),
    Case("train: optim.lr nan", train("optim.lr=nan"), "optim.lr: nan is not a finite number"),
    Case("train: optim.betas 1", train("optim.betas=0.9,1.0"), "optim.betas[1]: must be >= 0 and < 1"),
    Case("train: lora.rank 0", train("lora.rank=0"), "lora.rank: must be >= 1"),
    Case("train: lora.alpha -4", train("lora.alpha=-4"), "lora.alpha: must be > 0"),
    Case("train: lora.dropout 1", train("lora.dropout=1"), "lora.dropout: must be >= 0 and < 1"),
    Case("train: train.seed -1", train("train.seed=-1"), "train.seed: must be >= 0"),
    Case("train: sample.steps 0", train("sample.steps=0"), "sample.steps: must be >= 1"),
    Case("train: output.name ../../escaped", train("output.name=../../escaped"),
         "output.name: '../../escaped' must be a plain file name"),
    Case("train: output.name with a separator", train("output.name=a/b"), "output.name"),
    Case("pretrain: model.scheduler through ../", train("model.scheduler=../../../../etc/x", job="pretrain"),
         "model.scheduler: '../../../../etc/x' must be a plain file name"),
    Case("train: bad number override", train("train.steps=abc"), "train.steps: cannot read 'abc' as int"),
    Case("train: unknown key", train("train.stpes=3"), "did you mean 'steps'"),

    # Recipes: paths (checked before anything is loaded or created)
    Case("train: output.dir inside the picture folder", train("output.dir={images}/out"),
         "is inside data.root"),
    Case("train: output.dir is the picture folder", train("output.dir={images}"),
         "would overwrite data.root"),
    Case("train: output.dir inside the base", train("output.dir={pipeline}/out"), "is inside model.base"),
    Case("train: output.dir is a file", train("output.dir={t}/recipe.yaml"), "is a file, not a folder"),
    Case("train: output.dir read-only (C10)", train("output.dir={t}/ro/out"), "cannot write in",
         fault=lambda mp, t: (t / "ro").mkdir() or deny_writes(mp, t / "ro")),
    Case("train: data.root missing", train("data.root={t}/nope"), "data.root"),
    Case("train: model.base missing", train("model.base={t}/nope"), "model.base"),
    Case("train: every picture filtered out (D17), before any model loads", train_on(all_filtered),
         "none of the 2 image files", fault=no_model, may_create=("out",)),
    Case("train: an uncaptioned picture and no trigger word (D12), before any model loads",
         train_on(one_uncaptioned), "would train on an empty caption: img00.png", fault=no_model,
         may_create=("out",)),
    Case("train: disk full during the run", train(), "no space left on device", fault=full_disk_job),
    Case("train: one of our bugs", train(), "internal error, a bug in adapterkit", code=1,
         fault=job_raises(KeyError("oops"))),

    # Outputs of the file commands
    Case("convert X X (would rewrite the input)",
         lambda k, t: ["convert", copy(k.lora, t / "x.safetensors"), t / "x.safetensors"],
         "would overwrite INPUT"),
    Case("convert X through a symlink to X",
         lambda k, t: ["convert", copy(k.lora, t / "x.safetensors"),
                       link(t / "y.safetensors", t / "x.safetensors")],
         "would overwrite INPUT"),
    Case("merge -o inside the base folder",
         lambda k, t: ["merge", "--base", base_copy(k, t), k.lora, "-o", t / "b" / "unet"],
         "is inside --base"),
    Case("merge -o the base folder",
         lambda k, t: ["merge", "--base", base_copy(k, t), k.lora, "-o", t / "b"],
         "would overwrite --base"),
    Case("merge -o the base single file",
         lambda k, t: ["merge", "--base", copy(k.single, t / "b.safetensors"), k.lora, "--layout", "ldm",
                       "-o", t / "b.safetensors"], "would overwrite --base"),
    Case("merge -o a folder whose weights file is the base",
         lambda k, t: ["merge", "--base", copy(k.single, folder(t / "f") / DIFFUSERS_WEIGHTS[0]), k.lora,
                       "-o", t / "f"], "would overwrite --base"),
    Case("merge LoRAs -o one of them",
         lambda k, t: ["merge", copy(k.lora, t / "a.safetensors"), k.lora, "-o", t / "a.safetensors"],
         "would overwrite LORA"),
    Case("convert: output read-only",
         read_only_out(lambda k, t, ro: ["convert", k.lora, ro / "o.safetensors"]), "cannot write in",
         fault=lambda mp, t: deny_writes(mp, t / "ro")),
    Case("merge: output read-only",
         read_only_out(lambda k, t, ro: ["merge", "--base", k.base, k.lora, "-o", ro / "m"]),
         "cannot write in", fault=lambda mp, t: deny_writes(mp, t / "ro")),
    Case("sample: output read-only",
         read_only_out(lambda k, t, ro: ["sample", "--base", k.pipeline, "--prompt", "a",
                                         "-o", ro / "g.png"]),
         "cannot write in", fault=lambda mp, t: deny_writes(mp, t / "ro")),
    Case("canny: output read-only",
         read_only_out(lambda k, t, ro: ["canny", pictures(t / "in"), ro / "edges"]), "permission denied",
         fault=lambda mp, t: deny_writes(mp, t / "ro")),
    Case("sample -o a folder",
         lambda k, t: ["sample", "--base", k.pipeline, "--prompt", "a", "-o", folder(t / "g")],
         "is a folder; give a file name"),
    Case("convert -o under a file",
         lambda k, t: ["convert", k.lora, write(t / "f.txt", "") / "o.safetensors"],
         "is a file, so nothing can be created under it"),
    Case("convert -o without .safetensors", lambda k, t: ["convert", k.lora, t / "o.txt"],
         "ending in .safetensors"),
    Case("merge --layout ldm -o without .safetensors",
         lambda k, t: ["merge", "--base", k.base, k.lora, "--layout", "ldm", "-o", t / "m"],
         "ending in .safetensors"),
    Case("convert: disk full (A14), the previous output kept",
         lambda k, t: ["convert", k.lora, write(t / "o.safetensors", b"previous")],
         "no space left on device", fault=disk_full),
    Case("merge: disk full (A14), the previous output kept",
         lambda k, t: ["merge", "--base", k.base, k.lora, "--layout", "ldm", "--unet-only",
                       "-o", write(t / "m.safetensors", b"previous")],
         "no space left on device", fault=disk_full),
    Case("canny: disk full", lambda k, t: ["canny", pictures(t / "in"), t / "edges"],
         "no space left on device", fault=disk_full, may_create=("edges",)),

    # Numeric arguments
    Case("sample --steps 0",
         lambda k, t: ["sample", "--base", k.pipeline, "--prompt", "a", "--steps", "0", "-o", t / "g.png"],
         "--steps must be >= 1"),
    Case("sample --guidance nan",
         lambda k, t: ["sample", "--base", k.pipeline, "--prompt", "a", "--guidance", "nan",
                       "-o", t / "g.png"],
         "--guidance must be"),
    Case("resize --rank 0", lambda k, t: ["resize", k.lora, "--rank", "0", "-o", t / "r.safetensors"],
         "--rank must be >= 1"),
    Case("extract --rank 0",
         lambda k, t: ["extract", "--base", k.base, "--tuned", k.base, "--rank", "0",
                       "-o", t / "x.safetensors"],
         "--rank must be >= 1"),

    # D. picture folders through `canny` (the training scan's decoder; exit 1 = "some skipped", its contract)
    Case("canny: JPEG truncated to half (D1)", canny({"a.jpg": picture("jpg")[:300]}), "corrupt", code=1),
    Case("canny: truncated PNG (D2)", canny({"a.png": picture("png")[:80]}), "corrupt", code=1),
    Case("canny: 0-byte PNG (D2)", canny({"a.png": b""}), "unreadable", code=1),
    Case("canny: HTML named .jpg (D2)", canny({"a.jpg": HTML}), "unreadable", code=1),
    Case("canny: only system files (D3)",
         canny({".DS_Store": b"\0" * 8, "._a.jpg": b"\0" * 8, "Thumbs.db": b"\0"}), "no images found"),
    Case("canny: HEIC without a decoder (D5)", canny({"a.heic": b"\0" * 64}), "unsupported", code=1),
    Case("canny: 15000 x 15000 PNG (D6)", canny({"a.png": png_declaring(15000, 15000)}), "too_large", code=1),
]


# --- running a row -----------------------------------------------------------------------------------------

def snapshot(*folders: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder, under `folders`: what must not change."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_symlink():
                out[str(p)] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, kit, tmp_path, monkeypatch, capsys):
    row = tmp_path / "row"
    row.mkdir()
    argv = [str(a) for a in case.argv(kit, row)]
    if case.fault is not None:
        case.fault(*((monkeypatch, row) if case.fault.__code__.co_argcount == 2 else (monkeypatch,)))
    capsys.readouterr()
    watched = (row, kit.root, kit.pipeline, kit.images)
    before = snapshot(*watched)
    code = cli.main(argv)                      # an exception here is a traceback the user would see
    monkeypatch.undo()
    out, err = capsys.readouterr()
    message = err + out
    assert code == case.code, message
    assert case.phrase.lower() in message.lower(), message
    assert len(err) < 4000, f"a {len(err)}-character message"
    assert "Traceback" not in message
    after = snapshot(*watched)
    for name in case.may_create:
        assert after.pop(str(row / name), "dir") == "dir"
    assert after == before, "files changed"


def test_every_issue_case_has_a_row():
    """The table covers the issue's bullets and reliability.md's list (by the tags in the ids). The
    cases proven elsewhere (A13, B6, C1-C9, D4, D7-D11, D13-D16: model, job and folder-level tests)
    are mapped, all 50, in tests/train/test_reliability_cases.py, which checks each pointer exists."""
    ids = " ".join(c.id for c in CASES)
    for tag in ("A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "A10", "A11", "A12", "A14", "B1", "B2",
                "B3", "B4", "B5", "B7", "B8", "B9", "C10", "D1", "D2", "D3", "D5", "D6", "D12", "D17"):
        assert f"({tag}" in ids or f", {tag})" in ids or f"({tag})" in ids, tag
    assert len({c.id for c in CASES}) == len(CASES)
