"""Measured quality on the shapes world (train.world): what a picture shows, whether it carries a
style, and how well it follows a ControlNet's edges. Classical image analysis, no training, no
randomness: the same image always gets the same answer.

- `classify(image) -> (shape, colour, background)`.
- `shape_colour_accuracy(images, scenes)`: the share with the right shape, colour, background, and
  shape and colour both.
- `has_style(image, style)` / `style_score(images, style)`: does the picture (do what share of them)
  carry the "outline" or "stripes" style.
- `outline_continuity(image)`: the share of the shape's contour a dark outline band covers (clean
  outline 1, broken or missing less); `shapes_kept(base_images, images, scenes)`: shapes the base
  draws right that `images` lose, and their size against the base's.
- `edge_f1_score(samples, hints)`: mean edge F1 of each sample's Canny map against its hint
  (train.canny.edge_fidelity, 2 px tolerance).
- `quality_report(...)` gathers these for one set of samples; `format_report` prints one report or a
  {row label: report} mapping as a table (e.g. base vs base + LoRA).
- `calibrate(n, seed)` measures all of it on rendered ground truth, clean and `degrade`d.
- `evaluate(base, n, seed, ...)` generates n scenes' captions with a base model (and LoRAs, a
  ControlNet) through train.generate and measures the pictures, one report per row (base,
  base + LoRA, + ControlNet); `adapterkit quality` (train/cli/quality.py) prints it.

Calibration, `python -m train.quality 400 0` (= `calibrate(n=400, seed=0)`, 64 x 64): 400 scenes,
each drawn plain and in each style; "degraded" = `degrade` with `DEGRADATIONS["degraded"]`
(Gaussian blur sigma 0.7 px, a random shift of up to 1 px, noise sigma 8/255, JPEG quality 75),
"harsh" = blur 1.0, shift 2, noise 12/255, JPEG 50. Columns "outline"/"stripes" = the share
detected with that style: the true-positive rate on that style's rows, false positives elsewhere.
"edge_f1" = Canny of the picture against the hint of its clean render; "edge_other" = against the
next scene's hint (the chance level: striped pictures have edges everywhere).

                           n   shape  colour  background    both  outline  stripes  edge_f1  edge_other
    plain clean          400   1.000   1.000       1.000   1.000    0.000    0.000    1.000       0.209
    plain degraded       400   1.000   1.000       1.000   1.000    0.000    0.000    0.964       0.215
    plain harsh          400   1.000   1.000       1.000   1.000    0.000    0.000    0.835       0.225
    outline clean        400   1.000   1.000       1.000   1.000    1.000    0.000    1.000       0.329
    outline degraded     400   1.000   1.000       1.000   1.000    1.000    0.000    0.995       0.331
    outline harsh        400   0.995   1.000       1.000   0.995    0.993    0.000    0.943       0.341
    stripes clean        400   1.000   1.000       1.000   1.000    0.000    1.000    1.000       0.536
    stripes degraded     400   1.000   1.000       1.000   1.000    0.000    1.000    0.985       0.541
    stripes harsh        400   0.995   1.000       1.000   0.995    0.000    0.953    0.939       0.538

200 other scenes (seed 2024) give the same picture (stripes harsh 0.910, the lowest figure). At
128 px every figure is >= 0.979 (calibrate(150, 1, size=128)); at 32 px, where the same
degradations are twice as strong relative to the picture, degraded shape accuracy falls to
0.91-0.95, outline detection to 0.66 and stripes (3 px apart there) go undetected: the measures
are made for 64 px and up. These are figures of the measures on the world's own pictures: a
diffusion sample can fail in ways no degradation here imitates (two shapes, smeared colour), which
the measures then count as wrong answers, as they should.

How it works. The background is the median colour of the image border (the world keeps a margin of
background around every shape). The shape is the largest region that differs from it: the CIE76
colour difference to the background, smoothed (sigma `MASK_SMOOTH`), upsampled 4x (bilinear) and
cut at half the step from background to the shape's rim, so the contour sits where the edge is.
Shape, from the contour's centroid-distance signature r(theta) (Fourier descriptors, Zhang & Lu
2002): the largest of its harmonics 3..6 relative to the mean radius names the symmetry, which is
the shape: 3 triangle, 5 star, 6 hexagon, and 4 a square or, when min r / max r is below
`SQUARE_ROUNDNESS`, a cross; no harmonic above `CIRCLE_HARMONIC` is a circle. It is
rotation-invariant, and it integrates over the whole contour, so pixel noise averages out: on
degraded renders the smallest hexagon harmonic is twice the largest a circle shows. Colour: the
median Lab of the shape's inside (deeper than `COLOUR_DEPTH` x its radius, away from blends with
the background), counting only pixels at least `COLOUR_LIGHT` x as light as the inside's 90th
percentile, which drops the black outline and the dark stripes; then the nearest named colour.

Styles. Outline: the lower quartile of L* in the band just inside the boundary, as deep as the
world draws the outline, over the L* of the darker of shape colour and background: 0.0-0.2 with an
outline (up to ~0.5 blurred harder), 0.83 and up without; below `OUTLINE_DARKNESS` and no stripes
is an outline. Stripes: inside the shape (>= 2 px from the edge), the mean absolute change of L*
between pixels 2 px apart diagonally across the stripes against the same along them; stripes
change the first and not the second, noise and flat colour change both alike (ratio 2.8-34 with
stripes, at most 1.4 without). Both diagonals are tried. The constants sit at the geometric middle
of the gaps, or (outline) toward the blurrier side.

Outline continuity. CONTINUITY_POINTS points spread evenly (by arc length) along the shape's contour;
a point is covered when a pixel of the outline band (inside the shape, as deep as the world draws the
outline) darker than OUTLINE_DARKNESS x the darker of shape colour and background lies within
CONTINUITY_REACH px. The style score says an outline is there; this says whether it goes all the way
round. `calibrate_outline(200, 0)`, 64 px (mean / min / max): plain 0.000 / 0 / 0; outline clean
1.000 / 1.000 / 1.000, degraded 1.000 / 0.977 / 1.000, harsh 0.961 / 0.453 / 1.000; outline broken
over 30% of the way round in 4 gaps with 20 dark specks (`break_outline`) 0.836 / 0.703 / 1.000 clean,
0.775 / 0.562 / 0.953 degraded; broken over 60%, degraded, 0.560 / 0.359 / 0.820. So on degraded
pictures every intact outline scores above every broken one.

Inputs are PIL images or uint8 (H, W, 3) arrays; turn sampler tensors into images with
`train.images.tensor_to_pil` (its value range is an argument there, never guessed here).

One coherent thing over 650 lines: the shapes world's measures (classifier, style detectors,
scores), each a few lines of one shared picture analysis.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import cv2
import numpy as np
from PIL import Image, ImageFilter

from adapterkit.train.console import bar
from adapterkit.train.data.canny import edge_fidelity
from adapterkit.train.world.shapes import (
    COLOURS,
    OUTLINE_WIDTH,
    SIZE,
    STYLES,
    Scene,
    canny_map,
    caption,
    render,
    sample_scenes,
)

MASK_DELTA_E = 16.0            # shape pixels differ from the background by more than this (CIE76)
UPSAMPLE = 4                   # contour analysis at 4x
MASK_SMOOTH = 0.7              # Gaussian sigma (px) on the colour-difference map: noise off the contour
CIRCLE_HARMONIC = 0.011        # no harmonic 3..6 above this (|F_k| / F_0 of r(theta)): a circle
SQUARE_ROUNDNESS = 0.66        # min / max radius: square 0.71, cross 0.45 (0.5-0.6 blurred)
COLOUR_DEPTH = 0.2             # colour read deeper than this x radius (away from blends at the edge)
COLOUR_LIGHT = 0.75            # ... from pixels at least this x the inside's 90th-percentile L*
OUTLINE_DARKNESS = 0.6         # rim band lower-quartile L* / darker of colour and background: below = outline
STRIPE_RATIO = 1.7             # across / along lightness change, and at least
STRIPE_MIN_DELTA = 3.0         # this many L* units more across than along
CONTINUITY_POINTS = 128        # outline continuity: points along the contour, evenly by arc length
CONTINUITY_REACH = 2.0         # ... each covered by a dark band pixel within this many px

_NAMES = list(COLOURS)
_PALETTE_LAB = cv2.cvtColor(np.array([list(COLOURS.values())], np.float32) / 255,
                            cv2.COLOR_RGB2LAB)[0]                       # (n_colours, 3)


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise TypeError(f"expected a PIL image or a uint8 (H, W, 3) array, got {a.dtype} {a.shape}; "
                        "convert sampler tensors with train.images.tensor_to_pil")
    return a


def _nearest(lab: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - lab, axis=1)))]


@dataclass
class _Analysis:
    """What one image shows, computed once and shared by the classifier and the style detectors."""
    lab: np.ndarray            # (H, W, 3) float32 CIE Lab, L in 0..100
    background: str
    bg_lab: np.ndarray         # (3,)
    contour: np.ndarray | None  # the shape's outer contour at UPSAMPLE x, or None: no shape

    @cached_property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the filled shape at the image's own size."""
        h, w = self.lab.shape[:2]
        if self.contour is None:
            return np.zeros((h, w), bool)
        hi = np.zeros((h * UPSAMPLE, w * UPSAMPLE), np.uint8)
        cv2.drawContours(hi, [self.contour], -1, 255, thickness=cv2.FILLED)
        return cv2.resize(hi, (w, h), interpolation=cv2.INTER_AREA) > 127

    @cached_property
    def depth(self) -> np.ndarray:
        """(H, W) float: distance in pixels from each shape pixel to the nearest outside pixel."""
        return cv2.distanceTransform(self.mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    @cached_property
    def radius(self) -> float:
        """The minimum enclosing circle's radius, in image pixels."""
        return cv2.minEnclosingCircle(self.contour)[1] / UPSAMPLE if self.contour is not None else 0.0

    @cached_property
    def colour_lab(self) -> np.ndarray | None:
        """Median Lab of the shape's own colour: deep inside, the dark (outline, stripe) pixels left out."""
        for depth in (max(1.5, COLOUR_DEPTH * self.radius), 1.0, 0.0):
            inside = self.depth > depth
            if inside.sum() >= 4:
                break
        else:
            return None
        px = self.lab[inside]                                            # (k, 3)
        light = px[px[:, 0] >= COLOUR_LIGHT * np.quantile(px[:, 0], 0.9)]
        return np.median(light, axis=0)

    @cached_property
    def shape(self) -> str | None:
        if self.contour is None:
            return None
        harmonics, roundness = _signature(self.contour)
        if harmonics.max() < CIRCLE_HARMONIC:
            return "circle"
        n = int(np.argmax(harmonics)) + 3
        if n == 4:
            return "square" if roundness > SQUARE_ROUNDNESS else "cross"
        return {3: "triangle", 5: "star", 6: "hexagon"}[n]


def _signature(contour: np.ndarray, samples: int = 256) -> tuple[np.ndarray, float]:
    """The centroid-distance signature r(theta) of a contour (Zhang & Lu, "A comparative study of
    Fourier descriptors for shape representation and retrieval", ACCV 2002): the magnitudes of its
    Fourier harmonics 3..6 over the mean radius (rotation-invariant), and min r / max r."""
    m = cv2.moments(contour)
    p = contour[:, 0, :].astype(np.float64)                              # (k, 2) x, y
    d = p - (m["m10"] / m["m00"], m["m01"] / m["m00"])
    theta, r = np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1])
    order = np.argsort(theta)
    grid = np.linspace(-np.pi, np.pi, samples, endpoint=False)
    rr = np.interp(grid, theta[order], r[order], period=2 * np.pi)      # (samples,) uniform in angle
    f = np.abs(np.fft.rfft(rr))
    return f[3:7] / f[0], float(rr.min() / rr.max())


