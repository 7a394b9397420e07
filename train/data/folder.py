"""A folder of images with captions: scan once, report every problem, then serve training samples.

Layout: images anywhere under `data.root` (subfolders included). A caption comes from the same-name
`.txt` beside the image (`cat.png` <- `cat.txt`), or from a `metadata.jsonl` in any folder (the
`datasets` imagefolder layout: one JSON object per line, `{"file_name": "sub/cat.png", "text": ...}`,
`caption` accepted for `text`, `file_name` relative to the metadata file's folder).

`scan_folder` fully decodes every image once before training (Pillow's `verify()` passes a JPEG cut
in half; only a decode notices), so problems surface now, with file names, instead of hours in.
It never writes anything under the folder. Each case below is skipped or fixed by this policy and
counted in the `ScanReport`, whose `summary()` the trainer prints before it starts:

| case                                                         | action | report key       |
|--------------------------------------------------------------|--------|------------------|
| not an image extension (`.md`, `.json`, ...)                 | ignore | (counted only)   |
| hidden/system file or folder: `.DS_Store`, `._a.jpg`,        | ignore | hidden           |
|   `Thumbs.db`, `__MACOSX/`, `.git/` (never opened)           |        |                  |
| image extension without a decoder here (HEIC, PSD, RAW, SVG) | skip   | unsupported      |
| not an image (0 bytes, text or HTML named `.jpg`)            | skip   | unreadable       |
| truncated or damaged (the full decode fails)                 | skip   | corrupt          |
| over `max_pixels` (from the header, before decoding), or     | skip   | too_large        |
|   Pillow's DecompressionBombError / DecompressionBombWarning |        |                  |
| shorter side < `min_side` (default 64 px)                    | skip   | too_small        |
| same bytes (SHA-256) as an earlier file in path order        | skip   | duplicate        |
| float image (mode F), or a mode Pillow cannot turn into RGB  | skip   | unsupported      |
| no caption: no `.txt`, no metadata entry, or only whitespace | policy | missing_caption  |
|   `missing_caption`: "empty" (default: trigger word only),   |        |                  |
|   "skip", or "error" (stop and list the files)               |        |                  |
| CMYK: Pillow's conversion (an ICC profile is not applied)    | fix    | cmyk             |
| 16-bit grey (`I;16*`, `I`): scaled v/257, not clipped at 255 | fix    | 16bit            |
| alpha with any transparent pixel (RGBA, LA, PA, P or RGB     | fix    | alpha            |
|   with `transparency`): composited on `alpha_background`,    |        |                  |
|   white by default, so hidden colours never leak             |        |                  |
| EXIF orientation 2-8: `ImageOps.exif_transpose`              | fix    | exif_rotated     |
| animated / multi-picture (GIF, APNG, MPO): first frame       | fix    | multi_frame      |
| caption not UTF-8: read as cp1252 (else latin-1), warned     | fix    | caption_encoding |
|   with the file name; UTF-8 BOM stripped; UTF-16 by its BOM  |        |                  |
| content format differs from the extension: decoded anyway    | note   | wrong_extension  |
| `.txt` and metadata both caption an image: the `.txt` wins   | note   | caption_conflict |
| `.txt` with no image of the same name (a typo?)              | note   | orphan_caption   |
| `metadata.jsonl` line not JSON, without text/caption, with   | note   | metadata         |
|   an unsafe `file_name` (absolute, `..`, URL) or a missing   |        |                  |
|   file: that line is ignored                                 |        |                  |

Captions are cleaned (control characters and whitespace runs become one space). Symlinked files are
read; symlinked folders are not followed.

An empty folder, or one where nothing survives, raises ValueError with the counts per reason and
what to do. Randomness at sample time (crop, flip, caption dropout) is a pure function of
(seed, epoch, index), so DataLoader workers, resume and reruns agree. Each record carries the
SHA-256 of its file bytes, the key for latent caches; a file that changes after the scan is an error.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from adapterkit.train.data.buckets import BucketBatchSampler, Size, assign_bucket, make_buckets, plan_crop

logger = logging.getLogger(__name__)

# Decoders we let Pillow use (it otherwise tries ~40 formats, FITS and PSD among them: a bigger attack
# surface, cf. CVE-2026-40192). Extension -> formats it may legitimately contain.
DECODERS = {
    ".png": {"PNG"}, ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".jpe": {"JPEG", "MPO"},
    ".jfif": {"JPEG"}, ".webp": {"WEBP"}, ".bmp": {"BMP"}, ".gif": {"GIF"}, ".tif": {"TIFF"},
    ".tiff": {"TIFF"}, ".avif": {"AVIF"},
}
if "AVIF" not in Image.registered_extensions().values():   # Pillow built without libavif
    del DECODERS[".avif"]
IMAGE_EXTENSIONS = frozenset(DECODERS)
FORMATS = sorted(set().union(*DECODERS.values()) - {"MPO"})   # MPO files open through the JPEG entry
UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".psd", ".svg", ".jxl", ".raw", ".dng",
                                    ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".exr", ".hdr"}
                                   - IMAGE_EXTENSIONS)
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
METADATA_NAME = "metadata.jsonl"

# Report keys -> (action, one line for the summary). The docstring table above says the same.
POLICY: dict[str, tuple[str, str]] = {
    "unsupported": ("skip", "format or mode without a decoder here"),
    "unreadable": ("skip", "not an image (empty, text/HTML, unknown format)"),
    "corrupt": ("skip", "truncated or damaged (full decode failed)"),
    "too_large": ("skip", "over the pixel limit (data.max_pixels) or a decompression bomb"),
    "too_small": ("skip", "shorter side below data.min_side"),
    "duplicate": ("skip", "same bytes as an earlier file; the first is kept"),
    "missing_caption": ("policy", "no caption (.txt or metadata.jsonl), or an empty one"),
    "cmyk": ("fix", "CMYK converted to RGB"),
    "16bit": ("fix", "16-bit grey scaled to 8 bits (not clipped)"),
    "alpha": ("fix", "transparent pixels composited onto data.alpha_background"),
    "exif_rotated": ("fix", "EXIF orientation applied"),
    "multi_frame": ("fix", "animated/multi-picture: first frame used"),
    "caption_encoding": ("fix", "caption not UTF-8, decoded as cp1252/latin-1: check the text"),
    "wrong_extension": ("note", "content format differs from the extension; decoded by content"),
    "caption_conflict": ("note", ".txt and metadata.jsonl disagree; the .txt is used"),
    "orphan_caption": ("note", "caption file with no image of the same name"),
    "metadata": ("note", "metadata.jsonl line ignored"),
    "hidden": ("ignore", "hidden/system files and folders"),
}


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training recipe."""
    root: str                                   # the image folder (read-only to us)
    resolution: int = 512                       # bucket area ~ resolution**2
    bucket_step: int = 64                       # bucket sides are multiples of this
    min_bucket_side: int | None = None          # default resolution // 2
    max_bucket_side: int | None = None          # default 2 * resolution
    # None: the largest size per side length; a fraction of resolution**2: every size down to it
    # (0.9 at resolution 1024: SDXL's 41 buckets, train/data/buckets.py SDXL_MIN_AREA)
    min_bucket_area: float | None = None
    trigger: str = ""                           # prepended: "sks, a red circle"
    caption_dropout: float = 0.0                # probability of an empty caption (for CFG)
    caption_ext: str = ".txt"
    missing_caption: Literal["empty", "skip", "error"] = "empty"
    min_side: int = 64                          # smaller images are skipped
    # Our own cap, below Pillow's 89.5 Mpx warning. Pillow's guard stays in force: raising this past
    # Image.MAX_IMAGE_PIXELS has no effect unless the caller raises Pillow's limit as well.
    max_pixels: int = 8192 * 8192
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    random_crop: bool = False                   # else center crop
    flip: bool = False                          # horizontal flip with p = 0.5
    seed: int = 0
    # Cache entries (latent moments, text conditioning) kept in memory once read and checked, so that
    # a step reads no file (train/data/cache.py); 0 = read every entry from disk each time.
    cache_memory_mb: int = 2048

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError("min_side and max_pixels must be >= 1")
        if len(self.alpha_background) != 3 or not all(0 <= c <= 255 for c in self.alpha_background):
            raise ValueError(f"alpha_background must be 3 values in 0..255, got {self.alpha_background}")
        if not self.caption_ext.startswith("."):
            raise ValueError(f"caption_ext must start with '.', got {self.caption_ext!r}")
        make_buckets(self.resolution, self.bucket_step, self.min_bucket_side, self.max_bucket_side,
                     self.min_bucket_area)


