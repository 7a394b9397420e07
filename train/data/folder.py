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
|   `missing_caption`: "empty" (default: trigger word only;    |        |                  |
|   without a `data.trigger` an error listing the files, never |        |                  |
|   an empty caption), "skip", or "error" (stop, list them)    |        |                  |
| symlink whose target lies outside `data.root`               | skip   | outside_root     |
| CMYK: through its ICC profile when it has one (to sRGB),     | fix    | cmyk             |
|   else Pillow's conversion (Adobe-inverted JPEGs undone)     |        |                  |
| 16-bit grey (`I;16*`, `I`): scaled v/257, not clipped at 255 | fix    | 16bit            |
| alpha with any transparent pixel (RGBA, LA, PA, P or RGB     | fix    | alpha            |
|   with `transparency`): composited on `alpha_background`,    |        |                  |
|   white by default, so hidden colours never leak             |        |                  |
| EXIF orientation 2-8: `ImageOps.exif_transpose`              | fix    | exif_rotated     |
| animated / multi-picture (GIF, APNG, MPO): first frame       | fix    | multi_frame      |
| caption not UTF-8: read as cp1252 (else latin-1), warned     | fix    | caption_encoding |
|   with the file name; UTF-8 BOM stripped; UTF-16 by its BOM  |        |                  |
| caption with control characters (NUL, ESC, ...): spaces      | fix    | caption_control  |
| content format differs from the extension: decoded anyway    | note   | wrong_extension  |
| `.txt` and metadata both caption an image: the `.txt` wins   | note   | caption_conflict |
| `.txt` with no image of the same name (a typo?)              | note   | orphan_caption   |
| one `.txt` captions several images (`a.png`, `a.jpg`)        | note   | shared_caption   |
| crop keeps < half the picture (aspect far outside the        | note   | bucket_fit       |
|   buckets'), or the picture is upscaled > 2x to its bucket   |        |                  |
| `metadata.jsonl` line not JSON, without text/caption, with   | note   | metadata         |
|   an unsafe `file_name` (absolute, `..`, URL) or a missing   |        |                  |
|   file: that line is ignored                                 |        |                  |
| an image a `datasets` imagefolder (metadata.csv) leaves out | skip   | unlisted         |
|   because its metadata does not list it (hf_datasets.py)     |        |                  |

Captions are cleaned (control characters and whitespace runs become one space). Symlinked files are
read when they point inside the root; symlinked folders are not followed. A caption is paired with its
image by name, also when one name is Unicode-NFC and the other NFD (macOS writes NFD). Names that are
not printable (a newline, bytes that are not UTF-8) are shown as their repr in every message.

An empty folder, or one where nothing survives, raises ValueError with the counts per reason and
what to do. Randomness at sample time (crop, flip, caption dropout, tag shuffle and dropout:
train/data/captions.py) is a pure function of (seed, epoch, index), so DataLoader workers, resume and
reruns agree. Each record carries the SHA-256 of its file bytes, the key for latent caches; a file
that changes after the scan is an error.

`data.root` may also be a Hugging Face `datasets` dataset (a `save_to_disk` folder, a local Hub
folder of parquet files, an imagefolder with metadata.csv): train/data/hf_datasets.py reads it
through `datasets` and puts each row through this policy and report (`accept_image`).

Repeats (`data.kohya_repeats`, off by default): a top-level subfolder named `N_name` (kohya
sd-scripts' convention, `10_mystyle/`) puts each of its images N times in every epoch; the summary
then lists each folder's images, repeats and samples, and the epoch's length (held-out validation
pictures not counted). Several datasets in one recipe (`data.datasets`, each with its own repeats or
weight, trigger, resolution, regularisation pictures): train/data/entries.py and datasets_list.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from adapterkit.train.console import bar
from adapterkit.train.data.buckets import BucketBatchSampler, Size, assign_bucket, make_buckets, plan_crop
from adapterkit.train.data.captions import (
    build_caption,
    clean_caption,
    control_characters,
    decode_caption,
    read_metadata,
)
from adapterkit.train.data.entries import DatasetEntry, check_entries
from adapterkit.train.data.split import ValidationSplit

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
    "outside_root": ("skip", "symlink to a file outside data.root"),
    "cmyk": ("fix", "CMYK converted to RGB (through its ICC profile when it has one)"),
    "16bit": ("fix", "16-bit grey scaled to 8 bits (not clipped)"),
    "alpha": ("fix", "transparent pixels composited onto data.alpha_background"),
    "exif_rotated": ("fix", "EXIF orientation applied"),
    "multi_frame": ("fix", "animated/multi-picture: first frame used"),
    "caption_encoding": ("fix", "caption not UTF-8, decoded as cp1252/latin-1: check the text"),
    "caption_control": ("fix", "control characters in the caption replaced by spaces"),
    "wrong_extension": ("note", "content format differs from the extension; decoded by content"),
    "caption_conflict": ("note", ".txt and metadata.jsonl disagree; the .txt is used"),
    "orphan_caption": ("note", "caption file with no image of the same name"),
    "shared_caption": ("note", "one caption file for several images of the same name; each gets it"),
    "bucket_fit": ("note", "the crop to its bucket loses most of the picture, or upscales it > 2x"),
    "metadata": ("note", "metadata.jsonl line ignored"),
    "unlisted": ("skip", "image file the dataset's metadata does not list (datasets leaves it out)"),
    "hidden": ("ignore", "hidden/system files and folders"),
}


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training recipe: one `root`, or several `datasets` (entries.py)."""
    root: str = ""                              # the image folder or dataset (read-only to us)
    # What root is (train/data/hf_datasets.py): auto = detected; folder = images + .txt/metadata.jsonl
    # (this module); imagefolder / saved / parquet = read through the `datasets` library.
    source: Literal["auto", "folder", "imagefolder", "saved", "parquet"] = "auto"
    image_column: str = "image"                 # a `datasets` source's picture column
    caption_column: str | None = None           # ... its caption column; None: "text", else "caption"
    split: str = "train"                        # ... the split trained on
    resolution: int = 512                       # bucket area ~ resolution**2
    bucket_step: int = 64                       # bucket sides are multiples of this
    min_bucket_side: int | None = None          # default resolution // 2
    max_bucket_side: int | None = None          # default 2 * resolution
    # None: the largest size per side length; a fraction of resolution**2: every size down to it
    # (0.9 at resolution 1024: SDXL's 41 buckets, train/data/buckets.py SDXL_MIN_AREA)
    min_bucket_area: float | None = None
    trigger: str = ""                           # prepended: "sks, a red circle"
    # ... or appended ("a red circle, sks"): the bundled tiny base's character-level text encoder
    # learned absolute positions, and a prefix moves every character of the caption (README)
    trigger_at: Literal["start", "end"] = "start"
    caption_dropout: float = 0.0                # probability of an empty caption (for CFG)
    # Tags (comma-separated caption parts) at batch time, kohya's shuffle_caption / keep_tokens /
    # caption_tag_dropout_rate (train/data/captions.py): off by default, the caption as written.
    shuffle_tags: bool = False
    keep_tokens: int = 0                        # the first N tags stay in place, never dropped
    tag_dropout: float = 0.0                    # each other tag dropped with this probability
    # kohya's repeat folders: a top-level subfolder `N_name` repeats its pictures N times per epoch
    kohya_repeats: bool = False
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
    # Held-out pictures for the validation loss (train/data/split.py): a fraction or a folder.
    validation: ValidationSplit = field(default_factory=ValidationSplit)
    # Several datasets instead of `root` (train/data/entries.py): each a folder or `datasets` source
    # with its own repeats or weight, trigger, resolution and caption settings; regularisation pictures.
    datasets: tuple[DatasetEntry, ...] = ()

    @property
    def varies_captions(self) -> bool:
        """Whether a picture's caption changes from draw to draw beyond dropout (shuffled or dropped
        tags): such captions are encoded each step, not cached."""
        if self.datasets:                  # an entry's own keys, else this section's (no parts() per step)
            return any((self.shuffle_tags if e.shuffle_tags is None else e.shuffle_tags)
                       or (self.tag_dropout if e.tag_dropout is None else e.tag_dropout) > 0
                       for e in self.datasets)
        return self.shuffle_tags or self.tag_dropout > 0

    def parts(self) -> tuple[DataConfig, ...]:
        """The settings each dataset is read and served with: (self,) for `root`; for `datasets`, per
        entry this section with the entry's root and own keys (its trigger, resolution, ...)."""
        if not self.datasets:
            return (self,)
        return tuple(dataclasses.replace(self, root=e.root, datasets=(), validation=ValidationSplit(),
                                         **e.overrides()) for e in self.datasets)

    def __post_init__(self):
        if bool(self.root) == bool(self.datasets):
            raise ValueError("give root (one folder or dataset) or datasets (a list of them), not both"
                             if self.root else "root is missing (a required key): name the image folder "
                             "(root: path/to/images), or list several under datasets")
        if self.datasets:
            check_entries(self.datasets)
            for i, entry in enumerate(self.datasets):     # each entry's settings through these checks
                try:
                    dataclasses.replace(self, root=entry.root, datasets=(), **entry.overrides())
                except ValueError as e:
                    raise ValueError(f"datasets[{i}] ({entry.root}): {e}") from None
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise ValueError(f"tag_dropout must be in [0, 1], got {self.tag_dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
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
    repeats: int = 1             # times per epoch (kohya's `N_name` folders, data.kohya_repeats)
    row: int | None = None       # a `datasets` row whose bytes hold the picture (hf_datasets.py); None: path


@dataclass
class ScanReport:
    """What the scan found: per POLICY key, the (relative path, detail) pairs."""
    root: Path
    missing_caption: str = "empty"       # the policy in force, for the summary
    source: str = "folder"               # what root is (DataConfig.source, resolved), for the summary
    image_files: int = 0                 # files with an image extension
    accepted: int = 0
    ignored: Counter = field(default_factory=Counter)   # other files, by extension
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    # top-level folder ("." for the root itself) -> [accepted images, repeats of each]
    folders: dict[str, list[int]] = field(default_factory=dict)
    held_out: int = 0                    # of the accepted images, held out for validation (holdout.py)

    @property
    def epoch_samples(self) -> int:
        """Samples per epoch: every image trained on (held-out ones are not in `folders`) times its
        folder's repeats."""
        return sum(n * repeats for n, repeats in self.folders.values())

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
        if self.source == "folder":
            lines = [f"data: {self.accepted} of {self.image_files} image files accepted under {self.root}"]
        else:
            lines = [f"data: {self.accepted} of {self.image_files} pictures accepted from the {self.source} "
                     f"dataset {self.root}"]
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
        return "\n".join(lines + self.folder_lines())

    def folder_lines(self) -> list[str]:
        """Per top-level folder: images, repeats and samples per epoch; nothing for one folder seen once."""
        if len(self.folders) < 2 and all(r == 1 for _, r in self.folders.values()):
            return []
        lines = ["  folders: images x repeats = samples per epoch"]
        lines += [f"    {name + '/' if name != '.' else './'}: {n} x {r} = {n * r}"
                  for name, (n, r) in sorted(self.folders.items())]
        images = sum(n for n, _ in self.folders.values())
        lines.append(f"  epoch: {self.epoch_samples} samples from {images} images"
                     + (f" ({self.held_out} more held out for validation, not counted)"
                        if self.held_out else ""))
        return lines

    __str__ = summary


def show_name(rel: str) -> str:
    """A file name as messages print it: as it is, or its repr when it holds a newline, a control
    character or bytes that are not UTF-8 (os.walk's surrogate escapes), so that every name in a
    report is one line that says exactly which file it is (reliability.md D16)."""
    return rel if rel.isprintable() else repr(rel)


def file_lines(found: list[tuple[str, str]], names: int) -> list[str]:
    """The first `names` (file, detail) entries of a report row, indented, and a count of the rest."""
    lines = [f"                 {show_name(rel)}" + (f": {detail}" if detail else "")
             for rel, detail in found[:names]]
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
        return _cmyk_to_rgb(im)
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


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK through the picture's own ICC profile to sRGB (reliability.md D9: CMYK numbers mean nothing
    without the press profile they were separated for); without a usable profile, Pillow's naive
    formula. Pillow's JPEG decoder has already undone Adobe's inverted CMYK (APP14)."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            logger.warning("a CMYK picture's ICC profile is unusable; Pillow's conversion used instead")
    return im.convert("RGB")


