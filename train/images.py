"""PNGs a person looks at: sample grids and the loss curve, drawn with Pillow alone.

- `tensor_to_pil(t, value_range=(-1, 1))`: a CHW (or HW) tensor -> RGB (or L) image. The range is
  an argument, never guessed: [-1, 1] is what the VAE decodes and `train.data.to_tensor` gives;
  pass (0, 1) for ControlNet hints and edge maps. Values outside the range are clipped; NaN/inf
  raise, since a sample with them means the run is broken.
- `make_grid` / `save_grid`: images in a rows x cols grid with optional row labels (left), column
  labels (top) and a title, in Pillow's default font (`ImageFont.load_default`). Geometry, which
  the tests rely on: width = left margin + cols * cell_w + (cols - 1) * gap, height = title band +
  column-label band + rows * cell_h + (rows - 1) * gap, where the cell is the largest image (smaller
  ones are centred) and each margin or band is 0 when its labels are absent.
- `loss_curve_png`: a line plot with a frame, grid, tick labels, the raw losses (light) and an EMA
  of them (dark), linear or log y. Non-finite losses (and non-positive ones on a log axis) are
  skipped, counted, logged and noted on the plot: a curve is a diagnosis aid, it must not crash on
  the run it is diagnosing.
- `write_png`: the atomic write every PNG here goes through (temp file beside the target, fsync,
  os.replace), so a reader never sees half a file and an old file survives a failed write.
  `write_image` is the same for a picture whose format the file name says (`image_format`: .png,
  .jpg/.jpeg, .webp); `save_grid` goes through it, so `-o grid.jpg` holds JPEG bytes.
- `read_image`: a picture named on the command line (a ControlNet hint), read the way the training
  scan reads images (`train.data.folder.decode_image`: allow-listed decoders, the pixel count checked
  on the header before any pixel is decoded, a full decode so a truncated file fails now, EXIF
  orientation applied); every problem is a ValueError naming the file and what to do.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from adapterkit.unet import atomic_write

logger = logging.getLogger(__name__)

ImageLike = Image.Image | torch.Tensor | np.ndarray

# Limits for a picture given on the command line. A hint the size of the largest sample we would
# draw (4096 x 4096) decodes to 50 MB; a 291 KB PNG can declare 10000 x 10000 (300 MB, 3.9 GB once
# converted to floats), so the size is checked on the header, before decoding.
MAX_PICTURE_PIXELS = 4096 * 4096
MAX_PICTURE_BYTES = 256 << 20


# -- conversion and writing -----------------------------------------------------------------------


def unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) in [0, 1] (uint8 / 255, the ControlNet hint range)."""
    a = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))   # (H, W, 3)
    return a.permute(2, 0, 1).float().div_(255.0)                                    # (3, H, W)