@dataclass(frozen=True)
class ImageRecord:
    """One accepted image. `size` is (width, height) after EXIF orientation."""
    path: Path
    rel: str                     # POSIX path relative to the root, for messages
    sha256: str                  # of the file bytes: the latent-cache key
    size: Size
    caption: str                 # as written by the user, without trigger; "" if none
    fixes: tuple[str, ...] = ()  # POLICY keys applied when loading


@dataclass
class ScanReport:
    """What the scan found: per POLICY key, the (relative path, detail) pairs."""
    root: Path
    missing_caption: str = "empty"       # the policy in force, for the summary
    image_files: int = 0                 # files with an image extension
    accepted: int = 0
    ignored: Counter = field(default_factory=Counter)   # other files, by extension
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, key: str, rel: str, detail: str = "") -> None:
        self.entries.setdefault(key, []).append((rel, detail))

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.entries.items()}

    def action(self, key: str) -> str:
        action = POLICY[key][0]
        if action == "policy":
            return "skip" if self.missing_caption == "skip" else "fix"
        return action

    def summary(self, names: int = 5) -> str:
        """The report as text: one line per key found, with the first `names` files."""
        lines = [f"data: {self.accepted} of {self.image_files} image files accepted under {self.root}"]
        if self.ignored:
            top = ", ".join(f"{ext or '(none)'}: {n}" for ext, n in self.ignored.most_common(5))
            lines[0] += f"; {sum(self.ignored.values())} other files ignored ({top})"
        for key, (_, what) in POLICY.items():
            found = self.entries.get(key)
            if not found:
                continue
            if key == "missing_caption":
                what += ("; skipped" if self.missing_caption == "skip"
                         else "; trained on the trigger word alone (empty if there is none)")
            lines.append(f"  {self.action(key):6} {len(found):5}  {key}: {what}")
            lines += file_lines(found, names)
        return "\n".join(lines)

    __str__ = summary


