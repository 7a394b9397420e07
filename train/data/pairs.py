"""ControlNet training pairs: every training image with its hint, cropped like the image.

With a conditioning folder (`HintSource.folder`) every training image gets the conditioning image of
the same relative path (`sub/cat.jpg` <- `<folder>/sub/cat.png`, any image extension), else of the
same name anywhere in the folder; without one the hint is the Canny map of the training image computed
AFTER its bucket crop, so the thresholds act at training resolution (canny.py says why that matters).
Either way the hint goes through the target's own `Crop` (same box, same flip: buckets.py), and is RGB
in [0, 1] at pixel resolution (3, H, W). Images without a usable conditioning image are skipped and
reported (`PAIR_POLICY`); no pair at all is an error. Nothing in either folder is modified.

A `datasets` source (train/data/hf_datasets.py) pairs by row instead: `HintSource.column` names the
column of each row's conditioning image (`control.column`, e.g. "conditioning_image" as diffusers'
ControlNet example datasets name it), checked by the same rules.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from adapterkit.adapters.controlnet import HintSpec
from adapterkit.train.data.buckets import RESAMPLE, Crop, plan_crop
from adapterkit.train.data.canny import SETTINGS_KEY, edge_map_tensor
from adapterkit.train.data.folder import (
    IMAGE_EXTENSIONS,
    SYSTEM_NAMES,
    BadImage,
    CaptionedImageFolder,
    DataConfig,
    ImageRecord,
    RowSource,
    ScanReport,
    decode_image,
    file_lines,
    to_tensor,
)
from adapterkit.train.data.hf_datasets import column, scan_data
from adapterkit.train.images import unit_tensor

HINT_BACKGROUND = (0, 0, 0)         # transparent pixels of a conditioning image: "no edge", not white


@dataclass(frozen=True)
class HintSource:
    """Where hints come from: a conditioning folder, or Canny maps at these thresholds (folder None).
    `kind` is what the hints show (a ControlNet file's modelspec.preprocessor); `cache_mb` bounds the
    hints kept in memory per (image, crop), as uint8; 0 = none."""
    folder: str | None = None
    kind: str = "canny"
    canny_low: int = 100
    canny_high: int = 200
    cache_mb: int = 1024
    column: str | None = None           # a `datasets` source's conditioning-image column (instead of folder)


# Report keys -> (action, what). Each image skipped here is named in the summary the trainer prints.
PAIR_POLICY: dict[str, tuple[str, str]] = {
    "missing": ("skip", "no conditioning image of the same path or name"),
    "ambiguous": ("skip", "several conditioning images fit (same name, other extension or folder)"),
    "bad_conditioning": ("skip", "conditioning image unreadable, damaged or too large"),
    "aspect_mismatch": ("skip", "conditioning image of another aspect ratio: no crop fits both"),
    "resized": ("fix", "conditioning image of another size: resized to its image's before the crop"),
    "blank": ("note", "hint without a single edge (an all-black map): it teaches nothing"),
    "orphan": ("note", "conditioning image that no training image uses"),
}


@dataclass(frozen=True)
class ConditioningImage:
    """The conditioning image of one training image; `settings` is the Canny settings JSON that
    `adapterkit canny` writes into its PNGs, if present."""
    path: Path
    rel: str
    sha256: str
    size: tuple[int, int]
    settings: str | None = None
    row: int | None = None               # the `datasets` row holding it (HintSource.column); None: path


@dataclass
class PairReport:
    """How training images found their hints: per PAIR_POLICY key, (image or file, detail) pairs."""
    folder: Path | None                  # None: Canny maps of the images themselves
    canny: tuple[int, int]
    images: int = 0                      # images the data scan accepted
    paired: int = 0
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, key: str, rel: str, detail: str = "") -> None:
        self.entries.setdefault(key, []).append((rel, detail))

    def summary(self, names: int = 5) -> str:
        if self.folder is None:
            head = (f"hints: Canny maps (low={self.canny[0]}, high={self.canny[1]}) of all {self.paired} "
                    "images, computed after each image's crop")
        else:
            head = (f"hints: {self.paired} of {self.images} images paired with a conditioning image in "
                    f"{self.folder}")
        lines = [head]
        for key, (action, what) in PAIR_POLICY.items():
            if self.entries.get(key):
                lines.append(f"  {action:6} {len(self.entries[key]):5}  {key}: {what}")
                lines += file_lines(self.entries[key], names)
        return "\n".join(lines)

    __str__ = summary


class PairedFolder(CaptionedImageFolder):
    """A captioned image folder whose samples also carry their hint (`hint`), cropped like the target.

    `conditions` is None for automatic Canny maps, else one `ConditioningImage` per record.
    """

    def __init__(self, records: list[ImageRecord], cfg: DataConfig, hints: HintSource,
                 conditions: list[ConditioningImage] | None, report: ScanReport | None = None,
                 pairs: PairReport | None = None, rows: RowSource | None = None):
        super().__init__(records, cfg, report, rows)
        self.source, self.conditions = hints, conditions
        # (index, crop) -> the hint as uint8 (3, h, w): exact (hints are k/255), 4x smaller than float.
        self._hints: dict[tuple[int, Crop], Tensor] = {}
        self._hint_room = hints.cache_mb * 2**20
        self.pairs = pairs or PairReport(None, (hints.canny_low, hints.canny_high), len(records),
                                         len(records))

    @classmethod
    def scan(cls, data: DataConfig, hints: HintSource, cache_dir: str | os.PathLike | None = None
             ) -> PairedFolder:
        records, report, rows = scan_data(data, cache_dir)
        if hints.column is not None:
            if rows is None:
                raise ValueError(f"control.column {hints.column!r} is a column of a `datasets` dataset, but "
                                 f"data.root {data.root!r} is a plain folder: pair it with control.folder "
                                 "instead, or point data.root at the dataset")
            records, conditions, pairs = pair_column(records, rows, data, hints)
            return cls(records, data, hints, conditions, report, pairs, rows)
        if hints.folder is None:
            dataset = cls(records, data, hints, None, report, rows=rows)
            for i, rec in enumerate(records):     # one decode + Canny per image, for the blank check
                if not dataset.hint(i, plan_crop(rec.size, dataset.bucket_of[i])).any():
                    dataset.pairs.add("blank", rec.rel, "no edges at these thresholds")
            return dataset
        records, conditions, pairs = pair_folder(records, report.root, data, hints)
        return cls(records, data, hints, conditions, report, pairs, rows)

    @property
    def hint_spec(self) -> HintSpec:
        """The preprocessing contract the ControlNet file records. Canny thresholds: this run's for
        automatic maps; for a folder, those its PNGs carry (`adapterkit canny`) when all agree."""
        c = self.source
        if self.conditions is None:
            return HintSpec("canny", "like-target", c.canny_low, c.canny_high)
        found = {cond.settings for cond in self.conditions}
        if c.kind == "canny" and len(found) == 1 and None not in found:
            s = json.loads(found.pop())
            if not s.get("blur") and float(s["low"]).is_integer() and float(s["high"]).is_integer():
                return HintSpec("canny", "like-target", int(s["low"]), int(s["high"]))   # fractions: none
        return HintSpec(c.kind, "like-target")

    def summary(self) -> str:
        return f"{super().summary()}\n{self.pairs.summary()}"

    def load_conditioning(self, index: int) -> Image.Image:
        """Record `index`'s conditioning image, re-checked against its scan-time hash, at the size of
        the training image (same aspect ratio, checked at scan time)."""
        cond = self.conditions[index]
        data = (cond.path.read_bytes() if cond.row is None
                else self.rows.image_bytes(cond.row, self.source.column))
        if _sha256(data) != cond.sha256:
            raise ValueError(f"{cond.path} changed since the folder was scanned; restart to rescan it")
        image, _ = decode_image(data, max_pixels=self.cfg.max_pixels, background=HINT_BACKGROUND)
        size = self.records[index].size
        return image if image.size == size else image.resize(size, RESAMPLE)

    def hint(self, key: int | tuple[int, ...], crop: Crop | None = None) -> Tensor:
        """The hint of sample `key` (3, bh, bw), float in [0, 1], through `crop` (default: the
        sample's own, from `describe`)."""
        index = key[1] if isinstance(key, tuple) else key
        crop = crop or self.describe(key)["crop"]
        return self._hint(index, crop, lambda: crop.apply(self.load_image(index)))

    def _hint(self, index: int, crop: Crop, target: Callable[[], Image.Image]) -> Tensor:
        """The hint of record `index` through `crop`, from the cache or made and cached; `target`
        gives the cropped training image (read only for automatic Canny maps)."""
        cached = self._hints.get((index, crop))
        if cached is not None:                   # decoding + Canny every step starves a fast GPU
            return cached.float().div_(255.0)
        if self.conditions is None:
            hint = edge_map_tensor(target(), self.source.canny_low, self.source.canny_high)
        else:
            hint = unit_tensor(crop.apply(self.load_conditioning(index)))
        if hint.numel() <= self._hint_room:
            self._hints[(index, crop)] = hint.mul(255.0).round_().to(torch.uint8)
            self._hint_room -= hint.numel()
        return hint

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        sample = self.describe(key)
        index = key[1] if isinstance(key, tuple) else key
        target = sample["crop"].apply(self.load_image(index))
        sample["pixel_values"] = to_tensor(target)                                  # (3, bh, bw) [-1, 1]
        sample["hint"] = self._hint(index, sample["crop"], lambda: target)          # [0, 1]
        return sample


def pair_folder(records: list[ImageRecord], root: Path, data: DataConfig, hints: HintSource
                ) -> tuple[list[ImageRecord], list[ConditioningImage], PairReport]:
    """Match each record to its conditioning image by relative path, else by name; decode and check
    each match. Returns the paired records, their conditioning and the report. Read-only."""
    folder = Path(os.path.normpath(os.path.abspath(hints.folder)))
    _check_folders(folder, Path(root), hints.folder, data.root)
    files = _image_files(folder)
    by_path: dict[str, list[Path]] = {}
    by_name: dict[str, list[Path]] = {}
    for p in files:
        rel = PurePosixPath(p.relative_to(folder).as_posix())
        by_path.setdefault(str(rel.with_suffix("")), []).append(p)
        by_name.setdefault(rel.stem, []).append(p)
    report = PairReport(folder, (hints.canny_low, hints.canny_high), len(records))
    kept, conditions, used = [], [], set()
    for rec in records:
        rel = PurePosixPath(rec.rel)
        found = by_path.get(str(rel.with_suffix(""))) or by_name.get(rel.stem, [])
        used.update(found)
        crels = [p.relative_to(folder).as_posix() for p in found]
        if not found:
            report.add("missing", rec.rel, f"looked for {rel.with_suffix('.*')} and {rel.stem}.* in {folder}")
            continue
        if len(found) > 1:
            report.add("ambiguous", rec.rel, ", ".join(crels))
            continue
        try:
            raw = found[0].read_bytes()
        except OSError as e:
            report.add("bad_conditioning", rec.rel, f"{crels[0]}: {type(e).__name__}: {e.strerror or e}")
            continue
        cond = _conditioning(raw, found[0], crels[0], rec, data, report)
        if cond is not None:
            kept.append(rec)
            conditions.append(cond)
    for p in files:
        if p not in used:
            report.add("orphan", p.relative_to(folder).as_posix())
    report.paired = len(kept)
    if not kept:
        raise ValueError(f"none of the {len(records)} training images has a usable conditioning image in "
                         f"{folder}. Name each like its image (same relative path or file name, any image "
                         "extension), or leave control.folder empty to train on Canny maps of the images.\n"
                         f"{report.summary()}")
    return kept, conditions, report


def pair_column(records: list[ImageRecord], rows: RowSource, data: DataConfig, hints: HintSource
                ) -> tuple[list[ImageRecord], list[ConditioningImage], PairReport]:
    """Each record's conditioning image from column `hints.column` of its own `datasets` row, checked
    as pair_folder checks a file. Read-only."""
    column(rows.ds, hints.column, "conditioning image", "control.column", where=repr(data.root))
    report = PairReport(Path(data.root), (hints.canny_low, hints.canny_high), len(records))
    kept, conditions = [], []
    for rec in records:
        crel = f"{hints.column}[{rec.row}]"
        try:
            raw = rows.image_bytes(rec.row, hints.column)
        except (OSError, ValueError) as e:
            report.add("missing" if isinstance(e, ValueError) else "bad_conditioning", rec.rel,
                       f"{crel}: {type(e).__name__}: {e}")
            continue
        cond = _conditioning(raw, Path(data.root), crel, rec, data, report, row=rec.row)
        if cond is not None:
            kept.append(rec)
            conditions.append(cond)
    report.paired = len(kept)
    if not kept:
        raise ValueError(f"none of the {len(records)} training rows has a usable conditioning image in "
                         f"column {hints.column!r}.\n{report.summary()}")
    return kept, conditions, report


def _check_folders(folder: Path, root: Path, given: str, data_root: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"control.folder {given!r} is not a folder"
                                + ("" if folder.exists() else " (it does not exist)"))
    real, data = Path(os.path.realpath(folder)), Path(os.path.realpath(root))
    if real == data or real.is_relative_to(data) or data.is_relative_to(real):
        raise ValueError(f"control.folder {given!r} and data.root {data_root!r} overlap, so conditioning "
                         "images would be trained on as targets (or targets paired with themselves). Keep "
                         "them in two separate folders, e.g. images/ and images_canny/ side by side.")


def _image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (subfolders too), hidden and system files left out, in path order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in SYSTEM_NAMES)
        out += [Path(dirpath, n) for n in filenames
                if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _conditioning(raw: bytes, path: Path, crel: str, rec: ImageRecord, data: DataConfig,
                  report: PairReport, row: int | None = None) -> ConditioningImage | None:
    """Decode `raw`, the bytes of `path` (or of `row`'s cell), by the training data's bad-image policy
    (transparent = black) and check it against its image `rec`; None (reported) when it cannot serve."""
    try:
        image, _ = decode_image(raw, ext=path.suffix.lower(), max_pixels=data.max_pixels,
                                background=HINT_BACKGROUND)
    except BadImage as e:
        report.add("bad_conditioning", rec.rel, f"{crel}: {e.reason}: {e.detail}")
        return None
    (w, h), (cw, ch) = rec.size, image.size
    if abs(cw * h - ch * w) > max(w, h):          # train.buckets.transform_pair's rule
        report.add("aspect_mismatch", rec.rel, f"{crel} is {cw}x{ch}, the image {w}x{h}")
        return None
    if image.size != rec.size:
        report.add("resized", rec.rel, f"{crel}: {cw}x{ch} -> {w}x{h}")
    if not np.asarray(image).any():
        report.add("blank", rec.rel, crel)
    settings = None
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        settings = Image.open(io.BytesIO(raw), formats=["PNG"]).info.get(SETTINGS_KEY)
    return ConditioningImage(path, crel, _sha256(raw), image.size, settings, row)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