@lru_cache(maxsize=8)
def _buckets_of(resolution: int, step: int, min_side: int | None, max_side: int | None,
                min_area: float | None) -> tuple[Size, ...]:
    return tuple(make_buckets(resolution, step, min_side, max_side, min_area))


def bucket_fit(size: Size, cfg: DataConfig) -> str:
    """Why a picture of `size` fits its bucket badly ("" if it fits): the centre crop keeps less than
    half of it (an aspect far outside the buckets', e.g. 64 x 20000), or it is upscaled more than 2x
    to fill the bucket (a thumbnail trained as a blurred picture). reliability.md D7."""
    bucket = assign_bucket(size, _buckets_of(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side,
                                             cfg.max_bucket_side, cfg.min_bucket_area))
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)                               # resize to cover the bucket, then crop
    kept = (bw * bh) / (scale * scale * w * h)
    if kept < 0.5:
        return (f"{w}x{h} into bucket {bw}x{bh}: the crop keeps {kept:.0%} of the picture (aspect "
                f"{max(w, h) / min(w, h):.1f}:1, the buckets' widest {max(bw, bh) / min(bw, bh):.1f}:1)")
    if scale > 2:
        return f"{w}x{h} is upscaled {scale:.1f}x to its bucket {bw}x{bh}"
    return ""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    a = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))     # (H, W, 3)
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)                # (3, H, W)