def _analyse(image) -> _Analysis:
    rgb = _rgb(image)
    h, w = rgb.shape[:2]
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)   # (H, W, 3)
    b = max(1, min(h, w) // 32)                                          # 2 px at 64
    border = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                             lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    bg_lab = np.median(border, axis=0)
    delta = np.linalg.norm(lab - bg_lab, axis=2)                         # (H, W) CIE76 to background
    delta = cv2.GaussianBlur(delta, (0, 0), MASK_SMOOTH)
    # The contour at half the step from the background to the shape's rim (its colour, or the
    # outline): the rim is what lies 2-3 px inside a first, fixed-threshold mask.
    rough = (delta > MASK_DELTA_E).astype(np.uint8)
    depth = cv2.distanceTransform(rough, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    rim = (depth >= 2) & (depth <= 3)
    level = max(MASK_DELTA_E / 2, 0.5 * float(np.median(delta[rim]))) if rim.sum() >= 4 else MASK_DELTA_E
    up = cv2.resize(delta, (w * UPSAMPLE, h * UPSAMPLE), interpolation=cv2.INTER_LINEAR)
    fg = (up > level).astype(np.uint8)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea) if contours else None
    if contour is not None and cv2.contourArea(contour) < (2 * UPSAMPLE) ** 2:   # under ~4 px: noise
        contour = None
    return _Analysis(lab, _nearest(bg_lab), bg_lab, contour)


# -- the measures ---------------------------------------------------------------------------------


def _classify(a: _Analysis) -> tuple[str | None, str | None, str]:
    colour = a.colour_lab
    return a.shape, None if colour is None else _nearest(colour), a.background


def classify(image) -> tuple[str | None, str | None, str]:
    """(shape, colour, background) of a picture of the world; shape and colour are None when no
    shape stands out from the background.

    Measured (calibrate(400, seed=0), 64 px, each of plain/outline/stripes): shape, colour and
    background all 1.000 on clean renders and on degraded ones; on harsh ones shape >= 0.995,
    colour and background 1.000.
    """
    return _classify(_analyse(image))


def _accuracy(results: Sequence[tuple], scenes: Sequence[Scene]) -> dict[str, float]:
    if len(results) != len(scenes) or not scenes:
        raise ValueError(f"need as many scenes as images (and at least one): {len(results)} images, "
                         f"{len(scenes)} scenes")
    hits = np.array([(s == sc.shape, c == sc.colour, b == sc.background, s == sc.shape and c == sc.colour)
                     for (s, c, b), sc in zip(results, scenes)], dtype=float)
    return dict(zip(("shape", "colour", "background", "both"), hits.mean(axis=0).tolist()))


def shape_colour_accuracy(images: Sequence, scenes: Sequence[Scene]) -> dict[str, float]:
    """Shares of `images` whose classified shape, colour, background, and shape and colour both,
    match their `scenes` (keys "shape", "colour", "background", "both"). How far the classifier
    itself can be trusted: see `classify`."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    return _accuracy([classify(im) for im in images], scenes)


def _outline_darkness(a: _Analysis) -> float:
    """Lower quartile of L* in the band just inside the boundary (as deep as the world's outline),
    over the L* of the darker of shape colour and background: ~0.05-0.2 with an outline (up to 0.5
    blurred), ~0.9 and up without."""
    if a.contour is None or a.colour_lab is None:
        return 1.0
    band = a.mask & (a.depth >= 1) & (a.depth <= max(1.5, OUTLINE_WIDTH * min(a.mask.shape)))
    if band.sum() < 8:
        return 1.0
    ref = min(float(a.colour_lab[0]), float(a.bg_lab[0]))
    return float(np.quantile(a.lab[..., 0][band], 0.25)) / max(ref, 1.0)


def _dark_band(a: _Analysis) -> np.ndarray:
    """(H, W) bool: pixels of the outline band (inside the shape, as deep as the world's outline, with
    half a pixel to spare) darker than OUTLINE_DARKNESS x the darker of shape colour and background."""
    ref = max(1.0, min(float(a.colour_lab[0]), float(a.bg_lab[0])))
    width = max(1.5, OUTLINE_WIDTH * min(a.mask.shape)) + 0.5
    return a.mask & (a.depth <= width) & (a.lab[..., 0] < OUTLINE_DARKNESS * ref)


def _outline_continuity(a: _Analysis) -> float:
    """The share of CONTINUITY_POINTS points, spread evenly along the shape's contour, that have a
    dark band pixel within CONTINUITY_REACH px: 1 for an outline drawn all the way round, the share
    of the contour it covers for a broken one, ~0 without one."""
    if a.contour is None or a.colour_lab is None:
        return 0.0
    ys, xs = np.nonzero(_dark_band(a))
    if len(xs) == 0:
        return 0.0
    p = (a.contour[:, 0, :].astype(np.float64) + 0.5) / UPSAMPLE - 0.5     # (k, 2) x, y in image px
    closed = np.vstack([p, p[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    at = np.linspace(0.0, arc[-1], CONTINUITY_POINTS, endpoint=False)
    points = np.stack([np.interp(at, arc, closed[:, 0]), np.interp(at, arc, closed[:, 1])], axis=1)
    d2 = (points[:, None, 0] - xs[None]) ** 2 + (points[:, None, 1] - ys[None]) ** 2   # (points, dark)
    return float((d2.min(axis=1) <= CONTINUITY_REACH ** 2).mean())


def outline_continuity(image) -> float:
    """How continuous a picture's outline is: the share of its shape's contour that a dark band just
    inside it covers (module docstring, "Outline continuity"). 0.0 without a shape."""
    return _outline_continuity(_analyse(image))


def _diag_change(light: np.ndarray, inside: np.ndarray, dy: int) -> float:
    """Mean |L(y + dy, x + 2) - L(y, x)| over pairs inside the shape (dy = +-2)."""
    h, w = light.shape
    ys0, ys1 = (slice(0, h - dy), slice(dy, h)) if dy > 0 else (slice(-dy, h), slice(0, h + dy))
    a, b = light[ys0, : w - 2], light[ys1, 2:]
    both = inside[ys0, : w - 2] & inside[ys1, 2:]
    return float(np.abs(a - b)[both].mean()) if both.sum() >= 8 else 0.0


def _stripe_contrast(a: _Analysis) -> tuple[float, float]:
    """(across, along): mean |change of L*| 2 px diagonally across the likelier stripe direction,
    and along it, inside the shape (>= 2 px from its edge)."""
    if a.contour is None:
        return 0.0, 0.0
    inside = a.depth >= 2
    light = a.lab[..., 0]
    down, up = _diag_change(light, inside, 2), _diag_change(light, inside, -2)   # across "/" and "\" stripes
    return max(down, up), min(down, up)


def _stripes(a: _Analysis) -> bool:
    across, along = _stripe_contrast(a)
    return across > STRIPE_RATIO * max(along, 1.0) and across - along > STRIPE_MIN_DELTA


def _outline(a: _Analysis) -> bool:
    # Stripes that run into the edge darken the rim's lower quartile too (to ~0.5 when crisp); the
    # two styles exclude each other in this world, so striped pictures are not called outlined.
    return _outline_darkness(a) < OUTLINE_DARKNESS and not _stripes(a)


_DETECTORS = {"outline": _outline, "stripes": _stripes}


def _detector(style: str):
    if style not in _DETECTORS:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(_DETECTORS)}")
    return _DETECTORS[style]


def has_style(image, style: str) -> bool:
    """Whether one picture carries `style`: "outline" (a dark band just inside the boundary, and no
    stripes) or "stripes" (lightness changing across one diagonal and not along it).

    Measured (calibrate(400, seed=0), 64 px): outline detected on 1.000 of outlined renders clean
    and degraded (0.993 harsh), stripes on 1.000 of striped ones clean and degraded (0.953 harsh);
    false positives 0.000 for both on unstyled renders and on the other style, clean, degraded and
    harsh.
    """
    return _detector(style)(_analyse(image))


def style_score(images: Sequence, style: str) -> float:
    """The share of `images` that carry `style` (see `has_style` for its measured accuracy)."""
    detect = _detector(style)
    if not images:
        raise ValueError("no images to score")
    return float(np.mean([detect(_analyse(im)) for im in images]))


def edge_f1_score(samples: Sequence, hints: Sequence, tolerance_px: int = 2) -> float:
    """Mean edge F1 of each sample's Canny map against its hint (train.canny.edge_fidelity).

    Measured (calibrate(400, seed=0), 64 px, plain renders): 1.000 for a render against its own
    hint, 0.964 for a degraded render (0.835 harsh) against its clean render's hint, 0.209 for a
    render against another scene's hint (outline 0.329 and stripes 0.536: their many edges find
    partners by chance within the 2 px tolerance).
    """
    if len(samples) != len(hints) or not hints:
        raise ValueError(f"need one hint per sample (and at least one): {len(samples)} samples, "
                         f"{len(hints)} hints")
    return float(np.mean([edge_fidelity(s, h, tolerance_px=tolerance_px)["f1"]
                          for s, h in zip(samples, hints)]))


def quality_report(samples: Sequence, scenes: Sequence[Scene] | None = None,
                   hints: Sequence | None = None, styles: Sequence[str] = STYLES) -> dict[str, float]:
    """One set of samples measured: "n"; "shape", "colour", "background", "both" (accuracy, when
    the scenes the samples were asked for are given); the share carrying each of `styles`, and with
    "outline" among them "outline_continuity" (the mean of `outline_continuity`); and "edge_f1" when
    ControlNet hints are given. Each image is analysed once."""
    analyses = [_analyse(im) for im in samples]
    report: dict[str, float] = {"n": len(samples)}
    if scenes is not None:
        report.update(_accuracy([_classify(a) for a in analyses], scenes))
    for style in styles:
        detect = _detector(style)
        report[style] = float(np.mean([detect(a) for a in analyses])) if analyses else 0.0
    if "outline" in styles:
        report["outline_continuity"] = float(np.mean([_outline_continuity(a) for a in analyses])) \
            if analyses else 0.0
    if hints is not None:
        report["edge_f1"] = edge_f1_score(samples, hints)
    return report


def shapes_kept(base_images: Sequence, images: Sequence, scenes: Sequence[Scene]) -> dict[str, float | int]:
    """`images` against `base_images` of the same scenes (same prompts and noise): "shapes_lost", the
    number of scenes whose shape the base draws right and `images` does not, and "size_ratio", the
    median over the scenes both draw right of the shape's radius in `images` over the base's (a LoRA
    that shrinks the shapes scores below 1 while still drawing them right)."""
    if not (len(base_images) == len(images) == len(scenes)) or not scenes:
        raise ValueError(f"need as many base pictures as pictures and scenes: {len(base_images)}, "
                         f"{len(images)}, {len(scenes)}")
    lost, ratios = 0, []
    for b, im, sc in zip(base_images, images, scenes):
        a, o = _analyse(b), _analyse(im)
        if a.shape == sc.shape and o.shape != sc.shape:
            lost += 1
        elif a.shape == sc.shape == o.shape and a.radius > 0:
            ratios.append(o.radius / a.radius)
    return {"shapes_lost": lost, "size_ratio": float(np.median(ratios)) if ratios else None}


def format_report(report: Mapping) -> str:
    """A plain-text table: one report as one row, or {row label: report} as one row each; columns
    are the union of the reports' keys, in order of first appearance."""
    rows = report if report and all(isinstance(v, Mapping) for v in report.values()) else {"": report}
    cols: list[str] = []
    for r in rows.values():
        cols += [k for k in r if k not in cols]
    label_w = max(len(str(k)) for k in rows)
    widths = [max(len(c), 6) for c in cols]

    def cell(v) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["  ".join([" " * label_w] + [c.rjust(w) for c, w in zip(cols, widths)])]
    for label, r in rows.items():
        lines.append("  ".join([str(label).ljust(label_w)]
                               + [cell(r.get(c)).rjust(w) for c, w in zip(cols, widths)]))
    return "\n".join(line.rstrip() for line in lines)


# -- ground truth ---------------------------------------------------------------------------------


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.7, shift: int = 1,
            noise: float = 8 / 255, jpeg: int | None = 75) -> Image.Image:
    """What a 64 px diffusion sample does to a clean picture, roughly: Gaussian blur (sigma in px),
    a random shift of up to `shift` px each way (edge pixels repeated), Gaussian noise (sigma, as a
    fraction of 255) and a JPEG round trip (quality; None: none)."""
    out = image.convert("RGB")
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(out).astype(np.float64)
    if shift:
        dy, dx = rng.integers(-shift, shift + 1, size=2)
        a = np.pad(a, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
        h, w = image.height, image.width
        a = a[shift + dy: shift + dy + h, shift + dx: shift + dx + w]
    if noise:
        a = a + rng.normal(0.0, noise * 255, size=a.shape)
    out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    if jpeg:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=jpeg)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def break_outline(scene: Scene, rng: np.random.Generator, size: int = SIZE, share: float = 0.3,
                  gaps: int = 4, specks: int = 0) -> Image.Image:
    """An outlined render whose outline is missing over `share` of the way round, in `gaps` sectors
    (random angles about the centre; the shape colour shows there, as in the plain render), with
    `specks` dark 1 px dots scattered over the picture: the ragged, speckled outline a poor style
    LoRA draws, for calibrating `outline_continuity`."""
    outlined = np.asarray(render(replace(scene, style="outline"), size)).copy()
    plain = np.asarray(render(replace(scene, style=None), size))
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = scene.center[0] * size - 0.5, scene.center[1] * size - 0.5
    angle = np.mod(np.arctan2(yy - cy, xx - cx), 2 * np.pi)                # (H, W)
    width = 2 * np.pi * share / gaps
    for start in rng.uniform(0, 2 * np.pi, gaps):
        gap = np.mod(angle - start, 2 * np.pi) < width
        outlined[gap] = plain[gap]
    for y, x in rng.integers(0, size, (specks, 2)):
        outlined[y, x] = (20, 20, 20)
    return Image.fromarray(outlined)


