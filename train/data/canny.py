"""Canny edge maps: the ControlNet hint, a folder converter, and the edge-fidelity score.

The hint follows lllyasviel/ControlNet (`annotator/canny`, `gradio_canny2image.py`): `cv2.Canny` on
the 8-bit RGB image with thresholds low=100, high=200 (the Gradio defaults, also diffusers' docs),
3x3 Sobel, L1 gradient, no blur; the one-channel map is repeated to 3 channels (`HWC3`) and divided
by 255, so the network sees a 3-channel edge map with values in {0, 1} ⊂ [0, 1]. `canny()` returns
that map as an image (0/255), `edge_map_tensor()` as the (3, H, W) float tensor. OpenCV's Canny on
a colour image takes, per pixel, the gradient of the channel where it is strongest, so a red/green
border of equal brightness still gives an edge.

The thresholds act on gradient magnitudes of 0..255 pixel values, so the same picture gives another
map at another resolution: compute the map at the size the network is trained at (lllyasviel resizes
first), and record the thresholds with the adapter. `canny_folder` writes them into every PNG it
makes (tEXt chunk `adapterkit.canny`, JSON).

`edge_f1(pred, ref, tolerance_px)` scores a ControlNet sample: Canny of the generated image against
the input edges (`edge_fidelity` does both steps). Precision is the share of predicted edge pixels
within `tolerance_px` (Euclidean) of a reference edge pixel, recall the share of reference pixels
within that distance of a predicted one; each is computed by dilating the other map with a disk of
that radius. This is the usual approximation of the BSDS boundary benchmark (Martin et al., PAMI
2004), which instead matches pixels one-to-one (a bipartite assignment) with a tolerance of 0.75%
of the image diagonal: without the one-to-one constraint a doubled edge next to a single reference
edge counts fully toward precision, so scores here can be slightly higher than BSDS's. The default
tolerance of 2 px absorbs Canny's own one-pixel ambiguity (non-maximum suppression can mark either
side of a step edge) plus a pixel of drift from the VAE.

`adapterkit canny IN_DIR OUT_DIR` converts a folder (subfolders mirrored): `sub/cat.jpg` ->
`OUT_DIR/sub/cat.png`. Inputs are read through `train.data.decode_image`, the training data's
bad-image policy: unreadable, corrupt, too large or unsupported files are skipped and reported;
EXIF rotation, alpha, CMYK and 16-bit are fixed the same way as for training, so the map lines up
with the image the trainer sees. The input folder is only read; the output folder may not be it,
nor lie inside it (nor contain it). Writes are atomic. An existing output is kept unless
`overwrite`. Two inputs with one output name (`a.jpg`, `a.png`) are a clash: the first in name order
wins and the other is reported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from adapterkit.train.data.folder import (
    DECODERS,
    POLICY,
    SYSTEM_NAMES,
    UNSUPPORTED_EXTENSIONS,
    BadImage,
    DataConfig,
    decode_image,
    file_lines,
)
from adapterkit.train.images import write_png

LOW, HIGH = 100, 200          # lllyasviel's gradio_canny2image.py defaults
TOLERANCE_PX = 2
SETTINGS_KEY = "adapterkit.canny"


def _check_settings(low: float, high: float, blur: float | None) -> None:
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    if blur is not None and blur < 0:
        raise ValueError(f"blur is a Gaussian sigma in pixels (>= 0), got {blur}")


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8, read-only use: the caller's array is never written to."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode in ("RGB", "L") else image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))):
        raise ValueError(f"expected a uint8 (H, W, 3) or (H, W) array, got {a.dtype} {a.shape}")
    return a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a


def canny(image: Image.Image | np.ndarray, low: float = LOW, high: float = HIGH,
          blur: float | None = None, *, mode: str = "RGB") -> Image.Image:
    """The Canny edge map of an RGB (or grey) image: 255 on edges, 0 elsewhere.

    `blur` is an optional Gaussian sigma in pixels applied first (None/0: none, as lllyasviel);
    `mode` "RGB" gives the 3-channel hint image, "L" one channel.
    """
    _check_settings(low, high, blur)
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    a = _pixels(image)
    if blur:
        a = cv2.GaussianBlur(a, (0, 0), sigmaX=blur)    # kernel size from sigma (about 6 sigma)
    edges = cv2.Canny(np.ascontiguousarray(a), low, high)                  # (H, W) uint8 0/255
    return Image.fromarray(edges, "L").convert(mode) if mode == "RGB" else Image.fromarray(edges, "L")


def edge_map_tensor(image: Image.Image | np.ndarray, low: float = LOW, high: float = HIGH,
                    blur: float | None = None) -> torch.Tensor:
    """The ControlNet hint: float32 (3, H, W) with 1 on edges, 0 elsewhere."""
    edges = np.asarray(canny(image, low, high, blur, mode="L"))
    t = torch.from_numpy(edges.astype(np.float32) / 255.0)                 # (H, W)
    return t.expand(3, *t.shape).contiguous()                               # (3, H, W)


# -- scoring --------------------------------------------------------------------------------------


def _edge_mask(x) -> np.ndarray:
    """An edge map as a bool (H, W) mask, on where any channel is: > 127 for uint8 (0/255 maps),
    > 0.5 for floats ({0, 1} hints), > 0 for other integers, True for bool.
    Tensors are CHW or HW; arrays and images HWC or HW."""
    if isinstance(x, Image.Image):
        a = np.asarray(x)
    elif isinstance(x, torch.Tensor):
        a = x.detach().cpu().numpy()
        if a.ndim == 3:
            a = a.transpose(1, 2, 0)                                       # (H, W, C)
    else:
        a = np.asarray(x)
    if a.ndim == 3:
        a = a.any(axis=2) if a.dtype == bool else a.max(axis=2)
    if a.ndim != 2:
        raise ValueError(f"expected an edge map (H, W), (H, W, C) or a (C, H, W) tensor, got {a.shape}")
    if a.dtype == bool:
        return a
    if a.dtype == np.uint8:
        return a > 127
    return a > 0 if np.issubdtype(a.dtype, np.integer) else a > 0.5


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2 <= radius * radius).astype(np.uint8)


def edge_f1(pred_edges, ref_edges, tolerance_px: int = TOLERANCE_PX) -> dict[str, float]:
    """Distance-tolerant edge precision, recall and F1 of `pred_edges` against `ref_edges`.

    Both maps may be PIL images, arrays or tensors (see `_edge_mask`); see the module docstring for
    the matching rule. Two empty maps agree perfectly (all 1.0); one empty map scores 0.
    """
    pred, ref = _edge_mask(pred_edges), _edge_mask(ref_edges)
    if pred.shape != ref.shape:
        raise ValueError(f"edge maps differ in size: {pred.shape} vs {ref.shape}")
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if tolerance_px:
        kernel = _disk(int(tolerance_px))
        near_ref = cv2.dilate(ref.astype(np.uint8), kernel).astype(bool)
        near_pred = cv2.dilate(pred.astype(np.uint8), kernel).astype(bool)
    else:
        near_ref, near_pred = ref, pred
    precision = float((pred & near_ref).sum() / n_pred) if n_pred else 0.0
    recall = float((ref & near_pred).sum() / n_ref) if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def edge_fidelity(sample: Image.Image | np.ndarray, hint_edges, low: float = LOW, high: float = HIGH,
                  blur: float | None = None, tolerance_px: int = TOLERANCE_PX) -> dict[str, float]:
    """ControlNet edge fidelity: `edge_f1(canny(sample), hint)`, with the hint's own thresholds.
    A tensor sample from the sampler goes through `train.images.tensor_to_pil` first."""
    return edge_f1(canny(sample, low, high, blur, mode="L"), hint_edges, tolerance_px)


# -- folders --------------------------------------------------------------------------------------


@dataclass
class CannyReport:
    """What `canny_folder` did. `entries` maps a train.data POLICY key (skips and fixes) or
    "name_clash" to the (input path relative to in_dir, detail) pairs."""
    in_dir: Path
    out_dir: Path
    settings: dict
    image_files: int = 0
    written: list[str] = field(default_factory=list)      # output paths relative to out_dir
    kept: list[str] = field(default_factory=list)         # existing outputs left alone
    ignored: int = 0                                      # non-image and hidden files
    entries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, key: str, rel: str, detail: str = "") -> None:
        self.entries.setdefault(key, []).append((rel, detail))

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """(input, reason, detail) for every image file that got no edge map."""
        return [(rel, k, d) for k, v in self.entries.items()
                if k == "name_clash" or POLICY.get(k, ("",))[0] == "skip" for rel, d in v]

    def summary(self, names: int = 5) -> str:
        s = self.settings
        lines = [f"canny (low={s['low']}, high={s['high']}, blur={s['blur']}): {len(self.written)} written, "
                 f"{len(self.kept)} kept (exist; --overwrite replaces them), {len(self.skipped)} skipped, "
                 f"of {self.image_files} image files under {self.in_dir} -> {self.out_dir}"
                 + (f"; {self.ignored} other files ignored" if self.ignored else "")]
        for key, found in self.entries.items():
            action, what = POLICY.get(key, ("skip", "two inputs map to one output name; first kept"))
            lines.append(f"  {action:6} {len(found):5}  {key}: {what}")
            lines += file_lines(found, names)
        return "\n".join(lines)

    __str__ = summary


def _check_dirs(in_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    src, dst = Path(os.path.realpath(in_dir)), Path(os.path.realpath(out_dir))
    if not src.is_dir():
        raise FileNotFoundError(f"input folder {in_dir} " + ("is not a folder" if src.exists()
                                                             else "does not exist"))
    if dst == src or dst.is_relative_to(src):
        where = "the input folder" if dst == src else "inside the input folder"
        raise ValueError(f"output folder {out_dir} is {where} {in_dir}; edge maps would mix with (or "
                         "replace) the images. Choose a folder outside it, e.g. a sibling `<name>_canny`.")
    if src.is_relative_to(dst):
        raise ValueError(f"output folder {out_dir} contains the input folder {in_dir}; outputs could land "
                         "on input files. Choose a folder beside it.")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    return src, dst


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def canny_folder(in_dir: str | os.PathLike, out_dir: str | os.PathLike, low: float = LOW,
                 high: float = HIGH, blur: float | None = None, *, overwrite: bool = False,
                 max_pixels: int = DataConfig.max_pixels, progress: bool = False) -> CannyReport:
    """Write `out_dir/<rel>.png`, the Canny map of each image under `in_dir`; see the module docstring.
    Raises ValueError when the folder holds no image files at all, or for non-integer thresholds."""
    _check_settings(low, high, blur)
    if not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"Canny thresholds must be whole numbers, got low={low}, high={high}: cv2.Canny "
                         "compares them with integer gradients (50.5 acts as 50), and a ControlNet records "
                         "the thresholds of its maps as integers")
    src, dst = _check_dirs(Path(in_dir), Path(out_dir))
    settings = {"low": low, "high": high, "blur": blur, "opencv": cv2.__version__}
    report = CannyReport(src, dst, settings)

    images = []
    for dirpath, dirnames, filenames in os.walk(src):        # symlinked folders are not followed
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in filenames:
            p = Path(dirpath, name)
            ext = p.suffix.lower()
            if _hidden(name):
                report.ignored += 1
            elif ext in DECODERS:
                images.append(p)
            elif ext in UNSUPPORTED_EXTENSIONS:
                report.image_files += 1
                report.add("unsupported", p.relative_to(src).as_posix(), f"no {ext} decoder; convert to PNG")
            else:
                report.ignored += 1
    images.sort(key=lambda p: p.relative_to(src).as_posix())
    report.image_files += len(images)
    if not report.image_files:
        raise ValueError(f"no images found under {in_dir} ({report.ignored} other files); expected "
                         f"{'/'.join(sorted(DECODERS))} files")

    claimed: dict[str, str] = {}                            # output rel -> the input that has it
    text = {SETTINGS_KEY: json.dumps(settings)}
    if progress:
        from adapterkit.train.console import bar
        images = bar(images, desc="canny", unit="img")
    for path in images:
        rel = path.relative_to(src).as_posix()
        out_rel = Path(rel).with_suffix(".png").as_posix()
        if out_rel in claimed:
            report.add("name_clash", rel, f"{out_rel} is already made from {claimed[out_rel]}")
            continue
        target = dst / out_rel
        if target.exists() and not overwrite:
            claimed[out_rel] = rel
            report.kept.append(out_rel)
            continue
        try:
            image, fixes = decode_image(path.read_bytes(), ext=path.suffix.lower(), max_pixels=max_pixels)
        except BadImage as e:
            report.add(e.reason, rel, e.detail)
            continue
        except OSError as e:
            report.add("unreadable", rel, f"{type(e).__name__}: {e.strerror or e}")
            continue
        for fix in fixes:
            report.add(fix, rel)
        claimed[out_rel] = rel
        write_png(canny(image, low, high, blur), target, text=text)
        report.written.append(out_rel)
    return report
