"""Several datasets served as one (`data.datasets`, train/data/entries.py says what the keys mean).

    dataset = open_data(cfg.data, cache_dir)          # root: hf_datasets.open_data; datasets: a DatasetList
    dataset.summary()                                 # per dataset: pictures, repeats/weight, reg, samples

Each entry is scanned on its own (folder.py's policy, or a `datasets` source through hf_datasets.py)
with its own settings (`DataConfig.parts`), into a CaptionedImageFolder; a DatasetList puts them
behind the interface the jobs use (records, buckets, `describe`, `batch_sampler`, `load_image`), so
the latent cache, the batch plan and the validation loss need nothing new. Its records are the
entries' in entry order; a sample's crop, flip and caption come from its own entry's settings (its
trigger, tags, resolution), drawn from (entry seed, epoch, index in the entry, copy); `describe` adds
the sample's `loss_weight` (`prior_loss_weight` for regularisation pictures, else 1).

Samples per epoch, fixed for the run (so an epoch's batches stay a pure function of (seed, epoch)
and resume stays exact), computed once from the pictures left after the validation split:
- repeats: each picture `repeats` x its `N_name` folder's repeats (kohya_repeats);
- weights: the epoch is sized so the smallest share still shows each of its pictures once:
  N = ceil(max over entries of pictures_k / share_k) and entry k gets round(share_k * N) samples;
- regularisation: as many samples as the training entries' together (kohya's DreamBooth balance).
An entry's samples are spread evenly over its pictures (each folder-repeat copy counting as one):
every picture gets floor(samples / pictures), and the remainder goes to a seeded fixed subset. A
deviation, stated: that subset stays the same in every epoch (kohya keeps its remainder fixed as well,
by file order); a subset drawn anew per epoch would change how many samples each bucket holds.
Regularisation pictures that get no sample (more of them than training samples) are left out of
the run (not cached) and counted as unused in the report, as kohya warns and leaves them.

Pictures must not be shared between entries (the same bytes in two entries, or one root inside
another): a held-out picture could then be trained on, a reg picture double as a training one.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from adapterkit.train.data.buckets import BucketBatchSampler
from adapterkit.train.data.entries import DatasetEntry, entry_name
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, sample_key
from adapterkit.train.data.hf_datasets import open_data as open_one
from adapterkit.train.data.hf_datasets import scan_data


class DatasetList(torch.utils.data.Dataset):
    """The entries of data.datasets as one dataset (module docstring). `scanned`: each entry's
    pictures (after any validation split); only those with a sample per epoch become `records`."""

    def __init__(self, cfg: DataConfig, scanned: list[CaptionedImageFolder],
                 held_out: list[int] | None = None):
        if len(scanned) != len(cfg.datasets):
            raise ValueError(f"{len(scanned)} scanned datasets for {len(cfg.datasets)} entries")
        self.cfg, self.entries, self.scanned = cfg, cfg.datasets, scanned
        self.held_out = held_out or [0] * len(scanned)
        self.report = None                          # each entry has its own (summary() shows them)
        counts = epoch_counts(self.entries, [[r.repeats for r in part.records] for part in scanned], cfg.seed)
        self.parts, self.counts = [], []            # the used pictures of each entry, their samples
        for part, n in zip(scanned, counts):
            used = [j for j, c in enumerate(n) if c > 0]
            self.parts.append(CaptionedImageFolder([part.records[j] for j in used], part.cfg, part.report,
                                                   part.rows))
            self.counts.append([n[j] for j in used])
        self.index = [(k, j) for k, part in enumerate(self.parts) for j in range(len(part))]
        self.records = [self.parts[k].records[j] for k, j in self.index]
        self.bucket_of = [self.parts[k].bucket_of[j] for k, j in self.index]
        self.buckets = tuple(sorted({b for part in self.parts for b in part.buckets}))
        self.rows = None

    @classmethod
    def evaluation(cls, cfg: DataConfig, parts: list[CaptionedImageFolder | None]) -> DatasetList:
        """Held-out pictures of several entries (None: an entry without any), each served once."""
        entries = [dataclasses.replace(e, repeats=None, weight=None, regularization=False,
                                       prior_loss_weight=None) for e in cfg.datasets]
        keep = [k for k, p in enumerate(parts) if p is not None and len(p)]
        return cls(dataclasses.replace(cfg, datasets=tuple(entries[k] for k in keep)),
                   [parts[k] for k in keep])

    # -- the dataset interface of CaptionedImageFolder ---------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, key: int | tuple[int, ...]) -> dict:
        epoch, index, copy = sample_key(key)
        k, j = self.index[index]
        sample = self.parts[k].describe((epoch, j, copy) if copy else (epoch, j))
        return sample | {"dataset": k, "loss_weight": self.entries[k].loss_weight}

    def __getitem__(self, key: int | tuple[int, ...]) -> dict:
        epoch, index, copy = sample_key(key)
        k, j = self.index[index]
        sample = self.parts[k][(epoch, j, copy) if copy else (epoch, j)]
        return sample | {"dataset": k, "loss_weight": self.entries[k].loss_weight}

    def load_image(self, index: int):
        k, j = self.index[index]
        return self.parts[k].load_image(j)

    def batch_sampler(self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False
                      ) -> BucketBatchSampler:
        return BucketBatchSampler(self.bucket_of, batch_size, seed=self.cfg.seed, shuffle=shuffle,
                                  drop_last=drop_last, repeats=[c for n in self.counts for c in n])

    # -- what the report and the files say ------------------------------------------------------

    @property
    def train_samples(self) -> int:
        return sum(sum(n) for n, e in zip(self.counts, self.entries) if not e.regularization)

    @property
    def reg_samples(self) -> int:
        return sum(sum(n) for n, e in zip(self.counts, self.entries) if e.regularization)

    def epoch_samples(self) -> int:
        return self.train_samples + self.reg_samples

    def rows_of(self) -> list[dict]:
        """Per entry: name, pictures used/unused, held out, repeats or share, reg, samples per epoch."""
        weights = [e.weight for e in self.entries if e.weight is not None]
        rows = []
        for k, (e, part, n) in enumerate(zip(self.entries, self.parts, self.counts)):
            rows.append({"name": entry_name(e), "pictures": len(part),
                         "unused": len(self.scanned[k]) - len(part), "held_out": self.held_out[k],
                         "repeats": e.repeats or 1, "weight": e.weight,
                         "share": e.weight / sum(weights) if e.weight is not None else None,
                         "regularization": e.regularization, "loss_weight": e.loss_weight, "samples": sum(n)})
        return rows

    def kohya_dirs(self, regularization: bool) -> dict[str, dict[str, int]]:
        """ss_dataset_dirs / ss_reg_dataset_dirs: {name: {"n_repeats", "img_count"}}, n_repeats being
        the samples per picture (rounded) where an entry's pictures are seen unevenly."""
        return {r["name"]: {"n_repeats": max(1, round(r["samples"] / max(r["pictures"], 1))),
                            "img_count": r["pictures"]}
                for r in self.rows_of() if r["regularization"] == regularization}

    def summary(self) -> str:
        lines = []
        for e, part in zip(self.entries, self.scanned):
            lines.append(f"[{entry_name(e)}] " + (part.report.summary() if part.report else
                                                   f"{len(part)} pictures"))
        lines.append("datasets: pictures x repeats (or share) = samples per epoch")
        for r in self.rows_of():
            how = (f"share {r['share']:.3g} (weight {r['weight']:g})" if r["share"] is not None else
                   "reg, balanced to the training samples" if r["regularization"] else f"x {r['repeats']}")
            notes = [f"loss x {r['loss_weight']:g}"] if r["regularization"] else []
            if r["unused"]:
                notes.append(f"{r['unused']} more reg pictures than samples: unused")
            if r["held_out"]:
                notes.append(f"{r['held_out']} held out for validation, not counted")
            lines.append(f"  {r['name']}: {r['pictures']} {how} = {r['samples']}"
                         + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"  epoch: {self.epoch_samples()} samples ({self.train_samples} training"
                     + (f", {self.reg_samples} regularisation" if self.reg_samples else "") + ")")
        per_bucket: dict = {}
        for b in self.bucket_of:
            per_bucket[b] = per_bucket.get(b, 0) + 1
        lines.append("buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(per_bucket.items())))
        return "\n".join(lines)


# -- samples per epoch --------------------------------------------------------------------------------

def spread(total: int, units: int, rng: np.random.Generator) -> list[int]:
    """`total` samples over `units` pictures as evenly as can be: floor(total / units) each and one
    more for a seeded subset of total % units of them."""
    base, extra = divmod(total, units)
    counts = [base] * units
    for u in rng.permutation(units)[:extra]:
        counts[u] += 1
    return counts


def epoch_counts(entries: tuple[DatasetEntry, ...], repeats: list[list[int]], seed: int) -> list[list[int]]:
    """Samples per epoch of each picture of each entry (module docstring); `repeats[k][j]` is picture
    j's folder repeats (1 without kohya_repeats)."""
    def units_to_pictures(k: int, total: int) -> list[int]:
        owner = [j for j, r in enumerate(repeats[k]) for _ in range(r)]     # a folder-repeat copy = a unit
        if not owner:
            return []
        counts = [0] * len(repeats[k])
        for j, c in zip(owner, spread(total, len(owner), np.random.default_rng([seed, 6, k]))):
            counts[j] += c
        return counts

    out: list[list[int]] = [[] for _ in entries]
    train = [k for k, e in enumerate(entries) if not e.regularization]
    weights = [entries[k].weight for k in train]
    if all(w is not None for w in weights):
        units = {k: sum(repeats[k]) for k in train}
        shares = {k: entries[k].weight / sum(weights) for k in train}
        n = (math.ceil(max(units[k] / shares[k] for k in train if units[k]) - 1e-9)     # 1e-9: 10 / 0.1
             if any(units.values()) else 0)
        for k in train:
            out[k] = units_to_pictures(k, round(shares[k] * n) if units[k] else 0)
    else:
        for k in train:
            out[k] = [(entries[k].repeats or 1) * r for r in repeats[k]]
    total = sum(sum(out[k]) for k in train)
    reg = [k for k, e in enumerate(entries) if e.regularization]
    owner = [(k, j) for k in reg for j, r in enumerate(repeats[k]) for _ in range(r)]
    for k in reg:
        out[k] = [0] * len(repeats[k])
    if owner:
        rng = np.random.default_rng([seed, 6, len(entries)])
        for (k, j), c in zip(owner, spread(total, len(owner), rng)):
            out[k][j] += c
    return out


# -- opening ------------------------------------------------------------------------------------------

def open_data(cfg: DataConfig, cache_dir: str | os.PathLike | None = None
              ) -> CaptionedImageFolder | DatasetList:
    """The training pictures of a data: section: its root (hf_datasets.open_data), or its datasets."""
    return open_datasets(cfg, cache_dir) if cfg.datasets else open_one(cfg, cache_dir)


def open_datasets(cfg: DataConfig, cache_dir: str | os.PathLike | None = None) -> DatasetList:
    """Scan every entry of cfg.datasets with its own settings and put them together; ValueError when
    entries overlap (a root inside another's, or the same picture in two)."""
    roots = [Path(os.path.abspath(e.root)) for e in cfg.datasets]
    for a in range(len(roots)):
        for b in range(a + 1, len(roots)):
            if roots[a].is_relative_to(roots[b]) or roots[b].is_relative_to(roots[a]):
                raise ValueError(f"data.datasets[{a}] ({cfg.datasets[a].root}) and [{b}] "
                                 f"({cfg.datasets[b].root}) overlap (one holds the other): their pictures "
                                 "would be read twice; give each dataset its own folder")
    parts, seen = [], {}
    for k, part_cfg in enumerate(cfg.parts()):
        part_cfg = dataclasses.replace(part_cfg, seed=entry_seed(cfg.seed, k))
        try:
            records, report, rows = scan_data(part_cfg, cache_dir)
        except ValueError as e:
            raise ValueError(f"data.datasets[{k}] ({part_cfg.root}): {e}") from None
        for rec in records:
            if rec.sha256 in seen:
                other, rel = seen[rec.sha256]
                raise ValueError(f"the same picture is in data.datasets[{other}] ({rel}) and "
                                 f"data.datasets[{k}] ({rec.rel}): remove one copy (a picture in two "
                                 "datasets would be trained as both, or validated on while trained on)")
            seen[rec.sha256] = (k, rec.rel)
        parts.append(CaptionedImageFolder(records, part_cfg, report, rows))
    return DatasetList(cfg, parts)


def entry_seed(seed: int, k: int) -> int:
    """Entry k's own seed for its samples' draws (crop, flip, caption), so that the entries' first
    pictures do not flip and shuffle in step."""
    return int(np.random.SeedSequence([seed, 5, k]).generate_state(1)[0])
