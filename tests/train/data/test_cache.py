"""train/data/cache.py: content-keyed latent and text-embedding cache.

Encoder calls are counted by wrapping the tiny pipeline's VAE `encode` and text-encoder `forward`, so
"re-encodes exactly what changed" is measured, not inferred from file counts.
"""
import dataclasses
import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from adapterkit.train.data.buckets import Crop, plan_crop
from adapterkit.train.data.cache import LatentCache
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, collate, to_tensor
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_images, encode_moments, encode_prompts
from adapterkit.unet import PRESETS
from support.pipelines import build_tiny_pipeline

SIZES = {"a.png": (64, 64), "b.png": (128, 48), "c.png": (48, 128)}   # buckets 64x64, 128x32, 32x128
CAPTIONS = {"a.png": "a red circle", "b.png": "a blue square", "c.png": "a green triangle"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(build_tiny_pipeline(tmp_path_factory.mktemp("sd"), PRESETS["tiny"]))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        (root / name).with_suffix(".txt").write_text(CAPTIONS[name])
    return root


def scan(root, **changes):
    cfg = DataConfig(root=str(root), resolution=64, bucket_step=32, min_side=32)
    return CaptionedImageFolder.scan(dataclasses.replace(cfg, **changes))


@pytest.fixture
def calls(base, monkeypatch):
    """How many images the VAE encoded and captions the text encoder read."""
    n = {"images": 0, "texts": 0}
    vae_encode, te_forward = base.vae.encode, base.text_encoder.forward

    def encode(x, *a, **k):
        n["images"] += len(x)
        return vae_encode(x, *a, **k)

    def forward(ids, *a, **k):
        n["texts"] += len(ids)
        return te_forward(ids, *a, **k)

    monkeypatch.setattr(base.vae, "encode", encode)
    monkeypatch.setattr(base.text_encoder, "forward", forward)
    return n


def counts(calls):
    out = dict(calls)
    calls.update(images=0, texts=0)
    return out


def _snapshot(root):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_build_encodes_once_then_hits(base, data, tmp_path, calls):
    cache = LatentCache(tmp_path / "out/cache", base.fingerprint)
    stats = cache.build(scan(data), base, batch_size=2)
    assert (stats["image_encoded"], stats["text_encoded"], stats["hits"]) == (3, 3, 0)
    assert counts(calls) == {"images": 3, "texts": 3}
    stats = cache.build(scan(data), base)
    assert (stats["hits"], stats["encoded"], stats["corrupt"]) == (6, 0, 0)
    assert counts(calls) == {"images": 0, "texts": 0}
    assert len(list((tmp_path / "out/cache/images").rglob("*.safetensors"))) == 3


def test_an_edited_image_reencodes_only_that_image(base, data, tmp_path, calls):
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(scan(data), base)
    counts(calls)
    im = np.array(Image.open(data / "b.png"))
    im[0, 0, 0] ^= 1                                   # one byte of pixels, re-saved
    Image.fromarray(im).save(data / "b.png")
    stats = cache.build(scan(data), base)
    assert (stats["image_encoded"], stats["image_hits"], stats["text_encoded"]) == (1, 2, 0)
    assert counts(calls) == {"images": 1, "texts": 0}


def test_an_edited_caption_reencodes_only_that_caption(base, data, tmp_path, calls):
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(scan(data), base)
    counts(calls)
    (data / "c.txt").write_text("a green triangle, bold outline")
    stats = cache.build(scan(data), base)
    assert (stats["image_encoded"], stats["text_encoded"], stats["text_hits"]) == (0, 1, 2)
    assert counts(calls) == {"images": 0, "texts": 1}


def test_a_new_resolution_reencodes_images_and_keeps_captions(base, data, tmp_path, calls):
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(scan(data), base)
    counts(calls)
    stats = cache.build(scan(data, resolution=96), base)
    assert (stats["image_encoded"], stats["text_encoded"], stats["text_hits"]) == (3, 0, 3)
    assert counts(calls) == {"images": 3, "texts": 0}
    stats = cache.build(scan(data), base)                # the old entries are still there
    assert stats["encoded"] == 0 and counts(calls) == {"images": 0, "texts": 0}


def test_flip_and_caption_dropout_cache_every_variant_the_dataset_serves(base, data, tmp_path, calls):
    ds = scan(data, flip=True, caption_dropout=0.5, trigger="sks")
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    stats = cache.build(ds, base)
    assert (stats["image_encoded"], stats["text_encoded"]) == (6, 4)        # 3 x 2 flips; 3 + ""
    counts(calls)
    for epoch in range(3):                              # whatever the epochs draw is a cache hit
        sampler = ds.batch_sampler(2)
        sampler.set_epoch(epoch)
        for keys in sampler:
            batch = collate([ds[k] for k in keys])
            cache.latents(base, batch, ds.cfg, torch.Generator().manual_seed(0))
            cache.text(base, batch["caption"])
    assert counts(calls) == {"images": 0, "texts": 0}


def test_cached_latents_and_embeddings_equal_fresh_ones(base, data, tmp_path):
    ds = scan(data, flip=True)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(ds, base, batch_size=3)
    for keys in ds.batch_sampler(1):
        batch = collate([ds[k] for k in keys])
        fresh = encode_images(base, batch["pixel_values"], torch.Generator().manual_seed(5))
        cached = cache.latents(base, batch, ds.cfg, torch.Generator().manual_seed(5))
        assert torch.allclose(cached, fresh, atol=1e-6, rtol=0)
        mean, logvar = encode_moments(base, batch["pixel_values"])
        entry = cache.get(cache.image_key(batch["sha256"][0], batch["crop"][0], base.vae.dtype)[0],
                          {"mean": mean.shape[1:], "logvar": logvar.shape[1:]})
        # built at batch 3, encoded here at batch 1: the CPU conv kernels sum in a batch-dependent order
        assert torch.allclose(entry["mean"], mean[0], atol=1e-5, rtol=0)
        assert torch.allclose(entry["logvar"], logvar[0], atol=1e-5, rtol=0)
    captions = ["a red circle", "a blue square"]
    assert torch.equal(cache.text(base, captions).context, encode_prompts(base, captions))


def test_a_miss_at_training_time_is_encoded_from_the_batch_and_stored(base, data, tmp_path, calls):
    ds = scan(data)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    batch = collate([ds[0], ds[0]])
    first = cache.latents(base, batch, ds.cfg)
    assert counts(calls)["images"] == 2 and torch.equal(cache.latents(base, batch, ds.cfg), first)
    assert counts(calls)["images"] == 0
    assert torch.equal(first, encode_images(base, batch["pixel_values"]))


def _entry_files(root, kind):
    return sorted((root / kind).rglob("*.safetensors"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "bit flip", "wrong shape", "nan"])
def test_a_corrupt_entry_is_reencoded_with_a_warning(base, data, tmp_path, calls, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file
    ds = scan(data)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(ds, base)
    counts(calls)
    victim = _entry_files(tmp_path / "cache", "images")[1]
    good = victim.read_bytes()
    with safe_open(victim, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}   # not mapped
    if damage == "garbage":
        victim.write_bytes(os.urandom(len(good)))
    elif damage == "truncated":
        victim.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "bit flip":                            # still a valid file: only the checksum sees it
        victim.write_bytes(good[:-10] + bytes([good[-10] ^ 0x10]) + good[-9:])
    elif damage == "wrong shape":
        save_file({k: v[:, :-1].contiguous() for k, v in tensors.items()}, victim, metadata=meta)
    elif damage == "nan":
        poisoned = {k: v.clone() for k, v in tensors.items()}
        poisoned["mean"][0, 0, 0] = float("nan")
        save_file(poisoned, victim, metadata={**meta, "adapterkit.checksum": "x"})
    with pytest.warns(UserWarning, match="is corrupt"):
        stats = cache.build(ds, base)
    assert (stats["corrupt"], stats["image_encoded"], stats["image_hits"]) == (1, 1, 2)
    assert counts(calls) == {"images": 1, "texts": 0}
    with safe_open(victim, "pt") as f:                   # re-encoded (batch of 1: rounding may differ)
        assert f.metadata()["adapterkit.cache_key"] == meta["adapterkit.cache_key"]
        assert all(torch.allclose(f.get_tensor(k), v, atol=1e-6, rtol=0) for k, v in tensors.items())
    stats = cache.build(ds, base)
    assert stats["encoded"] == 0 and stats["corrupt"] == 0


def test_a_corrupt_text_entry_is_reencoded(base, data, tmp_path, calls):
    ds = scan(data)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(ds, base)
    counts(calls)
    _entry_files(tmp_path / "cache", "texts")[0].write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="is corrupt"):
        stats = cache.build(ds, base)
    assert (stats["corrupt"], stats["text_encoded"]) == (1, 1) and counts(calls) == {"images": 0, "texts": 1}


def test_the_data_folder_is_never_written(base, data, tmp_path):
    before = _snapshot(data)
    cache = LatentCache(tmp_path / "out/cache", base.fingerprint)
    cache.build(scan(data, flip=True), base)
    assert _snapshot(data) == before
    with pytest.raises(ValueError, match="inside the image folder"):
        LatentCache(data / ".cache", base.fingerprint).build(scan(data), base)
    assert _snapshot(data) == before


def test_refusals(base, data, tmp_path):
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    with pytest.raises(ValueError, match="random_crop=true .* cannot be cached"):
        cache.build(scan(data, random_crop=True), base)
    other = LatentCache(tmp_path / "cache", dataclasses.replace(base.fingerprint, vae="0-0"))
    with pytest.raises(ValueError, match="opened for the base model"):
        other.build(scan(data), base)


def test_nan_latents_stop_the_build_naming_the_image(base, data, tmp_path, monkeypatch):
    encode = base.vae.encode

    def poisoned(x, *a, **k):                         # c.png's bucket (32 wide, 128 tall) fails
        out = encode(x, *a, **k)
        if x.shape[-2:] == (128, 32):
            out.latent_dist.mean[-1, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(base.vae, "encode", poisoned)
    cache, ds = LatentCache(tmp_path / "cache", base.fingerprint), scan(data)
    with pytest.raises(ValueError, match=r"NaN/inf values \(1 in mean\) for .*c\.png"):
        cache.build(ds, base, batch_size=1)
    c = ds.records.index(next(r for r in ds.records if r.rel == "c.png"))
    key = cache.image_key(ds.records[c].sha256, plan_crop(ds.records[c].size, ds.bucket_of[c]),
                          base.vae.dtype)[0]
    assert not cache.path(key).exists()                 # nothing was cached for it


def test_image_keys_change_with_every_setting_that_changes_the_latent(base, tmp_path):
    cache = LatentCache(tmp_path, base.fingerprint)
    sha = hashlib.sha256(b"x").hexdigest()
    crop = Crop((0.0, 0.0, 64.0, 64.0), (64, 64), False)
    ref = cache.image_key(sha, crop, torch.float32)[0]
    variants = [
        cache.image_key(hashlib.sha256(b"y").hexdigest(), crop, torch.float32),
        cache.image_key(sha, Crop(crop.box, (32, 32), False), torch.float32),
        cache.image_key(sha, Crop((0.0, 0.5, 64.0, 64.5), (64, 64), False), torch.float32),
        cache.image_key(sha, Crop(crop.box, (64, 64), True), torch.float32),
        cache.image_key(sha, crop, torch.float16),
        cache.image_key(sha, crop, torch.float32, background=(0, 0, 0)),
        LatentCache(tmp_path, dataclasses.replace(base.fingerprint, vae="other")).image_key(
            sha, crop, torch.float32),
    ]
    keys = [ref] + [k for k, _ in variants]
    assert len(set(keys)) == len(keys)
    # text encoder and tokenizer changes do not touch image keys, and vice versa
    te_changed = LatentCache(tmp_path, dataclasses.replace(base.fingerprint, text_encoder="other"))
    assert te_changed.image_key(sha, crop, torch.float32)[0] == ref
    assert te_changed.text_key("a", 77, torch.float32)[0] != cache.text_key("a", 77, torch.float32)[0]
    assert cache.text_key("a", 77, torch.float32)[0] != cache.text_key("a", 76, torch.float32)[0]
    assert cache.text_key("a", 77, torch.float32)[0] != cache.text_key("a ", 77, torch.float32)[0]


def test_to_tensor_pixels_are_what_the_cache_encodes(base, data, tmp_path):
    """build() crops from the decoded image exactly as the dataset does (same box, same resampling)."""
    ds = scan(data)
    sample = ds[1]
    crop = sample["crop"]
    assert torch.equal(to_tensor(crop.apply(ds.load_image(1))), sample["pixel_values"])


def test_captions_made_anew_each_step_are_encoded_but_not_stored(tmp_path):
    """store=False (shuffled or dropped tags): the conditioning is the encoder's, and no entry is
    written, so the cache cannot grow with the steps."""
    from adapterkit.train.pipeline.encoding import encode_prompts
    base = load_base(build_tiny_pipeline(tmp_path / "b", PRESETS["tiny"]))
    cache = LatentCache(tmp_path / "c", base.fingerprint)
    text = cache.text(base, ["b, a, c"], store=False)
    assert torch.equal(text.context, encode_prompts(base, ["b, a, c"]))
    assert not any((tmp_path / "c").rglob("*.safetensors"))
    cache.text(base, ["b, a, c"])
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 1
