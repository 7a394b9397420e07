"""A content-keyed cache of VAE latents and text embeddings on disk.

    cache = LatentCache(output_dir / "cache", base.fingerprint)
    stats = cache.build(dataset, base)                   # {"hits": 40, "encoded": 2, ...}
    latents = cache.latents(base, batch, data_cfg, generator)   # a training batch, from the cache
    text = cache.text(base, batch["caption"])            # unet.Conditioning (context, pooled)

Keys (DESIGN.md §4: edits invalidate exactly the changed entries). An image entry is keyed by the
SHA-256 of the image file's bytes (the scan's `ImageRecord.sha256`) and everything that changes
its latent: the bucket size, the crop box, the flip, the background that transparent pixels are
composited onto (`data.alpha_background`), the VAE fingerprint (weights + config) and the VAE's
dtype; choices made in code (resampling filter, pixel scaling) are covered by CACHE_VERSION. A text
entry by the caption text, the text-encoder fingerprint (weights + config +
tokenizer), the token length and the encoder's dtype. Re-saving an image with one pixel changed, a
new resolution (new buckets) or another VAE therefore re-encodes exactly the entries it touches;
captions stay cached across VAE and resolution changes and vice versa.

Storage: one safetensors file per entry, `root/images/ab/<key>.safetensors` and
`root/texts/ab/<key>.safetensors`. Image entries hold the VAE posterior's `mean` and `logvar`
(encoding.py says why the moments and not a sample), text entries the text part of the
conditioning record: `embedding` (the context, L x D) and the other fields a family's text encoding
sets (`pooled`) under their own names. Each file's
metadata repeats its key, what it was made from and a SHA-256 of its tensor bytes. Writes are
atomic (temp file + fsync + rename, `unet.write_safetensors`). On read an entry that does not load,
holds another key, has the wrong shapes, fails its checksum or is not finite is corrupt: it is
deleted with a warning and encoded again, never returned.

The cache lives under the run's output folder; `build` refuses a root inside the image folder,
which it only reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from adapterkit.train.console import bar
from adapterkit.train.data.buckets import Crop, plan_crop
from adapterkit.train.data.captions import build_caption
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, to_tensor
from adapterkit.train.pipeline.base import BaseModel, Fingerprint
from adapterkit.train.pipeline.encoding import encode_moments, encode_text, moments_to_latents
from adapterkit.train.pipeline.transfer import conditioning_to_device, stack_to_device
from adapterkit.unet import Conditioning, write_safetensors

logger = logging.getLogger(__name__)

CACHE_VERSION = 1           # bump when an entry's meaning changes; old entries then simply miss
_KEY_META = "adapterkit.cache_key"
_ENTRY_META = "adapterkit.cache_entry"
_CHECKSUM_META = "adapterkit.checksum"

Progress = Callable[[str, int, int], None]      # (kind "images"|"texts", done, total): 0, then per batch


def check_cacheable(data) -> None:
    """The training jobs always train from cached latents: fail, before any model loads, on data
    settings whose latents cannot be cached."""
    if data.random_crop:
        raise ValueError("data.random_crop=true draws a new crop every epoch, so its latents cannot be "
                         "cached, and training always uses the latent cache (each image is encoded once, "
                         "not every epoch). Set data.random_crop: false: each image is center-cropped to "
                         "its aspect-ratio bucket, and data.flip: true adds its mirror image.")


class LatentCache:
    """Latents and text embeddings for one base model's VAE and text encoder, on disk under `root`."""

    def __init__(self, root: str | os.PathLike, base_fingerprint: Fingerprint, memory_mb: int = 0):
        self.root = Path(root)
        self.fingerprint = base_fingerprint
        self.corrupt = 0          # corrupt entries found (and removed) since this object was made
        # Entries read and checked (or written) once, kept for the run: a training step then opens no
        # file and hashes no bytes. Up to `memory_mb`; past it, entries are read from disk each time.
        self._memory: dict[str, dict[str, Tensor]] = {}
        self._memory_room = memory_mb * 2**20

    # -- keys -----------------------------------------------------------------------------------

    def image_key(self, sha256: str, crop: Crop, dtype: torch.dtype,
                  background: Sequence[int] = (255, 255, 255)) -> tuple[str, dict]:
        """(key, description) of the latent of image bytes `sha256` under `crop`, decoded with
        transparent pixels on `background`, encoded by the VAE in `dtype`."""
        what = {"kind": "image", "version": CACHE_VERSION, "sha256": sha256, "bucket": list(crop.bucket),
                "box": [float(x) for x in crop.box], "flip": bool(crop.flip),
                "background": [int(c) for c in background],
                "vae": self.fingerprint.vae or "pixels", "dtype": str(dtype).removeprefix("torch.")}
        return "img-" + _digest(what), what

    def text_key(self, caption: str, max_length: int, dtype: torch.dtype, layer: str = "last"
                 ) -> tuple[str, dict]:
        """(key, description) of a caption's text conditioning; `layer`: which hidden states of each
        text encoder it holds ("last"; SDXL's two: "penultimate,penultimate")."""
        what = {"kind": "text", "version": CACHE_VERSION, "caption": caption,
                "text_encoder": self.fingerprint.text_encoder, "max_length": max_length,
                "layer": layer, "dtype": str(dtype).removeprefix("torch.")}
        return "txt-" + _digest(what), what

    def _text_key(self, base: BaseModel, caption: str) -> tuple[str, dict]:
        layer = ",".join(part.spec.layer for part in base.text)
        return self.text_key(caption, base.max_length, base.text_encoder.dtype, layer)

    def path(self, key: str) -> Path:
        kind, digest = key.split("-", 1)
        return self.root / {"img": "images", "txt": "texts"}[kind] / digest[:2] / f"{digest}.safetensors"

    # -- entries --------------------------------------------------------------------------------

    def get(self, key: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor] | None:
        """The entry's tensors, or None when it is absent or corrupt (a corrupt file is removed with
        a warning). `shapes` is what the entry must hold: names and shapes."""
        kept = self._memory.get(key)
        if kept is not None:                                  # checked when it was read or written
            return kept
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                # copied out: safetensors maps the file, and a mapped tensor outlives no truncation
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        except Exception as e:  # any failure to read a derived file means: encode it again
            return self._corrupt(path, f"unreadable ({type(e).__name__}: {str(e)[:120]})")
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        wanted = {k: tuple(s) for k, s in shapes.items()}
        if meta.get(_KEY_META) != key:
            return self._corrupt(path, "it holds another entry's key")
        if found != wanted:
            return self._corrupt(path, f"tensors {found}, expected {wanted}")
        if meta.get(_CHECKSUM_META) != _checksum(tensors):
            return self._corrupt(path, "checksum mismatch")
        if not all(torch.isfinite(v).all() for v in tensors.values()):
            return self._corrupt(path, "NaN/inf values")
        return self._remember(key, tensors)

    def put(self, key: str, tensors: Mapping[str, Tensor], what: Mapping | None = None) -> Path:
        """Write an entry atomically; `what` (the key's description) is stored for inspection."""
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        path = self.path(key)
        write_safetensors(tensors, path, {_KEY_META: key, _ENTRY_META: json.dumps(what or {}),
                                          _CHECKSUM_META: _checksum(tensors)})
        self._remember(key, tensors)
        return path

    def _remember(self, key: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if key not in self._memory and size <= self._memory_room:
            self._memory[key] = tensors
            self._memory_room -= size
        return tensors

    def _corrupt(self, path: Path, why: str) -> None:  # returns None: "not cached"
        self.corrupt += 1
        warnings.warn(f"latent cache: {path} is corrupt ({why}); it is deleted and encoded again",
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None

    # -- shapes of one base's entries ----------------------------------------------------------

    def _image_shapes(self, base: BaseModel, bucket: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        f, c = base.latent_scale, base.latent_channels
        shape = (c, bucket[1] // f, bucket[0] // f)                 # (C, h, w); bucket is (w, h)
        return {"mean": shape} if base.vae is None else {"mean": shape, "logvar": shape}

    def _text_shapes(self, base: BaseModel) -> dict[str, tuple[int, ...]]:
        """The context (tokens, the encoders' widths added up) and, where an encoder is pooled, its
        projected pooled vector (SDXL: (77, 2048) and (1280,))."""
        shapes = {"embedding": (base.max_length, base.context_dim)}
        for part in base.text:
            if part.spec.pooled:
                shapes["pooled"] = (part.model.config.projection_dim,)
        return shapes

    def _image_dtype(self, base: BaseModel) -> torch.dtype:
        return base.vae.dtype if base.vae is not None else torch.float32

    def _check_base(self, base: BaseModel) -> None:
        if base.fingerprint != self.fingerprint:
            raise ValueError(f"this cache was opened for the base model ({self.fingerprint}), not for "
                             f"({base.fingerprint}); open a LatentCache with base.fingerprint")

    # -- building -------------------------------------------------------------------------------

    def build(self, dataset: CaptionedImageFolder, base: BaseModel, *, batch_size: int = 8,
              progress: Progress | None = None) -> dict[str, int]:
        """Encode every latent and caption embedding `dataset` can ask for that is not cached yet.

        Images: the center crop in the record's bucket, and its mirror when `data.flip` is on (the
        dataset picks one per epoch). Captions: "trigger, caption", and "" when caption dropout is
        on. `data.random_crop` draws a new box every epoch, so it cannot be cached: ValueError.
        Batches hold one bucket each. Returns counts: hits, encoded (both kinds), image_hits,
        image_encoded, text_hits, text_encoded, corrupt (found and re-encoded).
        Raises ValueError naming the image when the VAE gives NaN/inf latents (reliability.md C7).
        """
        parts = getattr(dataset, "parts", None)        # several datasets (datasets_list.DatasetList)
        if parts is not None:
            totals: dict[str, int] = {}
            for part in parts:
                for k, v in self.build(part, base, batch_size=batch_size, progress=progress).items():
                    totals[k] = totals.get(k, 0) + v
            return totals
        self._check_base(base)
        cfg = dataset.cfg
        data_root = Path(dataset.report.root if dataset.report else cfg.root).resolve()
        if self.root.resolve().is_relative_to(data_root):
            raise ValueError(f"the latent cache {self.root} is inside the image folder {data_root}; put it "
                             "under the output folder (the image folder is only ever read)")
        check_cacheable(cfg)
        corrupt_before = self.corrupt
        report = progress or _Bars()

        # images: (index, crop) -> key; one entry per distinct key
        dtype, jobs = self._image_dtype(base), {}
        for i, rec in enumerate(dataset.records):
            bucket = dataset.bucket_of[i]
            crop = plan_crop(rec.size, bucket)
            for c in (crop, dataclasses.replace(crop, flip=True)) if cfg.flip else (crop,):
                key, what = self.image_key(rec.sha256, c, dtype, cfg.alpha_background)
                jobs.setdefault(key, (i, c, what))
        missing = [(k, *job) for k, job in jobs.items()
                   if self.get(k, self._image_shapes(base, job[1].bucket)) is None]
        image_hits = len(jobs) - len(missing)
        missing.sort(key=lambda m: (m[2].bucket, m[1]))       # batches of one bucket, images in order
        done = 0
        if missing:
            report("images", 0, len(missing))
        for batch in _batches(missing, batch_size, lambda m: m[2].bucket):
            self._encode_images(base, dataset, batch)
            done += len(batch)
            report("images", done, len(missing))

        # texts
        captions = {build_caption(rec.caption, cfg.trigger, 0.0, None, trigger_at=cfg.trigger_at)
                    for rec in dataset.records}
        if cfg.caption_dropout > 0:
            captions.add("")
        text_hits, text_encoded = self._ensure_texts(base, sorted(captions), batch_size, report)

        stats = {"image_hits": image_hits, "image_encoded": len(missing),
                 "text_hits": text_hits, "text_encoded": text_encoded,
                 "corrupt": self.corrupt - corrupt_before}
        stats["hits"] = image_hits + text_hits
        stats["encoded"] = len(missing) + text_encoded
        logger.info("latent cache %s: %d images and %d captions cached, %d + %d encoded now%s", self.root,
                    image_hits, text_hits, len(missing), text_encoded,
                    f", {stats['corrupt']} corrupt entries replaced" if stats["corrupt"] else "")
        return stats

    def _encode_images(self, base: BaseModel, dataset: CaptionedImageFolder, batch: list) -> None:
        pixels, loaded = [], {}
        for _, index, crop, _ in batch:
            if index not in loaded:                 # a flipped twin reuses the decoded image
                loaded = {index: dataset.load_image(index)}
            pixels.append(to_tensor(crop.apply(loaded[index])))          # (3, bh, bw)
        mean, logvar = encode_moments(base, torch.stack(pixels))
        for j, (key, index, _, what) in enumerate(batch):
            entry = {"mean": mean[j]} if logvar is None else {"mean": mean[j], "logvar": logvar[j]}
            _check_finite(entry, f"{dataset.records[index].path}")
            self.put(key, entry, what)

    def _ensure_texts(self, base: BaseModel, captions: Sequence[str], batch_size: int,
                      report: Progress) -> tuple[int, int]:
        """Encode the captions that are not cached; returns (hits, encoded)."""
        cached = self._texts(base, captions)
        missing = [c for c in captions if cached[c] is None]
        if missing:
            report("texts", 0, len(missing))
        for start in range(0, len(missing), batch_size):
            self._encode_texts(base, missing[start:start + batch_size])
            report("texts", min(start + batch_size, len(missing)), len(missing))
        return len(captions) - len(missing), len(missing)

    def _texts(self, base: BaseModel, captions: Sequence[str]) -> dict[str, Conditioning | None]:
        shapes = self._text_shapes(base)
        out = {}
        for c in dict.fromkeys(captions):
            entry = self.get(self._text_key(base, c)[0], shapes)
            out[c] = _from_entry(entry) if entry is not None else None
        return out

    def _encode_texts(self, base: BaseModel, captions: Sequence[str], store: bool = True
                      ) -> list[Conditioning]:
        encoded = encode_text(base, list(captions))
        rows = [encoded[j:j + 1] for j in range(len(captions))]
        for caption, row in zip(captions, rows):
            entry = _to_entry(row)
            _check_finite(entry, f"caption {caption[:60]!r}")
            if store:
                key, what = self._text_key(base, caption)
                self.put(key, entry, what)
        return rows

    # -- serving a training batch ---------------------------------------------------------------

    def latents(self, base: BaseModel, batch: Mapping, data: DataConfig,
                generator: torch.Generator | None = None, device: str | torch.device | None = None) -> Tensor:
        """Scaled latents (B, C, h, w) for a collated batch of the dataset configured by `data` (keys
        sha256, crop, pixel_values: a tensor, or a callable returning it), drawn from the cached moments
        with `generator`
        (base.moments_to_latents). Entries that are missing or corrupt are encoded from the batch's
        pixels and stored."""
        self._check_base(base)
        dtype = self._image_dtype(base)
        entries, todo = [], []
        for j, (sha, crop) in enumerate(zip(batch["sha256"], batch["crop"])):
            key, what = self.image_key(sha, crop, dtype, data.alpha_background)
            entries.append(self.get(key, self._image_shapes(base, crop.bucket)))
            if entries[j] is None:
                todo.append((j, key, what))
        if todo:
            pixels = batch["pixel_values"]
            pixels = pixels() if callable(pixels) else pixels    # a trainer may load pixels only on a miss
            mean, logvar = encode_moments(base, pixels[[j for j, _, _ in todo]])
            for n, (j, key, what) in enumerate(todo):
                entries[j] = {"mean": mean[n]} if logvar is None else {"mean": mean[n], "logvar": logvar[n]}
                _check_finite(entries[j], batch["path"][j] if "path" in batch else key)
                self.put(key, entries[j], what)
        device = device if device is not None else base.unet.conv_in.weight.device
        # Stacked on the host and moved in one copy per tensor, without a sync (train.pipeline.transfer)
        mean = stack_to_device([e["mean"] for e in entries], device)
        logvar = stack_to_device([e["logvar"] for e in entries], device) if "logvar" in entries[0] else None
        return moments_to_latents(base, (mean, logvar), generator)

    def text(self, base: BaseModel, captions: Sequence[str],
             device: str | torch.device | None = None, store: bool = True) -> Conditioning:
        """The text conditioning of `captions` (context (B, L, D), and pooled where the family has it),
        from the cache; missing ones are encoded, and stored unless `store` is False (captions made
        anew every step, by tag shuffling or dropout, would grow the cache without end)."""
        self._check_base(base)
        rows = self._texts(base, captions)
        missing = [c for c, e in rows.items() if e is None]
        if missing:
            rows.update(zip(missing, self._encode_texts(base, missing, store)))
        device = device if device is not None else base.unet.conv_in.weight.device
        parts = [rows[c] for c in captions]
        if all(p.device.type == "cpu" for p in parts):     # cached: concatenated on the host, one copy
            return conditioning_to_device(Conditioning.cat(parts), device)   # per field, without a sync
        return Conditioning.cat([conditioning_to_device(p, device) for p in parts])   # some just encoded


# A text entry's tensor names: the context is stored as `embedding` (the name cache files have always
# used), every other field of the conditioning record under its own name.
_ENTRY_NAMES = {"context": "embedding"}


def _to_entry(row: Conditioning) -> dict[str, Tensor]:
    """One caption's conditioning (batch of 1) as a cache entry: unbatched tensors by entry name."""
    return {_ENTRY_NAMES.get(name, name): t[0] for name, t in row.tensors().items()}


def _from_entry(entry: Mapping[str, Tensor]) -> Conditioning:
    fields = {v: k for k, v in _ENTRY_NAMES.items()}
    return Conditioning(**{fields.get(name, name): t[None] for name, t in entry.items()})


def _digest(what: Mapping) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{str(t.dtype)}:{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_finite(entry: Mapping[str, Tensor], source: str) -> None:
    for name, t in entry.items():
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"the encoder produced NaN/inf values ({bad} in {name}) for {source}; nothing "
                             "was cached for it. Check the image (and, in float16, use a float32 VAE).")


def _batches(items: list, size: int, group: Callable) -> list[list]:
    """Consecutive chunks of at most `size` items with equal `group(item)`; `items` sorted by group."""
    out = []
    for item in items:
        if out and len(out[-1]) < size and group(out[-1][0]) == group(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


class _Bars:
    """The default progress report: a bar per kind with the time left ("cache images", "cache texts",
    train/console.py), from the first report (0 done) to the last."""

    UNITS = {"images": "img", "texts": "caption"}

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, kind: str, done: int, total: int) -> None:
        if kind not in self.bars:
            self.bars[kind] = bar(total=total, desc=f"cache {kind}", unit=self.UNITS.get(kind, "it"))
        b = self.bars[kind]
        b.update(done - b.n)
        if done >= total:
            b.close()
