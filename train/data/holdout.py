"""Splitting the held-out validation pictures from the training ones as `data.validation` says
(train/data/split.py: what the section means)."""
from __future__ import annotations

import dataclasses
from pathlib import Path, PurePosixPath

import numpy as np

from adapterkit.train.data.datasets_list import DatasetList
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, ImageRecord, ScanReport
from adapterkit.train.data.split import ValidationSplit


def evaluation_config(cfg: DataConfig) -> DataConfig:
    """`cfg` without its random augmentations: what validation pictures are served with."""
    return dataclasses.replace(cfg, caption_dropout=0.0, shuffle_tags=False, tag_dropout=0.0, flip=False,
                               random_crop=False, validation=ValidationSplit())


def split_validation(dataset: CaptionedImageFolder
                     ) -> tuple[CaptionedImageFolder, CaptionedImageFolder | None]:
    """(training pictures, validation pictures) as `dataset.cfg.validation` says; (dataset, None) without
    a split. Raises ValueError when the split would leave nothing to train on or validate with, or when a
    validation folder shares pictures with the training folder."""
    split = dataset.cfg.validation
    if not split.enabled:
        return dataset, None
    if isinstance(dataset, DatasetList):
        return split_datasets(dataset)
    cls, cfg = type(dataset), dataset.cfg
    if split.folder:
        held = cls.scan(dataclasses.replace(evaluation_config(cfg), root=split.folder))
        check_apart(dataset, held)
        return dataset, held
    order = sorted(range(len(dataset)), key=lambda i: dataset.records[i].rel)
    k = max(1, round(split.fraction * len(order)))
    chosen = [order[i] for i in np.random.default_rng([split.seed, 3]).permutation(len(order))[:k]]
    kept = [r for i, r in enumerate(dataset.records) if i not in set(chosen)]
    if not kept:
        raise ValueError(f"data.validation.fraction={split.fraction} holds out all {len(order)} pictures: "
                         "lower it, or give a validation folder")
    held = [dataset.records[i] for i in sorted(chosen)]
    return cls(kept, cfg, trained_report(dataset.report, kept, len(held)), dataset.rows), \
        cls(held, evaluation_config(cfg), None, dataset.rows)


def trained_report(report: ScanReport | None, kept: list[ImageRecord], held: int) -> ScanReport | None:
    """The scan report with its per-folder counts (and so the epoch's samples) of the pictures left to
    train on: held-out pictures are not part of an epoch."""
    if report is None:
        return None
    folders: dict[str, list[int]] = {}
    for rec in kept:
        parts = PurePosixPath(rec.rel).parts
        folders.setdefault(parts[0] if len(parts) > 1 else ".", [0, rec.repeats])[0] += 1
    return dataclasses.replace(report, folders=folders, held_out=held)


def split_datasets(dataset: DatasetList) -> tuple[DatasetList, DatasetList]:
    """data.validation for several datasets: a fraction holds out that share of each training entry
    (never of a regularisation one); a folder is scanned with the data: section's settings. The
    epoch's samples (repeats, weights, reg balance) are counted on the pictures left to train on."""
    cfg, split = dataset.cfg, dataset.cfg.validation
    if split.folder:
        top = evaluation_config(dataclasses.replace(cfg, root=split.folder, datasets=()))
        held = CaptionedImageFolder.scan(top)
        for part in dataset.scanned:
            check_apart(part, held)
        return dataset, held
    kept, held, counts = [], [], []
    for k, (entry, part) in enumerate(zip(cfg.datasets, dataset.scanned)):
        if entry.regularization:
            kept.append(part)
            held.append(None)
            counts.append(0)
            continue
        try:
            with_split = dataclasses.replace(part.cfg, validation=split)
            train, out = split_validation(type(part)(part.records, with_split, part.report, part.rows))
        except ValueError as e:
            raise ValueError(f"data.datasets[{k}] ({entry.root}): {e}") from None
        kept.append(type(part)(train.records, part.cfg, train.report, part.rows))
        held.append(type(part)(out.records, evaluation_config(part.cfg), None, part.rows))
        counts.append(len(out))
    return DatasetList(cfg, kept, counts), DatasetList.evaluation(cfg, held)


def check_apart(train: CaptionedImageFolder, held: CaptionedImageFolder) -> None:
    a, b = Path(train.cfg.root).resolve(), Path(held.cfg.root).resolve()
    if a.is_relative_to(b) or b.is_relative_to(a):
        raise ValueError(f"data.validation.folder {held.cfg.root} and data.root {train.cfg.root} overlap "
                         "(one holds the other): the training scan would take in validation pictures; "
                         "keep them in separate folders")
    train_sha = {r.sha256: r.rel for r in train.records}
    shared = [(r.rel, train_sha[r.sha256]) for r in held.records if r.sha256 in train_sha]
    if shared:
        pairs = ", ".join(f"{v} = {t}" for v, t in shared[:3])
        raise ValueError(f"{len(shared)} validation pictures are also training pictures ({pairs}"
                         f"{', ...' if len(shared) > 3 else ''}): remove them from one of the folders")


def describe_split(train: CaptionedImageFolder, held: CaptionedImageFolder) -> str:
    split = train.cfg.validation
    source = f"folder {Path(split.folder).name}" if split.folder else f"fraction {split.fraction:g}"
    return (f"validation: {len(held)} pictures held out ({source}), {len(train)} pictures to train on")