# -- the scan -------------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def _nfc(path: Path) -> Path:
    """`path` with its name in Unicode NFC: `café.png` (NFC) and `café.txt` (NFD, as macOS writes
    it) are one name to the pairing."""
    return path.with_name(unicodedata.normalize("NFC", path.name))


def _inside(path: Path, real_root: Path) -> bool:
    """Whether `path`, its symlinks resolved, lies under the (resolved) root."""
    return Path(os.path.realpath(path)).is_relative_to(real_root)


def scan_folder(cfg: DataConfig) -> tuple[list[ImageRecord], ScanReport]:
    """Find, decode and caption every image under cfg.root by the module's policy. Read-only."""
    root = Path(os.path.normpath(os.path.abspath(cfg.root)))
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {cfg.root!r} is not a folder" +
                                ("" if root.exists() else " (it does not exist)"))
    report = ScanReport(root, cfg.missing_caption)
    images, unsupported, captions, metadata = [], [], set(), []
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):       # symlinked folders are not followed
        for d in [d for d in dirnames if _hidden(d)]:
            report.add("hidden", Path(dirpath, d).relative_to(root).as_posix() + "/")
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in filenames:
            p = Path(dirpath, name)
            ext = p.suffix.lower()
            if _hidden(name):
                report.add("hidden", p.relative_to(root).as_posix())
            elif p.is_symlink() and not _inside(p, real_root):
                report.add("outside_root", p.relative_to(root).as_posix(),
                           f"links to {show_name(os.path.realpath(p))}; copy the file into the folder")
                report.image_files += ext in IMAGE_EXTENSIONS or ext in UNSUPPORTED_EXTENSIONS
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
    repeats = {p: folder_repeats(p.relative_to(root), cfg.kohya_repeats) for p in images}
    for p in sorted(unsupported):
        report.add("unsupported", p.relative_to(root).as_posix(), f"no {p.suffix} decoder; convert to PNG")
    report.image_files += len(images) + len(unsupported)
    meta_captions: dict[Path, str] = {}
    for m in sorted(metadata):
        for target, caption in read_metadata(m, root, report, IMAGE_EXTENSIONS).items():
            meta_captions.setdefault(target, caption)
    paired = {_nfc(p.with_suffix(cfg.caption_ext)) for p in images + unsupported}
    for orphan in sorted(c for c in captions if _nfc(c) not in paired):
        report.add("orphan_caption", orphan.relative_to(root).as_posix())
    by_caption: dict[Path, list[Path]] = {}
    for p in images:
        by_caption.setdefault(_nfc(p.with_suffix(cfg.caption_ext)), []).append(p)
    for txt, sharing in sorted(by_caption.items()):
        if len(sharing) > 1 and any(_nfc(c) == txt for c in captions):      # D14: an ambiguous pairing
            names = [q.relative_to(root).as_posix() for q in sharing]
            for rel in names:
                report.add("shared_caption", rel, f"{show_name(txt.name)} also captions "
                           + ", ".join(show_name(n) for n in names if n != rel))

    records, seen = [], {}
    for path in bar(images, desc="scan", unit="img"):        # hash + decode each: the slow part
        rel = path.relative_to(root).as_posix()
        try:
            data = path.read_bytes()
        except OSError as e:
            report.add("unreadable", rel, f"{type(e).__name__}: {e.strerror or e}")
            continue
        rec = accept_image(data, rel, path, partial(_caption_for, path, rel, cfg, meta_captions, report),
                           cfg, report, seen, repeats[path])
        if rec is not None:
            records.append(rec)
    report.accepted = len(records)
    check_usable(records, report, cfg)
    return records, report


