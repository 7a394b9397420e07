"""The held-out validation pictures (`data.validation`): a fraction of the training folder, or a folder
of its own, never trained on. The section is here (DataConfig holds it); the split is in
train/data/holdout.py.

    data:
      validation: {fraction: 0.1}          # 10% of the pictures, chosen by data.validation.seed
      validation: {folder: path/to/val}    # another folder, scanned with the same settings

A fraction is drawn from the records ordered by their relative path (so it does not depend on the
order the filesystem lists them in); the scan keeps one file per content (a second file of the same
bytes is skipped as a duplicate), so no held-out picture is also trained on. A folder must not
overlap the training folder (neither inside the other) nor share a picture's content with it.
With several datasets (`data.datasets`) a fraction holds out that share of each training entry (never
of a regularisation one), served with its entry's trigger and resolution; a folder is scanned with the
`data:` section's settings. Validation pictures are served deterministically: no caption dropout, no
shuffled or dropped tags, no flip, no random crop, so the same picture gives the same latent and
caption at every evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationSplit:
    """`data.validation`: at most one of fraction (of the training pictures) and folder."""
    fraction: float = 0.0                 # 0: no held-out share of the training folder
    folder: str | None = None             # a folder of validation pictures (read-only to us)
    seed: int = 0                         # which pictures a fraction holds out

    def __post_init__(self):
        if self.fraction and self.folder:
            raise ValueError("give fraction or folder, not both")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")

    @property
    def enabled(self) -> bool:
        return bool(self.fraction or self.folder)

