"""`data.datasets`: several datasets in one recipe, each with its own repeats or weight, trigger word,
resolution and caption settings, and regularisation (prior-preservation) pictures.

    data:
      trigger: sks                        # the default of every entry; an entry may set its own
      datasets:
        - {root: data/style, repeats: 3, trigger: "sks style"}
        - {root: data/photos, resolution: 768, shuffle_tags: true, keep_tokens: 1}
        - {root: data/class_photos, regularization: true, prior_loss_weight: 0.5, trigger: ""}

Beside (not instead of) the single `data.root` form: a recipe names `data.root` or `data.datasets`,
never both. An entry's `root` is a folder or a `datasets` source exactly as `data.root` may be
(`source`, `image_column`, `caption_column`, `split`). The keys an entry leaves out are the `data:`
section's (`ENTRY_KEYS`); the rest of the section (buckets' step and sides, alpha background, flip,
size limits, seed, cache) is shared by every entry.

How many times an entry's pictures are seen per epoch (train/data/datasets_list.py does it):
- `repeats: N` (kohya sd-scripts' `num_repeats`): each picture N times per epoch (times its
  `N_name` folder's repeats with `kohya_repeats`). Default 1.
- `weight: w` (SimpleTuner's `probability`, OneTrainer's sample balancing): the entry's share of the
  epoch's training samples is w / (sum of the weights). Give every training entry a weight or none.
- `regularization: true` (kohya's `is_reg`): prior-preservation pictures. As kohya does, they fill as
  many samples per epoch as the training entries together (the pictures cycled when fewer, a seeded
  fixed subset used when more: the rest are reported unused); they take no repeats or weight. Each
  reg sample's loss is multiplied by the entry's `prior_loss_weight` (default 1.0, kohya's
  `--prior_loss_weight`); reg pictures are never held out for validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The data: keys an entry may set for itself (None: the data: section's value).
ENTRY_KEYS = ("source", "image_column", "caption_column", "split", "resolution", "trigger", "caption_dropout",
              "shuffle_tags", "keep_tokens", "tag_dropout", "kohya_repeats", "caption_ext", "missing_caption")


@dataclass(frozen=True)
class DatasetEntry:
    """One item of `data.datasets` (module docstring)."""
    root: str                                   # a folder or a `datasets` source (read-only to us)
    name: str | None = None                     # in the data report and the files; None: root's name
    repeats: int | None = None                  # each picture N times per epoch (default 1)
    weight: float | None = None                 # or: the entry's share of the epoch, w / sum of weights
    regularization: bool = False                # prior-preservation pictures (kohya's is_reg)
    prior_loss_weight: float | None = None      # reg only: their samples' loss factor (default 1.0)
    # the data: section's keys, per entry (None: the section's)
    source: Literal["auto", "folder", "imagefolder", "saved", "parquet"] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    split: str | None = None
    resolution: int | None = None
    trigger: str | None = None
    caption_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tokens: int | None = None
    tag_dropout: float | None = None
    kohya_repeats: bool | None = None
    caption_ext: str | None = None
    missing_caption: Literal["empty", "skip", "error"] | None = None

    def __post_init__(self):
        if not self.root:
            raise ValueError("root must name the entry's folder or dataset")
        if self.repeats is not None and self.weight is not None:
            raise ValueError(f"give repeats ({self.repeats}) or weight ({self.weight:g}), not both: repeats "
                             "counts each picture per epoch, weight is the entry's share of the epoch")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight:g} (leave the entry out to not train "
                             "on it)")
        if self.regularization and (self.repeats is not None or self.weight is not None):
            raise ValueError("a regularization entry takes no repeats or weight: its pictures fill as many "
                             "samples per epoch as the training entries together (kohya's balance); remove "
                             "repeats/weight, or set regularization: false")
        if self.prior_loss_weight is not None:
            if not self.regularization:
                raise ValueError("prior_loss_weight applies to regularization pictures: set "
                                 "regularization: true, or remove prior_loss_weight")
            if self.prior_loss_weight < 0:
                raise ValueError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight:g}")

    @property
    def loss_weight(self) -> float:
        """The factor of this entry's samples' loss: prior_loss_weight for reg pictures, else 1."""
        if not self.regularization:
            return 1.0
        return 1.0 if self.prior_loss_weight is None else self.prior_loss_weight

    def overrides(self) -> dict:
        """The data: keys this entry sets for itself."""
        return {k: getattr(self, k) for k in ENTRY_KEYS if getattr(self, k) is not None}


def check_entries(entries: tuple[DatasetEntry, ...]) -> None:
    """What holds between the entries of data.datasets: some training pictures, weights all or none."""
    train = [e for e in entries if not e.regularization]
    if not train:
        raise ValueError("data.datasets has only regularization entries: add one with the pictures to "
                         "train on")
    weighted = [i for i, e in enumerate(entries) if e.weight is not None]
    if weighted and len(weighted) != len(train):
        plain = [i for i, e in enumerate(entries) if not e.regularization and e.weight is None]
        raise ValueError(f"datasets {weighted} have a weight and datasets {plain} none: give every training "
                         "entry a weight (their shares of the epoch) or none (repeats)")
    names = [entry_name(e) for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two datasets are named {twice[0]!r}: give them distinct `name`s (the data report "
                         "and the files' ss_dataset_dirs tell them apart by it)")


def entry_name(entry: DatasetEntry) -> str:
    return entry.name or Path(entry.root).name or entry.root