def accept_image(data: bytes, rel: str, path: Path, caption: Callable[[], str | None], cfg: DataConfig,
                 report: ScanReport, seen: dict[str, str], repeats: tuple[str, int] = (".", 1),
                 row: int | None = None) -> ImageRecord | None:
    """One picture's bytes through the policy: duplicate, decode, caption (`caption()`: None = skip);
    the record, or None with the reason in `report`. `seen` maps the accepted pictures' SHA-256 to
    their names; `repeats` is (folder, repeats) as `folder_repeats` gives them."""
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        report.add("duplicate", rel, f"same bytes as {seen[digest]}")
        return None
    try:
        image, fixes = decode_image(data, ext=path.suffix.lower(), max_pixels=cfg.max_pixels,
                                    min_side=cfg.min_side, background=cfg.alpha_background)
    except BadImage as e:
        report.add(e.reason, rel, e.detail)
        return None
    text = caption()
    if text is None:                                # missing; "skip" policy
        return None
    for fix in fixes:
        report.add(fix, rel)
    if fit := bucket_fit(image.size, cfg):
        report.add("bucket_fit", rel, fit)
    seen[digest] = rel
    folder, n = repeats
    report.folders.setdefault(folder, [0, n])[0] += 1
    return ImageRecord(path, rel, digest, image.size, text, tuple(fixes), n, row)