def tensor_to_pil(t: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    """(3, H, W) -> RGB, (1, H, W) or (H, W) -> L; a leading batch dim of 1 is dropped.
    Float values map linearly from `value_range` to 0..255 (rounded, clipped); uint8 is taken as is."""
    x = t.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]                                                      # (1, H, W)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3, H, W), (1, H, W) or (H, W) tensor, got shape {tuple(t.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(f"image tensor holds {bad} NaN/inf values; refusing to draw it")
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        x = ((x - lo) / (hi - lo)).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    a = x.permute(1, 2, 0).numpy()                                       # (H, W, C)
    return Image.fromarray(a[..., 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


# The formats a grid or picture may be written in, by the output's suffix (lower case).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# JPEG/WebP quality for grids: high enough that thin outlines and labels stay crisp.
LOSSY_QUALITY = 95


def image_format(path: str | os.PathLike, what: str = "output") -> str:
    """Pillow's format name for writing `path`, by its suffix; a ValueError naming `what` (e.g. "-o")
    for a suffix that is not one of IMAGE_FORMATS, so a caller can refuse it before any work."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{what} {path}: cannot tell the picture format from {suffix or 'no suffix'!r}; "
                         f"end the name in one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def write_image(image: Image.Image, path: str | os.PathLike, *, text: dict[str, str] | None = None) -> Path:
    """Save `image` atomically in the format its suffix names (`image_format`); `text` goes into PNG
    tEXt chunks and is dropped for the other formats."""
    fmt = image_format(path)
    if fmt == "PNG":
        return write_png(image, path, text=text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image.convert("RGB")
    atomic_write([(path, lambda tmp: rgb.save(tmp, format=fmt, quality=LOSSY_QUALITY))])
    return path


def write_png(image: Image.Image, path: str | os.PathLike, *, text: dict[str, str] | None = None) -> Path:
    """Save `image` as PNG at `path` atomically; `text` goes into tEXt chunks (e.g. settings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    # A dot name: a leftover temp file is "hidden" to train.data's scan, never trained on.
    atomic_write([(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))])
    return path


def read_image(path: str | os.PathLike, what: str = "image", *, max_pixels: int = MAX_PICTURE_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The picture file at `path` as an upright 8-bit RGB image (transparent pixels on `background`).
    `what` names the argument in messages (e.g. "--hint"). Raises FileNotFoundError when it is
    missing, ValueError for a folder, a file that is too big, not an image, truncated or damaged."""
    from adapterkit.train.data.folder import FORMATS, BadImage, decode_image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a picture file ({', '.join(FORMATS)})")
    try:
        size = path.stat().st_size
        if size > MAX_PICTURE_BYTES:
            raise ValueError(f"{what} {path} is {size / 2**20:.0f} MiB, over the {MAX_PICTURE_BYTES >> 20} "
                             "MiB a picture file may have here; give a smaller PNG or JPEG")
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    try:
        image, _ = decode_image(data, ext=path.suffix.lower(), max_pixels=max_pixels, background=background)
    except BadImage as e:
        remedy = {"too_large": f"resize it to at most {max_pixels / 1e6:.1f} Mpx (e.g. 4096 x 4096)",
                  "corrupt": "the file is truncated or damaged; make or download it again",
                  "unreadable": f"give a {'/'.join(FORMATS)} picture"}.get(e.reason, "convert it to RGB PNG")
        raise ValueError(f"{what} {path} cannot be used: {e.detail}; {remedy}") from None
    return image


def _to_image(x: ImageLike, value_range: tuple[float, float]) -> Image.Image:
    if isinstance(x, Image.Image):
        return x if x.mode in ("RGB", "L") else x.convert("RGB")
    if isinstance(x, torch.Tensor):
        return tensor_to_pil(x, value_range)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:                # HWC or HW, as Pillow's
        return Image.fromarray(x)
    raise TypeError(f"expected a PIL image, a CHW tensor or a uint8 HWC array, got {type(x).__name__}")


# -- text -----------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font; scalable when Pillow has FreeType (Pillow >= 10.1), else its bitmap."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):     # old Pillow, or built without FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    l, t, r, b = draw.multiline_textbbox((0, 0), text, font=font)
    return r - min(l, 0), b - min(t, 0)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_w: int) -> str:
    """`text` with each line cut (ending in "...") to fit `max_w` pixels."""
    out = []
    for line in text.split("\n"):
        if _text_size(draw, line, font)[0] > max_w:
            while line and _text_size(draw, line + "...", font)[0] > max_w:
                line = line[:-1]
            line += "..."
        out.append(line)
    return "\n".join(out)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_w: int, max_lines: int = 6) -> str:
    """`text` broken at spaces into lines of at most `max_w` pixels (a word longer than a line is cut
    with "..."), at most `max_lines` lines, the last one ending in "..." when text was left out."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and _text_size(draw, trial, font)[0] > max_w:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    if cut:
        lines[-1] += " ..."
    return _fit(draw, "\n".join(lines), font, max_w)


# -- grids ----------------------------------------------------------------------------------------


def make_grid(images: Sequence[ImageLike | None], rows: int, cols: int, *,
              row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
              title: str | None = None, footer: str | None = None,
              value_range: tuple[float, float] = (-1.0, 1.0), gap: int = 0,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Images in row-major order (None leaves a cell empty) as one labelled RGB image. Labels are
    wrapped, not cut (row labels up to two cells wide, column labels a cell wide); `footer` (e.g. the
    sampling settings) is written under the grid in a smaller font. Tensors are read in
    `value_range`: (-1, 1) for decoded samples, (0, 1) for hints."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows} x {cols}")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows} x {cols} grid")
    for name, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name[:3]}s")
    cells = [None if x is None else _to_image(x, value_range) for x in images]
    if all(c is None for c in cells):
        raise ValueError("no images to put in the grid")
    cw = max(c.width for c in cells if c)
    ch = max(c.height for c in cells if c)

    font = _font(int(min(max(10, ch // 12), 28)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))                       # for measuring only
    pad = max(3, font.size // 3 if hasattr(font, "size") else 3)
    rlabels = [_wrap(draw, str(s), font, max(2 * cw, 120)) for s in row_labels] if row_labels else None
    clabels = [_wrap(draw, str(s), font, cw - 2 * pad, 3) for s in col_labels] if col_labels else None
    left = max(_text_size(draw, s, font)[0] for s in rlabels) + 2 * pad if rlabels else 0
    col_band = max(_text_size(draw, s, font)[1] for s in clabels) + 2 * pad if clabels else 0
    grid_w = cols * cw + (cols - 1) * gap
    title = _fit(draw, title, font, left + grid_w - 2 * pad) if title else None
    title_band = _text_size(draw, title, font)[1] + 2 * pad if title else 0
    top = title_band + col_band
    small = _font(max(9, int(font.size * 0.7)) if hasattr(font, "size") else 10)
    footer = _wrap(draw, footer, small, left + grid_w - 2 * pad, 8) if footer else None
    foot_band = _text_size(draw, footer, small)[1] + 2 * pad if footer else 0
    row_h = max([ch] + [_text_size(draw, s, font)[1] + pad for s in rlabels or ()])
    if row_h > ch:                       # wrapped row labels taller than a cell: cells spread out
        gap = max(gap, row_h - ch)

    out = Image.new("RGB", (left + grid_w, top + rows * ch + (rows - 1) * gap + foot_band), background)
    draw = ImageDraw.Draw(out)
    ink = (0, 0, 0) if sum(background) > 3 * 128 else (255, 255, 255)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        r, c = divmod(i, cols)
        x, y = left + c * (cw + gap), top + r * (ch + gap)
        out.paste(cell.convert("RGB"), (x + (cw - cell.width) // 2, y + (ch - cell.height) // 2))
    if title:
        w, _ = _text_size(draw, title, font)
        draw.multiline_text(((out.width - w) // 2, pad), title, fill=ink, font=font, align="center")
    for c, s in enumerate(clabels or ()):           # bottom-aligned: each label sits on its column
        w, h = _text_size(draw, s, font)
        draw.multiline_text((left + c * (cw + gap) + (cw - w) // 2, top - pad - h), s, fill=ink,
                            font=font, align="center")
    for r, s in enumerate(rlabels or ()):
        _, h = _text_size(draw, s, font)
        draw.multiline_text((pad, top + r * (ch + gap) + (ch - h) // 2), s, fill=ink, font=font)
    if footer:
        draw.multiline_text((pad, out.height - foot_band + pad), footer, fill=ink, font=small)
    return out


def save_grid(images: Sequence[ImageLike | None], rows: int, cols: int, path: str | os.PathLike,
              row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
              title: str | None = None, footer: str | None = None, **kwargs) -> Path:
    """`make_grid` written atomically at `path` in the format its suffix names (`write_image`: PNG,
    JPEG or WebP); returns the path."""
    image_format(path)                                  # an unknown suffix fails before the drawing
    grid = make_grid(images, rows, cols, row_labels=row_labels, col_labels=col_labels, title=title,
                     footer=footer, **kwargs)
    return write_image(grid, path)


# -- the loss curve -------------------------------------------------------------------------------

RAW_COLOR = (158, 188, 228)        # light: every step's loss
SMOOTH_COLOR = (16, 60, 150)       # dark: the EMA
GRID_COLOR = (232, 232, 232)
FRAME_COLOR = (70, 70, 70)
NOTE_COLOR = (190, 40, 40)
SUPERSAMPLE = 2                    # drawn at 2x and downsampled: smooth lines without an AA rasteriser


@dataclass(frozen=True)
class LossCurve:
    """What `loss_curve_png` drew. `plot_box` = (left, top, right, bottom) of the axes frame in the
    written image's pixels; `skipped` = values left out (non-finite, or <= 0 on a log axis)."""
    path: Path
    plot_box: tuple[int, int, int, int]
    points: int
    skipped: int
    window: int
    note: str


def ema(values: np.ndarray, window: int) -> np.ndarray:
    """Bias-corrected exponential moving average, alpha = 2 / (window + 1) (pandas' `span`).
    The correction (divide by 1 - beta^n, as Adam does) keeps the first points from being pulled
    toward zero, the artefact of a plain EMA started at 0."""
    if window <= 1 or len(values) == 0:
        return values.astype(np.float64)
    beta = 1.0 - 2.0 / (window + 1)
    out = np.empty(len(values), dtype=np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1.0 - beta) * v
        out[i] = acc / (1.0 - beta ** (i + 1))
    return out


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))


def _linear_ticks(lo: float, hi: float, target: int) -> list[float]:
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    n = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(max(n, 0))]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log10 axis spanning 10**lo .. 10**hi: decades (at most 8), else 1-2-5,
    else 1..9 per decade, else (under a factor of ~2) even steps of the exponent."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** k for k in decades for m in mantissas if lo <= math.log10(m) + k <= hi]
        if len(ticks) >= 3:
            return ticks[::math.ceil(len(ticks) / 8)]
    return ticks if len(ticks) >= 2 else [10.0 ** v for v in _linear_ticks(lo, hi, 4)]


def _tick_label(v: float) -> str:
    if v != 0 and abs(v) >= 1000 and float(v / 1000).is_integer():
        return f"{v / 1000:g}k"
    return f"{v:.4g}"


def loss_curve_png(steps: Sequence[float], losses: Sequence[float], path: str | os.PathLike, *,
                   smooth: int | None = None, title: str | None = None, log_y: bool = False,
                   size: tuple[int, int] = (800, 480)) -> LossCurve:
    """Plot losses against steps as a PNG of `size` (width, height) and return what was drawn.

    `smooth` is the EMA window in points; None picks len/20 (at least 1); <= 1 draws no EMA, and the
    raw line is then drawn dark. Points are drawn in the order given.
    """
    x = _as_array(steps, "steps")
    y = _as_array(losses, "losses")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} steps but {len(y)} losses")
    width, height = size
    if width < 160 or height < 120:
        raise ValueError(f"size {size} is too small for a plot (at least 160 x 120)")
    keep = np.isfinite(x) & np.isfinite(y)
    notes = []
    if (~keep).sum():
        notes.append(f"{int((~keep).sum())} non-finite values skipped")
    if log_y:
        pos = y > 0
        if (keep & ~pos).sum():
            notes.append(f"{int((keep & ~pos).sum())} values <= 0 skipped (log scale)")
        keep &= pos
    x, y = x[keep], y[keep]
    skipped = int((~keep).sum())
    note = "; ".join(notes)
    if note:
        logger.warning("loss curve %s: %s", path, note)
    window = max(1, round(len(y) / 20)) if smooth is None else int(smooth)
    yt = np.log10(y) if log_y else y                                      # plotted values

    s = SUPERSAMPLE
    img = Image.new("RGB", (width * s, height * s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(11 * s)
    line_h = _text_size(draw, "Ag", font)[1]
    pad = 6 * s

    # Value ranges (5% margins, as matplotlib's) and ticks.
    if len(y):
        ylo, yhi = float(yt.min()), float(yt.max())
        xlo, xhi = float(x.min()), float(x.max())
    else:
        ylo, yhi, xlo, xhi = 0.0, 1.0, 0.0, 1.0
    if yhi - ylo < 1e-12:                        # a flat line: show +-10% (a factor 10**0.1 on log)
        half = 0.1 if log_y else max(abs(ylo) * 0.1, 1e-3)
        ylo, yhi = ylo - half, yhi + half
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 1, xhi + 1
    my, mx = 0.05 * (yhi - ylo), 0.02 * (xhi - xlo)
    ylo, yhi, xlo, xhi = ylo - my, yhi + my, xlo - mx, xhi + mx
    yticks = _log_ticks(ylo, yhi) if log_y else _linear_ticks(ylo, yhi, 6)
    xticks = [v for v in _linear_ticks(xlo, xhi, 7) if xlo <= v <= xhi]
    ylabels = [_tick_label(v) for v in yticks]

    # Layout: title band, y tick labels on the left, x tick labels + axis name below.
    top = line_h + 2 * pad                                        # the "loss" label and title
    left = max((_text_size(draw, t, font)[0] for t in ylabels), default=0) + 3 * pad
    bottom = height * s - (2 * line_h + 3 * pad)
    right = width * s - 3 * pad
    box = (left, top, right, bottom)

    def px(v):
        return left + (v - xlo) / (xhi - xlo) * (right - left)

    def py(v):
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    for v, label in zip(yticks, ylabels):
        yy = py(math.log10(v) if log_y else v)
        draw.line([(left, yy), (right, yy)], fill=GRID_COLOR, width=s)
        draw.line([(left - pad // 2, yy), (left, yy)], fill=FRAME_COLOR, width=s)
        w, h = _text_size(draw, label, font)
        draw.text((left - pad - w, yy - h / 2), label, fill=(0, 0, 0), font=font)
    for v in xticks:
        xx = px(v)
        draw.line([(xx, top), (xx, bottom)], fill=GRID_COLOR, width=s)
        draw.line([(xx, bottom), (xx, bottom + pad // 2)], fill=FRAME_COLOR, width=s)
        label = _tick_label(v)
        w, _ = _text_size(draw, label, font)
        draw.text((xx - w / 2, bottom + pad), label, fill=(0, 0, 0), font=font)

    pts = [(px(a), py(b)) for a, b in zip(x, yt)]
    smoothed = window > 1 and len(y) > 1
    if pts:
        draw.line(pts, fill=RAW_COLOR if smoothed else SMOOTH_COLOR, width=s if smoothed else 2 * s,
                  joint="curve")
        if len(pts) == 1:
            (a, b), r = pts[0], 2 * s
            draw.ellipse([a - r, b - r, a + r, b + r], fill=SMOOTH_COLOR)
    if smoothed:
        ys = ema(y, window)
        ys = np.log10(ys) if log_y else ys        # EMA of the losses, not of their logs
        draw.line([(px(a), py(b)) for a, b in zip(x, ys)], fill=SMOOTH_COLOR, width=2 * s, joint="curve")
    draw.rectangle(box, outline=FRAME_COLOR, width=s)

    # Axis names, title, legend, note.
    w, _ = _text_size(draw, "step", font)
    draw.text(((left + right - w) / 2, bottom + 2 * pad + line_h), "step", fill=(0, 0, 0), font=font)
    ylabel = "loss (log scale)" if log_y else "loss"
    draw.text((pad, pad), ylabel, fill=(0, 0, 0), font=font)
    if title:
        room = width * s - 2 * (_text_size(draw, ylabel, font)[0] + 2 * pad)
        t = _fit(draw, title, font, room)
        w, _ = _text_size(draw, t, font)
        draw.text(((width * s - w) / 2, pad), t, fill=(0, 0, 0), font=font)
    legend = [("raw", RAW_COLOR), (f"EMA, {window} points", SMOOTH_COLOR)] if smoothed else []
    if legend:
        lw = max(_text_size(draw, t, font)[0] for t, _ in legend) + 6 * pad
        lx, ly = right - lw - pad, top + pad
        draw.rectangle([lx, ly, lx + lw, ly + len(legend) * (line_h + pad) + pad],
                       fill=(255, 255, 255), outline=GRID_COLOR, width=s)
        for i, (t, color) in enumerate(legend):
            yy = ly + pad + i * (line_h + pad) + line_h / 2
            draw.line([(lx + pad, yy), (lx + 4 * pad, yy)], fill=color, width=2 * s)
            draw.text((lx + 5 * pad, yy - line_h / 2), t, fill=(0, 0, 0), font=font)
    if not len(y):
        note = note or "no loss values"
    if note:
        t = _fit(draw, note, font, right - left - 2 * pad)
        w, h = _text_size(draw, t, font)
        draw.text((right - pad - w, bottom - pad - h), t, fill=NOTE_COLOR, font=font)

    out = img.resize((width, height), Image.Resampling.LANCZOS)
    written = write_png(out, path)
    return LossCurve(written, tuple(round(v / s) for v in box), len(y), skipped, window, note)


def _as_array(v, name: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a