def file_lines(found: list[tuple[str, str]], names: int) -> list[str]:
    """The first `names` (file, detail) entries of a report row, indented, and a count of the rest."""
    lines = [f"                 {rel}" + (f": {detail}" if detail else "") for rel, detail in found[:names]]
    if len(found) > names:
        lines.append(f"                 ... and {len(found) - names} more")
    return lines


class BadImage(ValueError):
    """An image the policy skips; `reason` is a POLICY key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# -- decoding -------------------------------------------------------------------------------------


def decode_image(data: bytes, *, ext: str = "", max_pixels: int = DataConfig.max_pixels,
                 min_side: int = 1, background: tuple[int, int, int] = (255, 255, 255),
                 ) -> tuple[Image.Image, list[str]]:
    """Decode file bytes into an upright 8-bit RGB image; return it and the POLICY fixes applied.
    Raises BadImage for anything the policy skips. Size limits are checked on the header, before
    the pixels are decoded."""
    fixes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} = {w * h / 1e6:.1f} Mpx > max_pixels "
                                            f"{max_pixels / 1e6:.1f} Mpx")
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{w}x{h}, shorter side < min_side {min_side}")
            if getattr(im, "n_frames", 1) > 1:
                fixes.append("multi_frame")    # a freshly opened file sits on frame 0
            im.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise BadImage("unreadable", f"not a {'/'.join(FORMATS)} image") from None
    except Exception as e:  # damaged files make decoders raise anything; never crash
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    if ext and im.format not in DECODERS.get(ext, {im.format}):
        fixes.append("wrong_extension")
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block leaves the pixels usable
        orientation = 1
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        fixes.append("exif_rotated")
    try:
        return _to_rgb(im, background, fixes), fixes
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("unsupported", f"mode {im.mode}: {e}") from None


def _to_rgb(im: Image.Image, background: tuple[int, int, int], fixes: list[str]) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode == "I":
        # Pillow's convert() clips 16-bit values at 255 (two grey levels left, Pillow#2574); scale
        # instead. Mode I (32-bit) is taken to hold 16-bit data, as 16-bit PNG/TIFF decode to it.
        a = np.asarray(im).astype(np.float64).clip(0, 65535)
        fixes.append("16bit")
        return Image.fromarray((a / 257.0).round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise BadImage("unsupported", "32-bit float image (mode F): its value range is unknown")
    if im.mode == "CMYK":
        fixes.append("cmyk")
        return im.convert("RGB")
    if im.has_transparency_data:
        # convert("RGB") would expose whatever colour hides under transparent pixels
        # (kohya-ss/sd-scripts#1269); composite onto the background instead.
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            fixes.append("alpha")
            bg = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return rgba.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    a = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))     # (H, W, 3)
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)                # (3, H, W)


# -- captions -------------------------------------------------------------------------------------


def decode_caption(raw: bytes) -> tuple[str, str]:
    """Caption bytes -> (text, note). UTF-16 by BOM, UTF-8 (BOM stripped), then cp1252 / latin-1
    with a note naming the first bad byte. Never raises."""
    note = ""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), ""
        except UnicodeDecodeError:
            pass
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        try:
            text, enc = raw.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            text, enc = raw.decode("latin-1"), "latin-1"   # decodes every byte
        note = f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); read as {enc}: {text[:40]!r}"
    return text, note


def clean_caption(text: str) -> str:
    """Control characters become spaces, whitespace runs (newlines too) one space, ends stripped."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def build_caption(caption: str, trigger: str, dropout: float, rng: np.random.Generator) -> str:
    """The training caption: "" with probability `dropout`, else "trigger, caption" (the caption as it
    is when one of its comma-separated parts already is the trigger)."""
    if dropout and rng.random() < dropout:
        return ""
    present = caption.startswith(trigger) or trigger in (part.strip() for part in caption.split(","))
    if trigger and not present:
        return f"{trigger}, {caption}" if caption else trigger
    return caption