def calibrate_outline(n: int = 200, seed: int = 0, size: int = SIZE) -> dict[str, dict[str, float]]:
    """`outline_continuity` on rendered ground truth: n scenes plain, outlined (clean, `degrade`d as
    DEGRADATIONS says) and with the outline broken (`break_outline`, 30% and 60% of the way round in 4
    gaps, with 20 specks), clean and degraded. {condition: {"mean", "min", "max"}}."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 2])
    conditions = {
        "plain clean": lambda s: render(replace(s, style=None), size),
        "outline clean": lambda s: render(replace(s, style="outline"), size),
        **{f"outline {k}": (lambda s, k=k: degrade(render(replace(s, style="outline"), size), rng,
                                                   **DEGRADATIONS[k])) for k in DEGRADATIONS},
        "broken 30% clean": lambda s: break_outline(s, rng, size, 0.3, specks=20),
        "broken 30% degraded": lambda s: degrade(break_outline(s, rng, size, 0.3, specks=20), rng,
                                                 **DEGRADATIONS["degraded"]),
        "broken 60% degraded": lambda s: degrade(break_outline(s, rng, size, 0.6, specks=20), rng,
                                                 **DEGRADATIONS["degraded"]),
    }
    out = {}
    for name, draw in conditions.items():
        values = np.array([outline_continuity(draw(s)) for s in scenes])
        out[name] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    return out


# Conditions of `calibrate`: `degrade` settings. "degraded" is what the targets are set on; "harsh"
# shows where the measures start to fail.
DEGRADATIONS = {
    "degraded": {"blur": 0.7, "shift": 1, "noise": 8 / 255, "jpeg": 75},
    "harsh": {"blur": 1.0, "shift": 2, "noise": 12 / 255, "jpeg": 50},
}


def calibrate(n: int = 400, seed: int = 0, size: int = SIZE,
              conditions: Sequence[str] = ("clean", *DEGRADATIONS)) -> dict[str, dict[str, float]]:
    """Every measure on rendered ground truth: n scenes from `seed`, each drawn plain and in each
    style, clean and `degrade`d as `DEGRADATIONS` says. Returns {"<style> <condition>": report}
    for `format_report`; each report holds shape/colour/background/both accuracy, the share
    detected as each style, and edge F1 against the clean render's hint ("edge_f1") and against
    the next scene's ("edge_other")."""
    unknown = set(conditions) - {"clean", *DEGRADATIONS}
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; expected clean or {', '.join(DEGRADATIONS)}")
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng([seed, 1])                              # the degradations
    table: dict[str, dict[str, float]] = {}
    for style in (None, *STYLES):
        styled = [replace(s, style=style) for s in scenes]
        clean = [render(s, size) for s in styled]
        hints = [canny_map(im) for im in clean]
        for condition in conditions:
            images = clean if condition == "clean" else [degrade(im, rng, **DEGRADATIONS[condition])
                                                         for im in clean]
            report = quality_report(images, styled, hints)
            report["edge_other"] = edge_f1_score(images, hints[1:] + hints[:1])
            table[f"{style or 'plain'} {condition}"] = report
    return table