class RowSource(Protocol):
    """Where a `datasets` source's pictures are read back from (hf_datasets.DatasetRows)."""

    def image_bytes(self, row: int, column: str | None = None) -> bytes: ...


def folder_repeats(rel: Path, kohya: bool) -> tuple[str, int]:
    """(top-level folder, repeats) of an image at `rel` under the root: with `kohya`, a folder named
    `N_name` (kohya sd-scripts' convention, e.g. `10_mystyle`) repeats its images N times per epoch;
    any other folder, and the root itself ("."), once."""
    folder = rel.parts[0] if len(rel.parts) > 1 else "."
    match = re.fullmatch(r"(\d+)_(.+)", folder) if kohya else None
    if match is None:
        return folder, 1
    n = int(match.group(1))
    if n < 1:
        raise ValueError(f"folder {folder!r} asks for {n} repeats (data.kohya_repeats is on): name it "
                         "N_name with N >= 1, or move it out of data.root")
    return folder, n


def _caption_for(path: Path, rel: str, cfg: DataConfig, meta: dict[Path, str],
                 report: ScanReport) -> str | None:
    """The image's caption ("" when missing under the "empty" policy; None: skip it)."""
    txt = _caption_file(path.with_suffix(cfg.caption_ext))
    caption = meta.get(path)
    if txt is not None and txt.is_symlink() and not _inside(txt, Path(os.path.realpath(report.root))):
        report.add("outside_root", txt.relative_to(report.root).as_posix(),
                   f"caption links to {show_name(os.path.realpath(txt))}; not read")
    elif txt is not None:
        raw, note = decode_caption(txt.read_bytes())
        if note:
            report.add("caption_encoding", txt.relative_to(report.root).as_posix(), note)
            logger.warning("caption %s: %s", show_name(str(txt)), note)
        text = clean_caption(raw)
        if caption is not None and clean_caption(caption) != text:
            report.add("caption_conflict", rel,
                       f"{cfg.caption_ext} {text[:30]!r} vs metadata {caption[:30]!r}")
        caption = raw
    return settle_caption(caption, rel, cfg, report)