def _read_metadata(path: Path, root: Path, report: ScanReport) -> dict[Path, str]:
    """metadata.jsonl -> {normalized image path: caption}; bad lines go to the report."""
    rel = path.relative_to(root).as_posix()
    text, note = decode_caption(path.read_bytes())
    if note:
        report.add("caption_encoding", rel, note)
        logger.warning("%s: %s", path, note)
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{rel}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.add("metadata", where, f"not JSON ({e.msg})")
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        caption = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            report.add("metadata", where, "needs a string 'file_name' and a string 'text' (or 'caption')")
            continue
        # The same rule as datasets' PR #8325 (CWE-22): relative, inside the folder, no URL.
        target = Path(os.path.normpath(path.parent / name))
        if ("://" in name or name.startswith("file:") or PurePosixPath(name).is_absolute()
                or PureWindowsPath(name).is_absolute() or not target.is_relative_to(root)):
            report.add("metadata", where, f"unsafe file_name {name!r}: must be relative, inside the folder")
            continue
        if not target.is_file() or target.suffix.lower() not in IMAGE_EXTENSIONS:
            report.add("metadata", where, f"file_name {name!r} is not an image file in the folder")
            continue
        if target in out:
            report.add("metadata", where, f"second entry for {name!r}; the first is used")
            continue
        out[target] = caption
    return out