# -- a model measured ------------------------------------------------------------------------------

ROW_BASE, ROW_LORA = "base", "base + LoRA"
ROW_CONTROL, ROW_LORA_CONTROL = "base + ControlNet", "base + LoRA + ControlNet"


@dataclass
class Evaluation:
    """What `evaluate` measured: {row label: quality_report} in `reports` (for `format_report`), the
    pictures of each row in `samples`, and what they were asked for (scenes, prompts, noise seeds,
    ControlNet hints; `settings` the sampling arguments)."""
    scenes: list[Scene]
    prompts: list[str]
    seeds: list[int]
    hints: list[Image.Image] | None
    reports: dict[str, dict[str, float]]
    samples: dict[str, list[Image.Image]]
    settings: dict

    def table(self) -> str:
        return format_report(self.reports)

    def to_json(self) -> dict:
        """JSON-ready: settings, rows (the reports), and per scene its Scene, prompt and seed."""
        return {"settings": self.settings, "rows": self.reports,
                "scenes": [{"scene": s.to_dict(), "prompt": p, "seed": z}
                           for s, p, z in zip(self.scenes, self.prompts, self.seeds)]}

    def grid(self, rows: int = 8) -> tuple[list[Image.Image], list[str], list[str]]:
        """The first `rows` scenes as grid cells (row-major), row labels and column labels: the
        target render, the hint (with a ControlNet), then one column per row of the report."""
        k = min(rows, len(self.scenes))
        size = next(iter(self.samples.values()))[0].width
        cols = ["target"] + (["hint"] if self.hints is not None else []) + list(self.samples)
        cells = []
        for i in range(k):
            cells.append(render(self.scenes[i], size))
            if self.hints is not None:
                cells.append(self.hints[i])
            cells += [images[i] for images in self.samples.values()]
        return cells, [self.prompts[i][:40] for i in range(k)], cols


