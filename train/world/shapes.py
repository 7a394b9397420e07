"""The embedded default's world: one coloured shape on a plain background, rendered from a seed.

A `Scene` is the whole truth about a picture: which shape (`SHAPES`), its colour and the background
colour (names from `COLOURS`, never the same), where it sits (`center`, fractions of the side), how
big it is (`size`: circumradius as a fraction of the side), its `rotation` in degrees and an optional
`style` (`STYLES`). Everything is in fractions of the image side, so one scene renders at any size;
the tiny base model works at 64 x 64 (`SIZE`).

- `sample_scene(rng, style)` draws a scene from a numpy Generator; `sample_scenes(n, seed, style)`
  draws n from a seed. The shape always lies inside the frame with a margin (`MARGIN`), so the
  image border is pure background (what `train.quality.classify` reads the background from).
- `render(scene, size)` -> PIL RGB. The picture is rasterised at `SUPERSAMPLE` x the size by exact
  point-in-shape tests at subpixel centres and box-averaged down (integer arithmetic): antialiased
  edges, and the same bytes on every run (no font, no platform rasteriser). Scenes come from numpy's
  Generator, whose streams numpy keeps stable in practice but does not promise across versions.
- `caption(scene, trigger)` -> "a red star on a blue background" ("an orange ...");
  with a trigger, "a red star on a blue background, sks": the trigger goes last because the tiny
  base's character-level text encoder has learned absolute positions, and a prefix would move every
  character of the caption off the places the base learned them at (measured on the demo's 16
  scenes: the bundled base's shape accuracy is 0.94 with the trigger last, 0.50 under a "sks, "
  prefix). `train.data.captions.build_caption` sees the trigger as one of the caption's comma-separated
  parts and does not add it again. The caption names content only: the trigger word stands for
  the style.
- `canny_map(scene_or_image, size)` -> the ControlNet hint of the rendered picture (train.canny, its
  lllyasviel thresholds), computed at the size the network sees.
- `render_folder(out_dir, n, seed, ...)` writes a training folder (see its docstring).

Colours are chosen to stay apart: every pair differs by >= 34 in CIE76 Lab and by >= 80 in some RGB
channel (so each pair gives a Canny edge at the default thresholds); black is not a shape or
background colour, because the `outline` style draws black.

Styles, each kept recognisable as shape and colour, for the style-LoRA demo:
- "outline": a thick black band along the inside of the boundary (`OUTLINE_WIDTH` x the side, the
  same pen for every shape), drawn inside so the silhouette is the same shape.
- "stripes": diagonal stripes (lines of constant x + y, period `STRIPE_PERIOD` x the side) of the
  shape colour darkened to `STRIPE_SHADE`, covering `STRIPE_DUTY` of the area, so the colour
  itself stays the majority of the shape.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from adapterkit.train.data.canny import HIGH, LOW, SETTINGS_KEY, canny
from adapterkit.train.images import write_png
from adapterkit.unet import atomic_write

SIZE = 64                      # the tiny base model's pixel size
SUPERSAMPLE = 4                # rasterised at 4x, box-averaged down

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "cyan": (40, 200, 220),
    "blue": (35, 75, 215),
    "purple": (150, 45, 175),
    "white": (240, 240, 240),
}
STYLES = ("outline", "stripes")
OUTLINE_RGB = (0, 0, 0)

SIZE_RANGE = (0.2, 0.4)        # circumradius / side
MARGIN = 0.04                  # shape to frame, / side: the border ring is background only
STAR_INNER = 0.5               # star inner radius / outer radius
CROSS_ARM = 1 / 3              # cross arm width / arm span
OUTLINE_WIDTH = 0.045          # outline band / side (2.9 px at 64)
STRIPE_PERIOD = 0.1            # stripe period (perpendicular to the stripes) / side
STRIPE_DUTY = 0.4              # share of each period that is dark
STRIPE_SHADE = 0.5             # dark stripe = shape colour x this

# Rotational symmetry in degrees: rotations are drawn in [0, symmetry), so equal pictures are equal
# scenes. The circle's rotation is always 0.
SYMMETRY = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "hexagon": 60.0,
            "cross": 90.0}


@dataclass(frozen=True)
class Scene:
    """One picture of the world. Lengths are fractions of the image side; `center` is (x, y) from
    the top-left corner; `rotation` is in degrees, clockwise on screen."""
    shape: str
    colour: str
    background: str
    center: tuple[float, float]
    size: float
    rotation: float = 0.0
    style: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        for what, name in (("colour", self.colour), ("background", self.background)):
            if name not in COLOURS:
                raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(COLOURS)}")
        if self.colour == self.background:
            raise ValueError(f"shape and background are both {self.colour}: the shape would be invisible")
        if self.style is not None and self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; expected None or one of {', '.join(STYLES)}")
        object.__setattr__(self, "center", tuple(float(c) for c in self.center))
        if not 0 < self.size < 0.5 - MARGIN:
            raise ValueError(f"size (circumradius / side) must be in (0, {0.5 - MARGIN}), got {self.size}")
        cx, cy = self.center
        lo, hi = self.size + MARGIN, 1 - self.size - MARGIN
        if not (lo <= cx <= hi and lo <= cy <= hi):
            raise ValueError(f"a {self.shape} of size {self.size} at {self.center} leaves the frame "
                             f"(or its {MARGIN} margin): the center must lie in [{lo:.3f}, {hi:.3f}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(**{**d, "center": tuple(d["center"])})


# -- sampling and captions ------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, style: str | None = None) -> Scene:
    """A random scene: shape, colour and background uniform (background != colour), size uniform in
    `SIZE_RANGE`, center uniform where the shape fits, rotation uniform over its symmetry."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    others = [c for c in names if c != colour]
    background = others[rng.integers(len(others))]
    size = float(rng.uniform(*SIZE_RANGE))
    lo, hi = size + MARGIN, 1 - size - MARGIN
    center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
    rotation = float(rng.uniform(0, SYMMETRY[shape])) if SYMMETRY[shape] else 0.0
    return Scene(shape, colour, background, center, size, rotation, style)