# -- the scan -------------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def scan_folder(cfg: DataConfig) -> tuple[list[ImageRecord], ScanReport]:
    """Find, decode and caption every image under cfg.root by the module's policy. Read-only."""
    root = Path(os.path.normpath(os.path.abspath(cfg.root)))
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {cfg.root!r} is not a folder" +
                                ("" if root.exists() else " (it does not exist)"))
    report = ScanReport(root, cfg.missing_caption)
    images, unsupported, captions, metadata = [], [], set(), []
    for dirpath, dirnames, filenames in os.walk(root):       # symlinked folders are not followed
        for d in [d for d in dirnames if _hidden(d)]:
            report.add("hidden", Path(dirpath, d).relative_to(root).as_posix() + "/")
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in filenames:
            p = Path(dirpath, name)
            ext = p.suffix.lower()
            if _hidden(name):
                report.add("hidden", p.relative_to(root).as_posix())
            elif name == METADATA_NAME:
                metadata.append(p)
            elif ext in IMAGE_EXTENSIONS:
                images.append(p)
            elif ext in UNSUPPORTED_EXTENSIONS:
                unsupported.append(p)
            elif p.suffix == cfg.caption_ext:
                captions.add(p)
            else:
                report.ignored[ext] += 1
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    for p in sorted(unsupported):
        report.add("unsupported", p.relative_to(root).as_posix(), f"no {p.suffix} decoder; convert to PNG")
    report.image_files = len(images) + len(unsupported)
    meta_captions: dict[Path, str] = {}
    for m in sorted(metadata):
        for target, caption in _read_metadata(m, root, report).items():
            meta_captions.setdefault(target, caption)
    for orphan in sorted(captions - {p.with_suffix(cfg.caption_ext) for p in images + unsupported}):
        report.add("orphan_caption", orphan.relative_to(root).as_posix())

    records, seen = [], {}
    for path in images:
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as e:
            report.add("unreadable", rel, f"{type(e).__name__}: {e.strerror or e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            report.add("duplicate", rel, f"same bytes as {seen[digest]}")
            continue
        try:
            image, fixes = decode_image(data, ext=path.suffix.lower(), max_pixels=cfg.max_pixels,
                                        min_side=cfg.min_side, background=cfg.alpha_background)
        except BadImage as e:
            report.add(e.reason, rel, e.detail)
            continue
        caption = _caption_for(path, rel, cfg, meta_captions, report)
        if caption is None:                         # missing; "skip" policy
            continue
        for fix in fixes:
            report.add(fix, rel)
        seen[digest] = rel
        records.append(ImageRecord(path, rel, digest, image.size, caption, tuple(fixes)))
    report.accepted = len(records)
    _check_usable(records, report, cfg)
    return records, report


def _caption_for(path: Path, rel: str, cfg: DataConfig, meta: dict[Path, str],
                 report: ScanReport) -> str | None:
    """The image's caption ("" when missing under the "empty" policy; None: skip it)."""
    txt = path.with_suffix(cfg.caption_ext)
    caption = meta.get(path)
    if txt.is_file():
        text, note = decode_caption(txt.read_bytes())
        if note:
            report.add("caption_encoding", txt.relative_to(report.root).as_posix(), note)
            logger.warning("caption %s: %s", txt, note)
        text = clean_caption(text)
        if caption is not None and clean_caption(caption) != text:
            report.add("caption_conflict", rel,
                       f"{cfg.caption_ext} {text[:30]!r} vs metadata {caption[:30]!r}")
        caption = text
    caption = clean_caption(caption or "")
    if not caption:
        report.add("missing_caption", rel)
        if cfg.missing_caption == "skip":
            return None
    return caption


def _check_usable(records: list[ImageRecord], report: ScanReport, cfg: DataConfig) -> None:
    missing = report.entries.get("missing_caption", [])
    if missing and cfg.missing_caption == "error":
        names = ", ".join(rel for rel, _ in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{len(missing)} images under {report.root} have no caption: {names}. Write a "
                         f"same-name {cfg.caption_ext} file or a metadata.jsonl entry for each, or set "
                         "data.missing_caption=empty (train on the trigger word) or =skip.")
    if report.image_files == 0:
        other = sum(report.ignored.values())
        raise ValueError(
            f"no images found under {report.root} ({other} other files ignored). Put "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files there (subfolders are searched), captions in "
            f"same-name {cfg.caption_ext} files or metadata.jsonl, or point data.root at that folder.")
    if not records:
        counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if report.action(k) == "skip")
        raise ValueError(
            f"none of the {report.image_files} image files under {report.root} is usable ({counts}). "
            "Fix or remove the files listed below, or relax data.min_side / data.max_pixels / "
            f"data.missing_caption.\n{report.summary()}")


