"""Aspect-ratio buckets, the crop geometry that goes with them, and a bucketed batch sampler.

Real photos are not square. Center-cropping them all to 512x512 cuts heads and feet off portraits,
so, like NovelAI's aspect-ratio bucketing (and kohya's `BucketManager`), we train on a handful of
sizes of (roughly) equal area, each image going to the bucket nearest its aspect ratio, and every
batch drawn from one bucket so it stacks into one tensor.

- `make_buckets`: for every width on the step grid, the tallest height that keeps
  `width * height <= resolution**2`, within [min_side, max_side]; or, with `min_area`, every grid size
  whose area lies in [min_area, 1] x resolution**2. SDXL's list (Podell et al. 2023, "SDXL", §2.3 and
  App. I: "pixel count as close to 1024^2 as possible", sides multiples of 64, 512 to 2048) is exactly
  `make_buckets(1024, 64, min_area=SDXL_MIN_AREA)`: 41 sizes from 512x2048 to 2048x512.
- `size_conditioning`: SDXL's micro-conditioning of a training picture (§2.2): its original size, the
  top-left of its crop in the resized picture, and the bucket it is trained at.
- `assign_bucket`: nearest aspect ratio, measured as |log(w/h) - log(bw/bh)| so 2:1 and 1:2 are
  equally far from 1:1.
- `plan_crop` -> `Crop`: resize-to-cover then crop (center, or seeded random), expressed as ONE
  source-pixel box that Pillow's `resize(..., box=...)` resamples straight into the bucket size. A
  conditioning image of the same size goes through the very same box and flip (`transform_pair`),
  so ControlNet targets and hints stay pixel-aligned (the drift kohya-ss/sd-scripts#2368 fixed).
- `BucketBatchSampler`: the batches of an epoch are a pure function of (seed, epoch), so resuming
  at (epoch, step) yields exactly the batches an uninterrupted run would have produced next.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height), Pillow's order

RESAMPLE = Image.Resampling.LANCZOS  # one filter for targets and hints: alike geometry, alike blur

# SDXL's buckets are the 64-grid sizes of 90% to 100% of 1024^2 pixels: the smallest of its list,
# 704x1344, has 0.902 of it, the largest left out, 640x1472, 0.898 (SDXL paper, App. I).
SDXL_MIN_AREA = 0.9


def make_buckets(resolution: int = 512, step: int = 64, min_side: int | None = None,
                 max_side: int | None = None, min_area: float | None = None) -> tuple[Size, ...]:
    """Bucket sizes (w, h), multiples of `step`, area <= resolution**2, sorted by aspect ratio.

    Defaults: min_side = resolution // 2, max_side = 2 * resolution (kohya's 256..1024 at 512),
    i.e. aspect ratios from 1:4 to 4:1. min_area None: only the largest size of each side length;
    a fraction: every size of at least that fraction of resolution**2 (SDXL_MIN_AREA: SDXL's list).
    """
    min_side = resolution // 2 if min_side is None else min_side
    max_side = 2 * resolution if max_side is None else max_side
    if resolution % step or resolution <= 0 or step <= 0:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the bucket step {step}")
    lo = max(step, -(-min_side // step) * step)      # round min_side up to the grid
    hi = min(max_side // step * step, resolution * resolution // lo // step * step)
    if lo > resolution or hi < resolution:
        raise ValueError(f"bucket sides [{min_side}, {max_side}] must include the resolution {resolution}")
    area = resolution * resolution

    def grows(a: int, b: int) -> bool:   # could side `a` take one more step next to `b`?
        return a + step <= hi and (a + step) * b <= area

    if min_area is not None:
        if not 0 < min_area <= 1:
            raise ValueError(f"min_area is a fraction of resolution**2 in (0, 1], got {min_area}")
        sides = range(lo, hi + 1, step)
        buckets = {(w, h) for w in sides for h in sides if min_area * area <= w * h <= area}
        return tuple(sorted(buckets, key=lambda b: (b[0] / b[1], b[0])))
    buckets = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            buckets |= {(w, h), (h, w)}  # portrait and landscape alike
    # keep only maximal sizes: (960, 256) goes, since (1024, 256) has the same height and more area
    buckets = {(w, h) for w, h in buckets if not grows(w, h) and not grows(h, w)}
    return tuple(sorted(buckets, key=lambda b: (b[0] / b[1], b[0])))


def assign_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest (in log ratio) to `size`; ties go to the larger area."""
    target = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


@dataclass(frozen=True)
class Crop:
    """Where a training image comes from: `box` (left, top, right, bottom) in source pixels (floats,
    post-EXIF-transpose) is resampled to `bucket` (w, h), then mirrored if `flip`."""
    box: tuple[float, float, float, float]
    bucket: Size
    flip: bool = False

    def apply(self, image: Image.Image) -> Image.Image:
        out = image.resize(self.bucket, RESAMPLE, box=self.box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else out

    @property
    def top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in bucket-scaled pixels: SDXL's `crops_coords_top_left`."""
        scale = self.bucket[0] / (self.box[2] - self.box[0])
        return round(self.box[1] * scale), round(self.box[0] * scale)


def size_conditioning(size: Size, crop: Crop) -> tuple[int, int, int, int, int, int]:
    """SDXL's size/crop ids of a training picture (Podell et al. 2023, §2.2): (original height, width,
    crop top, left, target height, width). `size` is the picture's own (w, h) before any resizing; the
    crop's top-left is in the pixels of the picture resized to cover the bucket (`Crop.top_left`); the
    target is the bucket. diffusers' train_text_to_image_lora_sdxl.py computes the same for its square
    crops (original_sizes (h, w), crop_top_lefts (y1, x1), target (resolution, resolution)), kohya's
    sdxl_train_util for its buckets."""
    (w, h), (bw, bh) = size, crop.bucket
    top, left = crop.top_left
    return h, w, top, left, bh, bw


def plan_crop(size: Size, bucket: Size, rng: np.random.Generator | None = None, *,
              random_crop: bool = False, flip_prob: float = 0.0) -> Crop:
    """Resize-to-cover then crop: the largest source box with the bucket's aspect ratio, centered
    (or placed uniformly at random when `random_crop`; needs `rng`), flipped with `flip_prob`."""
    w, h = size
    bw, bh = bucket
    if w * bh > h * bw:              # source is wider than the bucket: use full height
        cw, ch = h * bw / bh, float(h)
    else:                            # taller (or equal): use full width
        cw, ch = float(w), w * bh / bw
    if random_crop or flip_prob:
        if rng is None:
            raise ValueError("random_crop / flip need a seeded rng")
    if random_crop:
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    else:
        left, top = (w - cw) / 2, (h - ch) / 2
    flip = bool(flip_prob) and bool(rng.random() < flip_prob)
    return Crop((left, top, left + cw, top + ch), bucket, flip)


def transform_pair(image: Image.Image, cond: Image.Image | None, bucket: Size,
                   rng: np.random.Generator | None = None, *, random_crop: bool = False,
                   flip_prob: float = 0.0) -> tuple[Image.Image, Image.Image | None, Crop]:
    """Crop a target and its conditioning image with identical geometry (same box, same flip).

    The hint must have the target's aspect ratio; a different resolution (a half-size edge map) is
    first resized to the target's size, so the box means the same pixels in both.
    """
    crop = plan_crop(image.size, bucket, rng, random_crop=random_crop, flip_prob=flip_prob)
    if cond is None:
        return crop.apply(image), None, crop
    if cond.size != image.size:
        (w, h), (cw, ch) = image.size, cond.size
        if abs(cw * h - ch * w) > max(w, h):   # more than ~one pixel of aspect disagreement
            raise ValueError(f"conditioning image {cond.size} does not match its target {image.size}: "
                             "the aspect ratios differ, so no crop fits both")
        cond = cond.resize(image.size, RESAMPLE)
    return crop.apply(image), crop.apply(cond), crop


class BucketBatchSampler:
    """Batches of indices, each from a single bucket, in a seeded order that depends only on
    (seed, epoch). Yields lists of `(epoch, index)` keys so the dataset can seed its per-sample
    randomness (crop, flip, caption dropout) with the same pair; works as a DataLoader
    `batch_sampler`.

    Repeats: with `repeats[i] = n`, index i fills n slots of its bucket in every epoch (kohya's
    `N_name` folders); the batches list slots, `key(epoch, slot)` turns one into the dataset key:
    `(epoch, i)` for the first copy, `(epoch, i, copy)` for the others, so each copy draws its own
    crop, flip and caption. Without repeats a slot is the index itself.

    Resume: `set_epoch(epoch, start_step=step)` skips the first `step` batches of that epoch; the
    rest are exactly those of an uninterrupted run. The trainer stores (epoch, step) in its
    checkpoint; the sampler itself holds no hidden state.
    """

    def __init__(self, buckets: Sequence[Size], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, repeats: Sequence[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        repeats = [1] * len(buckets) if repeats is None else list(repeats)
        if len(repeats) != len(buckets) or min(repeats, default=1) < 1:
            raise ValueError(f"repeats must give each of the {len(buckets)} samples a count >= 1")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        # slot -> (index, copy); slots of one index are adjacent, so with no repeats slot == index
        self.slots = [(index, copy) for index, n in enumerate(repeats) for copy in range(n)]
        self.groups: dict[Size, list[int]] = {}
        for slot, (index, _) in enumerate(self.slots):
            self.groups.setdefault(tuple(buckets[index]), []).append(slot)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step {start_step} is outside epoch length {len(self)}")
        self.epoch, self.start_step = epoch, start_step

    def key(self, epoch: int, slot: int) -> tuple[int, ...]:
        """The dataset key of `slot` in `epoch`: (epoch, index), or (epoch, index, copy) for copy >= 1."""
        index, copy = self.slots[slot]
        return (epoch, index, copy) if copy else (epoch, index)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` as slots: shuffle inside each bucket, chunk, then shuffle the batch
        order."""
        rng = np.random.default_rng([self.seed, 0, epoch])   # stream 0: order (datasets use 1)
        batches = []
        for bucket in sorted(self.groups):                    # fixed bucket order before any draw
            idx = list(self.groups[bucket])
            if self.shuffle:
                idx = [idx[i] for i in rng.permutation(len(idx))]
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            batches += [idx[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        n = 0
        for idx in self.groups.values():
            n += len(idx) // self.batch_size if self.drop_last else -(-len(idx) // self.batch_size)
        return n

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        epoch, start = self.epoch, self.start_step
        self.start_step = 0   # a resume offset applies to one pass only
        for batch in self.epoch_batches(epoch)[start:]:
            yield [self.key(epoch, slot) for slot in batch]