def evaluate(base, n: int = 64, seed: int = 0, *, style: str | None = None, trigger: str | None = None,
             loras: Mapping[str, float] | None = None, controlnet=None, control_scale: float = 1.0,
             steps: int = 30, guidance: float = 3.0, sampler: str = "ddim", size: int | None = None,
             batch_size: int = 16, progress: bool = False) -> Evaluation:
    """Generate the world's scenes with a base model and measure the pictures (`quality_report`).

    n scenes from `seed` (`sample_scenes(n, seed, style)`), prompted with `caption(scene, trigger)`;
    image i's noise seed is `SeedSequence([seed, 1]).generate_state(n)[i]`, the same in every row,
    and the first k scenes and seeds of n are those of k. Rows (each a `quality_report` against the
    scenes, both style columns shown):
      "base"                       the LoRAs named in `loras` at weight 0, no ControlNet;
      "base + LoRA"                with `loras` ({adapter name: weight}, already loaded on
                                   the base, e.g. by `train.pipeline.loras.load_lora_on_base`);
      "base + ControlNet"          with `controlnet`, hints the Canny maps of the scenes drawn plain
                                   (`canny_map`, at the image size): "edge_f1" in every row, and in
                                   the ControlNet rows "edge_ratio" = edge_f1 / that of the same row
                                   without the ControlNet;
      "base + LoRA + ControlNet"   both.
    The LoRA rows add `shapes_kept` against the same row without the LoRA ("shapes_lost",
    "size_ratio").
    `style` only decides how the scenes' targets are drawn (`Evaluation.grid`); the prompts carry
    the trigger, never the style's name. The LoRA weights are restored afterwards. The measures are
    calibrated at 64 px and up (see the module docstring); smaller models get rougher figures.
    `progress`: one bar counting every row's pictures, with the time left (the command line's).
    """
    from adapterkit.adapters.lora import folded_loras
    from adapterkit.train.pipeline.generate import check_controlnet, generate, to_images

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if controlnet is not None:
        check_controlnet(base, controlnet)
    loras = dict(loras or {})
    size = size or base.unet.config.sample_size * base.latent_scale
    scenes = sample_scenes(n, seed, style)
    prompts = [caption(s, trigger) for s in scenes]
    seeds = [int(z) for z in np.random.SeedSequence([seed, 1]).generate_state(n)]
    hints = [canny_map(replace(s, style=None), size) for s in scenes] if controlnet is not None else None

    def run(cn) -> list[Image.Image]:
        return to_images(generate(base, prompts, seeds, steps=steps, guidance=guidance, sampler=sampler,
                                  size=size, controlnet=cn, hints=hints if cn is not None else None,
                                  control_scale=control_scale, batch_size=batch_size, progress=counted))

    settings = {"n": n, "seed": seed, "style": style, "trigger": trigger, "loras": loras,
                "control_scale": control_scale if controlnet is not None else None, "steps": steps,
                "guidance": guidance, "sampler": sampler, "size": size}
    rows = [(ROW_BASE, False, False)] + ([(ROW_LORA, True, False)] if loras else [])
    if controlnet is not None:
        rows += [(ROW_CONTROL, False, True)] + ([(ROW_LORA_CONTROL, True, True)] if loras else [])
    samples: dict[str, list[Image.Image]] = {}
    if loras:
        from adapterkit.train.pipeline.loras import base_lora_weights, set_base_lora_weights
        before = base_lora_weights(base)
    counted = bar(total=n * len(rows), desc="quality", show=progress)   # one bar, every row's pictures
    try:
        for label, with_lora, with_cn in sorted(rows, key=lambda r: r[1]):    # LoRAs off, then on
            if loras:
                set_base_lora_weights(base, loras if with_lora else {k: 0.0 for k in loras})
            with folded_loras(base.unet):               # the plain U-Net's speed; restored exactly
                samples[label] = run(controlnet if with_cn else None)
    finally:
        counted.close()
        if loras and before:
            set_base_lora_weights(base, before)
    samples = {label: samples[label] for label, _, _ in rows}
    reports = {label: quality_report(images, scenes, hints) for label, images in samples.items()}
    for label, plain in ((ROW_CONTROL, ROW_BASE), (ROW_LORA_CONTROL, ROW_LORA)):
        if label in reports:
            without = reports[plain]["edge_f1"]
            reports[label]["edge_ratio"] = reports[label]["edge_f1"] / without if without > 0 else None
    for label, plain in ((ROW_LORA, ROW_BASE), (ROW_LORA_CONTROL, ROW_CONTROL)):
        if label in reports:                    # what the LoRA costs the base's shapes, scene by scene
            reports[label] |= shapes_kept(samples[plain], samples[label], scenes)
    return Evaluation(scenes, prompts, seeds, hints, reports, samples, settings)


if __name__ == "__main__":              # python -m train.quality [n] [seed]: print the calibration
    import sys
    print(format_report(calibrate(*(int(a) for a in sys.argv[1:3]))))