# -- the dataset ----------------------------------------------------------------------------------


class CaptionedImageFolder(torch.utils.data.Dataset):
    """Scanned records served as training samples, each in its aspect-ratio bucket.

    Index with an int, or with the `(epoch, index)` keys `batch_sampler()` yields; the key seeds
    that sample's crop, flip and caption dropout.
    """

    def __init__(self, records: list[ImageRecord], cfg: DataConfig, report: ScanReport | None = None):
        self.records, self.cfg, self.report = records, cfg, report
        self.buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side,
                                    cfg.max_bucket_side, cfg.min_bucket_area)
        self.bucket_of = [assign_bucket(r.size, self.buckets) for r in records]

    @classmethod
    def scan(cls, cfg: DataConfig) -> CaptionedImageFolder:
        records, report = scan_folder(cfg)
        return cls(records, cfg, report)

    def summary(self) -> str:
        per_bucket = Counter(self.bucket_of)
        line = "buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(per_bucket.items()))
        return (f"{self.report.summary()}\n" if self.report else "") + line

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Image.Image:
        """The upright RGB image of record `index`, re-checked against its scan-time hash."""
        rec = self.records[index]
        data = rec.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ValueError(f"{rec.path} changed since the folder was scanned; restart to rescan it")
        image, _ = decode_image(data, max_pixels=self.cfg.max_pixels, min_side=self.cfg.min_side,
                                background=self.cfg.alpha_background)
        return image

    def describe(self, key: int | tuple[int, int]) -> dict:
        """Sample `key` without its pixels: caption, crop and identity. What a trainer that reads
        latents from a cache needs; `__getitem__` adds the pixels with the same crop."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rec, cfg = self.records[index], self.cfg
        rng = np.random.default_rng([cfg.seed, 1, epoch, index])   # stream 1: samples (0: order)
        crop = plan_crop(rec.size, self.bucket_of[index], rng, random_crop=cfg.random_crop,
                         flip_prob=0.5 if cfg.flip else 0.0)
        return {
            "caption": build_caption(rec.caption, cfg.trigger, cfg.caption_dropout, rng),
            "sha256": rec.sha256,
            "path": str(rec.path),
            "size": rec.size,
            "crop": crop,
        }

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        sample = self.describe(key)
        index = key[1] if isinstance(key, tuple) else key
        sample["pixel_values"] = to_tensor(sample["crop"].apply(self.load_image(index)))  # (3, bh, bw)
        return sample

    def batch_sampler(self, batch_size: int, *, shuffle: bool = True,
                      drop_last: bool = False) -> BucketBatchSampler:
        return BucketBatchSampler(self.bucket_of, batch_size, seed=self.cfg.seed, shuffle=shuffle,
                                  drop_last=drop_last)


def collate(samples: list[dict]) -> dict:
    """Stack pixel_values (one bucket per batch, so one shape); everything else becomes a list."""
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["pixel_values"] = torch.stack(out["pixel_values"])                  # (B, 3, bh, bw)
    return out

