"""Splitting the held-out validation pictures from the training ones as `data.validation` says
(train/data/split.py: what the section means)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
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
    return cls(kept, cfg, dataset.report), cls(held, evaluation_config(cfg), None)


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