def _caption_file(txt: Path) -> Path | None:
    """The caption file `txt`, or the one whose name is `txt`'s in the other Unicode form (NFC/NFD);
    None when there is none."""
    for name in dict.fromkeys((txt.name, unicodedata.normalize("NFC", txt.name),
                               unicodedata.normalize("NFD", txt.name))):
        if txt.with_name(name).is_file():
            return txt.with_name(name)
    return None


def settle_caption(caption: str | None, rel: str, cfg: DataConfig, report: ScanReport) -> str | None:
    """A found caption (None: none) cleaned, and the missing-caption policy: "" (empty) or None (skip)."""
    if n := control_characters(caption or ""):
        report.add("caption_control", rel, f"{n} control characters (NUL, ESC, ...) replaced by spaces")
    caption = clean_caption(caption or "")
    if not caption:
        report.add("missing_caption", rel)
        if cfg.missing_caption == "skip":
            return None
    return caption


def check_usable(records: list[ImageRecord], report: ScanReport, cfg: DataConfig) -> None:
    missing = [rel for rel, _ in report.entries.get("missing_caption", [])]
    names = ", ".join(show_name(rel) for rel in missing[:20]) + (" ..." if len(missing) > 20 else "")
    if missing and cfg.missing_caption == "error":
        raise ValueError(f"{len(missing)} images under {report.root} have no caption: {names}. Write a "
                         f"same-name {cfg.caption_ext} file or a metadata.jsonl entry for each, or set "
                         "data.missing_caption=empty (train on the trigger word) or =skip.")
    if missing and cfg.missing_caption == "empty" and not cfg.trigger.strip() and cfg.caption_dropout < 1:
        # "empty" falls back to the trigger word; without one these would train on an empty caption,
        # silently (reliability.md D12). Caption dropout 1 uses no caption anyway.
        raise ValueError(f"{len(missing)} images under {report.root} have no caption and data.trigger is "
                         f"empty, so they would train on an empty caption: {names}. Write a same-name "
                         f"{cfg.caption_ext} file or a metadata.jsonl entry for each, set data.trigger (the "
                         "caption of uncaptioned images), or set data.missing_caption=skip.")
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

    Index with an int, or with the `(epoch, index)` keys `batch_sampler()` yields (`(epoch, index,
    copy)` for the extra copies of a repeated image); the key seeds that sample's crop, flip and
    caption (dropout, tags).
    """

    def __init__(self, records: list[ImageRecord], cfg: DataConfig, report: ScanReport | None = None,
                 rows: RowSource | None = None):
        self.records, self.cfg, self.report, self.rows = records, cfg, report, rows
        self.buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.min_bucket_side,
                                    cfg.max_bucket_side, cfg.min_bucket_area)
        self.bucket_of = [assign_bucket(r.size, self.buckets) for r in records]

    @classmethod
    def scan(cls, cfg: DataConfig) -> CaptionedImageFolder:
        """cfg.root as a plain folder; the jobs open any source (`datasets` too) with
        hf_datasets.open_data."""
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
        try:
            data = rec.path.read_bytes() if rec.row is None else self.rows.image_bytes(rec.row)
        except OSError as e:
            raise ValueError(f"{show_name(str(rec.path))} was removed or cannot be read since the folder "
                             f"was scanned ({e.strerror or e}); restore it, or restart to rescan") from None
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise ValueError(f"{show_name(str(rec.path))} changed since the folder was scanned; restart "
                             "to rescan it")
        image, _ = decode_image(data, max_pixels=self.cfg.max_pixels, min_side=self.cfg.min_side,
                                background=self.cfg.alpha_background)
        return image

    def describe(self, key: int | tuple[int, ...]) -> dict:
        """Sample `key` without its pixels: caption, crop and identity. What a trainer that reads
        latents from a cache needs; `__getitem__` adds the pixels with the same crop."""
        epoch, index, copy = sample_key(key)
        rec, cfg = self.records[index], self.cfg
        # stream 1: samples (0: order); a repeat's extra copies (copy >= 1) draw their own
        rng = np.random.default_rng([cfg.seed, 1, epoch, index] + ([copy] if copy else []))
        crop = plan_crop(rec.size, self.bucket_of[index], rng, random_crop=cfg.random_crop,
                         flip_prob=0.5 if cfg.flip else 0.0)
        return {
            "caption": build_caption(rec.caption, cfg.trigger, cfg.caption_dropout, rng,
                                     shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                     tag_dropout=cfg.tag_dropout, trigger_at=cfg.trigger_at),
            "sha256": rec.sha256,
            "path": str(rec.path),
            "size": rec.size,
            "crop": crop,
        }

    def __getitem__(self, key: int | tuple[int, ...]) -> dict:
        sample = self.describe(key)
        image = self.load_image(sample_key(key)[1])
        sample["pixel_values"] = to_tensor(sample["crop"].apply(image))                   # (3, bh, bw)
        return sample

    def batch_sampler(self, batch_size: int, *, shuffle: bool = True,
                      drop_last: bool = False) -> BucketBatchSampler:
        return BucketBatchSampler(self.bucket_of, batch_size, seed=self.cfg.seed, shuffle=shuffle,
                                  drop_last=drop_last, repeats=[r.repeats for r in self.records])


def sample_key(key: int | tuple[int, ...]) -> tuple[int, int, int]:
    """(epoch, record index, copy) of a dataset key: an int index (epoch 0), `(epoch, index)`, or
    `(epoch, index, copy)` for the extra copies of a repeated image (BucketBatchSampler.key)."""
    if not isinstance(key, tuple):
        return 0, key, 0
    epoch, index, *copy = key
    return epoch, index, copy[0] if copy else 0


def collate(samples: list[dict]) -> dict:
    """Stack pixel_values (one bucket per batch, so one shape); everything else becomes a list."""
    out = {k: [s[k] for s in samples] for k in samples[0]}
    out["pixel_values"] = torch.stack(out["pixel_values"])                  # (B, 3, bh, bw)
    return out