def sample_scenes(n: int, seed: int, style: str | None = None) -> list[Scene]:
    """`n` scenes from `seed`: the same list on every run and machine."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, style) for _ in range(n)]


def caption(scene: Scene, trigger: str | None = None) -> str:
    """"a red star on a blue background"; with a trigger, "a red star on a blue background, trigger"."""
    text = (f"{_article(scene.colour)} {scene.colour} {scene.shape} on {_article(scene.background)} "
            f"{scene.background} background")
    return f"{text}, {trigger}" if trigger else text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# -- geometry -------------------------------------------------------------------------------------


def _regular(n: int, radius: float, angle0: float) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon around the origin, the first at angle0 (radians, 0 = up,
    clockwise on screen since y points down)."""
    # math.sin/cos, not numpy's: numpy may dispatch to SIMD versions that differ in the last bit.
    a = [angle0 + 2 * math.pi * k / n for k in range(n)]
    return np.array([[radius * math.sin(t), -radius * math.cos(t)] for t in a])


def _pieces(shape: str, radius: float, rotation: float) -> list[np.ndarray]:
    """The shape as a union of convex polygons (clockwise on screen), centred on the origin; the
    circle is handled apart. Every shape's farthest point is at `radius`."""
    r = math.radians(rotation)
    if shape == "square":
        return [_regular(4, radius, r + math.pi / 4)]                    # edges axis-aligned at 0
    if shape == "triangle":
        return [_regular(3, radius, r)]                                # a vertex up at 0
    if shape == "hexagon":
        return [_regular(6, radius, r)]
    if shape == "star":                                                # five points, one up at 0
        outer = _regular(5, radius, r)
        inner = _regular(5, radius * STAR_INNER, r + math.pi / 5)
        tips = [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
        return [inner] + tips
    if shape == "cross":                                               # a plus sign, two bars
        half = radius / math.hypot(1, CROSS_ARM)                       # arm tip corner at `radius`
        w = half * CROSS_ARM
        bar = np.array([[-half, -w], [half, -w], [half, w], [-half, w]])
        c, s = math.cos(r), math.sin(r)
        rot = np.array([[c, s], [-s, c]])                              # clockwise on screen
        return [bar @ rot, bar[:, ::-1] @ rot]
    raise ValueError(f"no geometry for shape {shape!r}")


def _convex_mask(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Points inside a convex polygon (any winding): on the same side of every edge."""
    sides = []
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        sides.append((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0))
    sides = np.stack(sides)
    return (sides >= 0).all(0) | (sides <= 0).all(0)


def shape_mask(scene: Scene, size: int = SIZE, supersample: int = 1) -> np.ndarray:
    """(size * supersample)^2 bool mask of the shape, sampled at subpixel centres."""
    n = size * supersample
    mask = np.zeros((n, n), dtype=bool)
    radius = scene.size * size
    cx, cy = scene.center[0] * size, scene.center[1] * size
    # Only the square around the circumcircle can be inside (and it lies inside the frame).
    x0, y0 = (max(0, math.floor((c - radius) * supersample)) for c in (cx, cy))
    x1, y1 = (min(n, math.ceil((c + radius) * supersample) + 1) for c in (cx, cy))
    xs = (np.arange(x0, x1) + 0.5) / supersample - cx                   # pixel units of `size`
    ys = (np.arange(y0, y1) + 0.5) / supersample - cy
    ys, xs = np.meshgrid(ys, xs, indexing="ij")                         # (h, w) each, shape-centred
    if scene.shape == "circle":
        inside = xs * xs + ys * ys <= radius * radius
    else:
        inside = np.zeros(xs.shape, dtype=bool)
        for poly in _pieces(scene.shape, radius, scene.rotation):
            inside |= _convex_mask(xs, ys, poly)
    mask[y0:y1, x0:x1] = inside
    return mask


# -- rendering ------------------------------------------------------------------------------------


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (in mask pixels) from each mask pixel to the nearest outside pixel."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as a size x size RGB image; byte-identical for equal (scene, size)."""
    if size < 8:
        raise ValueError(f"size must be >= 8 px, got {size}")
    s = SUPERSAMPLE
    mask = shape_mask(scene, size, s)                                  # (size*s, size*s)
    palette = np.array([COLOURS[scene.background], COLOURS[scene.colour], OUTLINE_RGB,
                        [round(c * STRIPE_SHADE) for c in COLOURS[scene.colour]]], dtype=np.uint32)
    label = mask.astype(np.uint8)                                      # 0 background, 1 shape
    if scene.style == "outline":
        band = OUTLINE_WIDTH * size * s                                # in supersampled pixels
        label[mask & (_inner_distance(mask) <= band)] = 2
    elif scene.style == "stripes":
        coords = (np.arange(size * s) + 0.5) / s
        u = (coords[:, None] + coords[None, :]) / math.sqrt(2)         # distance across the stripes
        dark = np.mod(u / (STRIPE_PERIOD * size), 1.0) < STRIPE_DUTY
        label[mask & dark] = 3
    hi = palette[label]                                                # (size*s, size*s, 3)
    total = hi.reshape(size, s, size, s, 3).sum(1).sum(2)              # (size, size, 3) box filter
    lo = (total + s * s // 2) // (s * s)                               # integer mean, rounded
    return Image.fromarray(lo.astype(np.uint8), "RGB")


def canny_map(scene_or_image: Scene | Image.Image | np.ndarray, size: int = SIZE,
              low: float = LOW, high: float = HIGH) -> Image.Image:
    """The Canny hint (RGB, 0/255) of a scene rendered at `size`, or of an image as given."""
    image = render(scene_or_image, size) if isinstance(scene_or_image, Scene) else scene_or_image
    return canny(image, low, high)


# -- folders --------------------------------------------------------------------------------------

SCENES_NAME = "scenes.jsonl"          # one Scene per line, in file order; written last
_OURS = re.compile(r"\d{5,}\.(png|txt)")


def _write_text(path: Path, text: str) -> None:
    atomic_write([(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))])


def _stale(folder: Path, overwrite: bool, what: str) -> list[Path]:
    """Refuse a non-empty folder; with `overwrite`, list what an earlier render_folder wrote there."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{what} {folder} exists and is not a folder")
    entries = sorted(folder.iterdir()) if folder.exists() else []
    if entries and not overwrite:
        raise FileExistsError(f"{what} {folder} is not empty ({len(entries)} entries); pass "
                              "overwrite=True to replace an earlier render, or choose an empty folder")
    return [p for p in entries if p.is_file() and (_OURS.fullmatch(p.name) or p.name == SCENES_NAME)]


def render_folder(out_dir: str | os.PathLike, n: int, seed: int, style: str | None = None,
                  trigger: str | None = None, with_edges: bool = False, *, size: int = SIZE,
                  overwrite: bool = False) -> list[Scene]:
    """Render `n` scenes from `seed` into a training folder and return them.

    `out_dir/00000.png` + `00000.txt` (the caption, with the trigger if given) per scene, then
    `scenes.jsonl` (the Scene of each file, one JSON object per line: the ground truth for
    `train.quality`). With `with_edges`, the Canny hint of each image goes to the sibling folder
    `<out_dir>_canny/00000.png` (same basename; thresholds in the PNG's `adapterkit.canny` text,
    as `adapterkit canny` writes them). Not a subfolder: `train.data` scans subfolders, and would
    train on the edge maps as images.

    A non-empty target folder is refused unless `overwrite`, which first deletes the files an
    earlier render wrote there (numbered PNG/TXT files and scenes.jsonl) and leaves anything else.
    Each file is written atomically (temp file + rename); `scenes.jsonl`, written last, marks a
    finished folder.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(os.path.abspath(out_dir))
    edges = out.with_name(out.name + "_canny") if with_edges else None
    stale = _stale(out, overwrite, "output folder")
    if edges is not None:
        stale += _stale(edges, overwrite, "edge folder")
    for p in sorted(stale, key=lambda p: p.name != SCENES_NAME):    # unfinished from the first unlink
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(n, seed, style)
    width = max(5, len(str(n - 1)))
    text = {SETTINGS_KEY: json.dumps({"low": LOW, "high": HIGH, "blur": None, "opencv": cv2.__version__})}
    for i, scene in enumerate(scenes):
        name = f"{i:0{width}d}"
        image = render(scene, size)
        write_png(image, out / f"{name}.png")
        _write_text(out / f"{name}.txt", caption(scene, trigger))
        if edges is not None:
            write_png(canny(image), edges / f"{name}.png", text=text)
    _write_text(out / SCENES_NAME, "".join(json.dumps(s.to_dict()) + "\n" for s in scenes))
    return scenes


def load_scenes(folder: str | os.PathLike) -> list[Scene]:
    """The scenes a `render_folder` call wrote, in file order."""
    path = Path(folder) / SCENES_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a finished render_folder output")
    return [Scene.from_dict(json.loads(line)) for line in path.read_text("utf-8").splitlines() if line]
