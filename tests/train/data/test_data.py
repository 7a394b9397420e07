"""The image-folder data layer: scan policy, pixels, captions, buckets, crops, sampler resume."""
from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapterkit.train.data.folder as data_module
from adapterkit.train.data.buckets import (
    BucketBatchSampler,
    Crop,
    assign_bucket,
    make_buckets,
    plan_crop,
    transform_pair,
)
from adapterkit.train.data.captions import build_caption, decode_caption
from adapterkit.train.data.folder import (
    POLICY,
    BadImage,
    CaptionedImageFolder,
    DataConfig,
    collate,
    decode_image,
    scan_folder,
    to_tensor,
)

# -- fixtures -------------------------------------------------------------------------------------


def cfg(root, **kw) -> DataConfig:
    """Tiny buckets (area 64^2, 16 px grid) and a 16 px minimum side keep every test fast; the trigger
    word "sks" is the caption of uncaptioned pictures (without one they are an error, D12)."""
    return DataConfig(root=str(root), **{"resolution": 64, "bucket_step": 16, "min_side": 16,
                                         "trigger": "sks", **kw})


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def save(path: Path, im: Image.Image, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A ~60-byte PNG that declares w x h pixels: a decompression bomb without the memory."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rgba_with_hidden_green(w=32, h=32) -> Image.Image:
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 1] = 255                      # green under every pixel ...
    a[:, : w // 2, 3] = 0                # ... left half fully transparent
    a[:, w // 2:] = (255, 0, 0, 128)     # right half half-transparent red
    return Image.fromarray(a, "RGBA")


def exif6(im: Image.Image, fmt="PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6                     # "rotate 90 CW to display"
    return encoded(im, fmt, exif=exif)


def tree_state(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def by_rel(report, key):
    return [rel for rel, _ in report.entries.get(key, [])]


# -- the policy table, one row per bad case -------------------------------------------------------

# (case, files written next to one good image, report key, the file it names, images accepted,
# config changes). accepted 2: fixed (or noted) and kept; 1: skipped.
BAD_CASES = [
    ("truncated_jpeg", {"bad.jpg": encoded(noise(48, 48), "JPEG")[:600]}, "corrupt", "bad.jpg", 1, {}),
    ("truncated_png", {"bad.png": encoded(noise(48, 48), "PNG")[:2000]}, "corrupt", "bad.png", 1, {}),
    ("zero_bytes", {"bad.png": b""}, "unreadable", "bad.png", 1, {}),
    ("html_as_jpg", {"bad.jpg": b"<html><body>404</body></html>"}, "unreadable", "bad.jpg", 1, {}),
    ("heic", {"bad.heic": b"\x00\x00\x00\x18ftypheic"}, "unsupported", "bad.heic", 1, {}),
    ("float_tiff", {"bad.tif": encoded(Image.new("F", (32, 32)), "TIFF")}, "unsupported", "bad.tif", 1, {}),
    ("tiny", {"bad.png": encoded(noise(8, 40), "PNG")}, "too_small", "bad.png", 1, {}),
    ("over_max_pixels", {"bad.png": encoded(noise(60, 60), "PNG")}, "too_large", "bad.png", 1,
     {"max_pixels": 50 * 50}),
    ("pillow_bomb_error", {"bad.png": png_header(20000, 20000)}, "too_large", "bad.png", 1,
     {"max_pixels": 10**12}),
    ("pillow_bomb_warning", {"bad.png": png_header(10000, 10000)}, "too_large", "bad.png", 1,
     {"max_pixels": 10**12}),
    ("duplicate", {"z_copy.png": encoded(noise(40, 40), "PNG")}, "duplicate", "z_copy.png", 1, {}),
    ("missing_caption_skip", {"bad.png": encoded(noise(32, 32, 3), "PNG")}, "missing_caption", "bad.png", 1,
     {"missing_caption": "skip"}),
    ("cmyk", {"bad.jpg": encoded(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")}, "cmyk",
     "bad.jpg", 2, {}),
    ("16bit", {"bad.png": encoded(Image.fromarray(np.full((32, 32), 40000, np.uint16)), "PNG")},
     "16bit", "bad.png", 2, {}),
    ("rgba", {"bad.png": encoded(rgba_with_hidden_green(), "PNG")}, "alpha", "bad.png", 2, {}),
    ("la", {"bad.png": encoded(Image.new("LA", (32, 32), (90, 0)), "PNG")}, "alpha", "bad.png", 2, {}),
    ("p_transparency", {"bad.png": encoded(Image.new("P", (32, 32), 0), "PNG", transparency=0)},
     "alpha", "bad.png", 2, {}),
    ("exif_rotated", {"bad.png": exif6(noise(48, 32, 1))}, "exif_rotated", "bad.png", 2, {}),
    ("animated_gif", {"bad.gif": encoded(Image.new("RGB", (32, 32), "red"), "GIF", save_all=True,
                                         append_images=[Image.new("RGB", (32, 32), "blue")])},
     "multi_frame", "bad.gif", 2, {}),
    ("png_named_jpg", {"bad.jpg": encoded(noise(32, 32, 2), "PNG")}, "wrong_extension", "bad.jpg", 2, {}),
    ("missing_caption_empty", {"bad.png": encoded(noise(32, 32, 3), "PNG")}, "missing_caption", "bad.png",
     2, {}),
    ("cp1252_caption", {"bad.png": encoded(noise(32, 32, 4), "PNG"), "bad.txt": "caf\u00e9".encode("cp1252")},
     "caption_encoding", "bad.txt", 2, {}),
    ("hidden_appledouble", {"._bad.jpg": b"\x00\x05\x16\x07 not a jpeg"}, "hidden", "._bad.jpg", 1, {}),
    ("hidden_folders", {".git/objects/x.png": b"garbage", "__MACOSX/._good.png": b"\x00\x05"}, "hidden",
     ".git/", 1, {}),
    ("orphan_caption", {"god.txt": "typo of good.txt"}, "orphan_caption", "god.txt", 1, {}),
]


def test_policy_table_is_documented():
    for key, (action, _) in POLICY.items():
        assert f"| {action:6} | {key} " in data_module.__doc__, key


@pytest.mark.parametrize("case, files, key, named, accepted, changes", BAD_CASES,
                         ids=[c[0] for c in BAD_CASES])
def test_policy_table(tmp_path, case, files, key, named, accepted, changes):
    save(tmp_path / "good.png", noise(40, 40))
    write(tmp_path / "good.txt", "a good image")
    for name, data in files.items():
        write(tmp_path / name, data)
        if key != "missing_caption" and not any(n.endswith(".txt") for n in files):
            write((tmp_path / name).with_suffix(".txt"), f"caption of {name}")
    records, report = scan_folder(cfg(tmp_path, **changes))
    assert report.accepted == len(records) == accepted
    assert named in by_rel(report, key), report.summary()
    assert set(report.counts()) == {key}, report.summary()       # nothing else was flagged
    if key in ("hidden", "orphan_caption"):                       # not images: nothing to skip
        assert report.action(key) in ("ignore", "note")
    elif accepted == 1:
        assert report.action(key) == "skip" and named not in [r.rel for r in records]
    else:
        assert report.action(key) in ("fix", "note") and named.replace(".txt", ".png") in [
            r.rel for r in records]
    assert f"{key}:" in report.summary() and named in report.summary()


def test_too_large_checked_before_decoding():
    with pytest.raises(BadImage) as e:
        decode_image(png_header(5000, 5000), max_pixels=1000)
    assert e.value.reason == "too_large" and "5000x5000" in e.value.detail


# -- pixels after the fixes -----------------------------------------------------------------------


def decode(data: bytes, **kw) -> tuple[np.ndarray, list[str]]:
    im, fixes = decode_image(data, **kw)
    assert im.mode == "RGB"
    return np.asarray(im), fixes


def test_16bit_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    a, fixes = decode(encoded(Image.fromarray(ramp), "PNG"))
    grey = a[0, :, 0]
    assert fixes == ["16bit"]
    assert len(np.unique(grey)) >= 200            # Pillow's convert("RGB") leaves 2 levels
    assert grey[0] == 0 and grey[-1] == 255 and np.all(np.diff(grey.astype(int)) >= 0)
    assert np.array_equal(a[..., 0], a[..., 2])


def test_alpha_composited_on_white_hidden_colour_never_leaks():
    a, fixes = decode(encoded(rgba_with_hidden_green(), "PNG"))
    assert fixes == ["alpha"]
    assert (a[:, :16] == 255).all()                               # transparent -> white, not green
    assert np.abs(a[0, 20].astype(int) - (255, 127, 127)).max() <= 1   # 50% red over white
    a, _ = decode(encoded(rgba_with_hidden_green(), "PNG"), background=(0, 0, 0))
    assert (a[:, :16] == 0).all()


def test_exif_orientation_is_applied():
    stored = noise(48, 32, 5)
    a, fixes = decode(exif6(stored))
    assert fixes == ["exif_rotated"] and a.shape == (48, 32, 3)          # now portrait
    assert np.array_equal(a, np.rot90(np.asarray(stored), k=-1))       # rotated 90 degrees clockwise


def test_exif_orientation_jpeg():
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:, 24:] = 255                                            # left half black, right half white
    a, fixes = decode(exif6(Image.fromarray(stored), "JPEG"))
    assert fixes == ["exif_rotated"] and a.shape == (48, 32, 3)
    assert a[:20].mean() < 10 and a[28:].mean() > 245               # rotated CW: left went to the top


def test_exif_rotated_size_is_recorded_upright(tmp_path):
    write(tmp_path / "r.png", exif6(noise(48, 32, 5)))
    records, _ = scan_folder(cfg(tmp_path))
    assert records[0].size == (32, 48)


def test_cmyk_colour():
    a, fixes = decode(encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert fixes == ["cmyk"] and np.abs(a[8, 8].astype(int) - (255, 0, 0)).max() <= 8


def test_tensor_range_and_layout():
    im = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))    # 2 wide, 1 tall
    t = to_tensor(im)
    assert t.shape == (3, 1, 2) and t.dtype == torch.float32
    assert t[:, 0, 0].eq(-1).all() and t[:, 0, 1].eq(1).all()


# -- captions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, text, warned", [
    (b"a red circle", "a red circle", False),
    (b"\xef\xbb\xbfa red circle", "a red circle", False),               # UTF-8 BOM stripped
    ("caf\u00e9".encode("utf-16"), "caf\u00e9", False),                 # UTF-16 by its BOM
    ("caf\u00e9 \u2013 cr\u00e8me".encode("cp1252"), "caf\u00e9 \u2013 cr\u00e8me", True),
    (b"\x81\xe9", "\x81\u00e9", True),                                  # not cp1252 either: latin-1
])
def test_decode_caption(raw, text, warned):
    got, note = decode_caption(raw)
    assert got == text and bool(note) == warned


def test_captions_from_txt_and_metadata_recursive(tmp_path):
    save(tmp_path / "a.png", noise(32, 32, 1))
    write(tmp_path / "a.txt", "a red\n circle\t")
    save(tmp_path / "sub" / "b.png", noise(32, 32, 2))
    save(tmp_path / "sub" / "deeper" / "c.png", noise(32, 32, 3))
    save(tmp_path / "d.png", noise(32, 32, 4))
    save(tmp_path / "e.png", noise(32, 32, 5))
    write(tmp_path / "e.txt", "caf\u00e9".encode("cp1252"))
    save(tmp_path / "outside.png", noise(32, 32, 6))
    write(tmp_path / "metadata.jsonl", "\n".join([
        json.dumps({"file_name": "sub/b.png", "text": "b from metadata"}),
        "{not json",
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
        json.dumps({"file_name": "gone.png", "text": "missing file"}),
        json.dumps({"file_name": "a.png", "text": "loses to a.txt"}),
    ]))
    write(tmp_path / "sub" / "metadata.jsonl", json.dumps({"file_name": "deeper/c.png", "caption": "c!"}))
    ds = CaptionedImageFolder.scan(cfg(tmp_path, trigger="sks"))
    captions = {r.rel: r.caption for r in ds.records}
    assert captions == {"a.png": "a red circle", "d.png": "", "e.png": "caf\u00e9",
                        "outside.png": "", "sub/b.png": "b from metadata", "sub/deeper/c.png": "c!"}
    report = ds.report
    assert len(report.entries["metadata"]) == 3
    assert by_rel(report, "caption_encoding") == ["e.txt"]
    assert "e.txt" in report.summary()
    assert by_rel(report, "caption_conflict") == ["a.png"]
    assert sorted(by_rel(report, "missing_caption")) == ["d.png", "outside.png"]
    items = {ds.records[i].rel: ds[i]["caption"] for i in range(len(ds))}
    assert items["a.png"] == "sks, a red circle" and items["d.png"] == "sks"


def test_caption_dropout_is_seeded_and_at_sample_time(tmp_path):
    draws = [build_caption("a cat", "sks", 0.3, np.random.default_rng([0, i])) for i in range(400)]
    assert set(draws) == {"", "sks, a cat"}
    rng = np.random.default_rng(0)
    for already in ("sks, a cat", "a cat, sks", "a cat, sks, indoors", "sks"):    # never added twice
        assert build_caption(already, "sks", 0.0, rng) == already
    assert build_caption("a sksx cat", "sks", 0.0, rng) == "sks, a sksx cat"  # a word that merely contains it
    assert 0.2 < draws.count("") / 400 < 0.4
    assert draws == [build_caption("a cat", "sks", 0.3, np.random.default_rng([0, i])) for i in range(400)]
    save(tmp_path / "a.png", noise(32, 32))
    write(tmp_path / "a.txt", "a cat")
    ds = CaptionedImageFolder.scan(cfg(tmp_path, trigger="sks", caption_dropout=0.5))
    assert ds.records[0].caption == "a cat"                    # the scan keeps the caption
    per_epoch = {ds[(epoch, 0)]["caption"] for epoch in range(20)}
    assert per_epoch == {"", "sks, a cat"}                     # dropout varies by epoch


def test_missing_caption_error_policy(tmp_path):
    save(tmp_path / "a.png", noise(32, 32))
    save(tmp_path / "b.png", noise(32, 32, 1))
    write(tmp_path / "b.txt", "   \n")                        # whitespace only counts as missing
    with pytest.raises(ValueError, match=r"2 images .* have no caption: a.png, b.png.*missing_caption"):
        scan_folder(cfg(tmp_path, missing_caption="error"))


# -- reports and refusals -------------------------------------------------------------------------


def mixed_folder(root: Path) -> Path:
    for i in range(3):
        save(root / f"ok{i}.png", noise(48, 32, i))
        write(root / f"ok{i}.txt", f"image {i}")
    write(root / "broken.jpg", encoded(noise(48, 48), "JPEG")[:500])
    save(root / "tiny.png", noise(10, 10))
    write(root / "sub" / "copy.png", (root / "ok0.png").read_bytes())
    write(root / "rgba.png", encoded(rgba_with_hidden_green(), "PNG"))
    write(root / "rot.png", exif6(noise(48, 32, 7)))
    write(root / "rot.txt", "caf\u00e9".encode("cp1252"))
    write(root / "notes.md", "# notes")
    write(root / ".DS_Store", b"\x00\x00")
    return root


def test_summary_counts(tmp_path):
    records, report = scan_folder(cfg(mixed_folder(tmp_path)))
    assert report.counts() == {"hidden": 1, "corrupt": 1, "duplicate": 1, "missing_caption": 1,
                               "alpha": 1, "exif_rotated": 1, "caption_encoding": 1, "too_small": 1}
    assert report.image_files == 8 and report.accepted == len(records) == 5
    text = report.summary()
    assert text.startswith(f"data: 5 of 8 image files accepted under {tmp_path}")
    assert "1 other files ignored (.md: 1)" in text
    for line in ("skip       1  corrupt", "skip       1  too_small", "skip       1  duplicate",
                 "fix        1  alpha", "fix        1  exif_rotated", "fix        1  missing_caption"):
        assert line in text, text
    assert "sub/copy.png: same bytes as ok0.png" in text


def test_empty_folder_says_why(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        scan_folder(cfg(tmp_path))
    write(tmp_path / "readme.md", "hi")
    with pytest.raises(ValueError, match=r"no images found .*1 other files ignored.*data.root"):
        scan_folder(cfg(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(cfg(tmp_path / "nope"))


def test_all_bad_folder_says_why(tmp_path):
    write(tmp_path / "a.jpg", encoded(noise(48, 48), "JPEG")[:500])
    write(tmp_path / "b.png", b"")
    save(tmp_path / "c.png", noise(8, 8))
    save(tmp_path / "d.png", noise(8, 9))
    with pytest.raises(ValueError) as e:
        scan_folder(cfg(tmp_path))
    msg = str(e.value)
    assert "none of the 4 image files" in msg
    assert "1 corrupt" in msg and "1 unreadable" in msg and "2 too_small" in msg
    assert "data.min_side" in msg and "a.jpg" in msg


def test_user_files_never_modified(tmp_path):
    root = mixed_folder(tmp_path / "data")
    before = tree_state(root)
    ds = CaptionedImageFolder.scan(cfg(root, random_crop=True, flip=True, caption_dropout=0.5))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler(2), collate_fn=collate)
    n = sum(len(batch["caption"]) for batch in loader)
    assert n == len(ds) == 5
    assert tree_state(root) == before                   # same files, bytes and mtimes; nothing added


def test_record_hash_and_changed_file(tmp_path):
    p = save(tmp_path / "a.png", noise(32, 32))
    ds = CaptionedImageFolder.scan(cfg(tmp_path))
    assert ds.records[0].sha256 == hashlib.sha256(p.read_bytes()).hexdigest() == ds[0]["sha256"]
    save(p, noise(32, 32, 9))
    with pytest.raises(ValueError, match="changed since the folder was scanned"):
        ds[0]


# -- buckets and crops ----------------------------------------------------------------------------


def test_buckets_at_512():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512 and (h, w) in buckets
        assert (w * (h + 64) > 512 * 512 or h + 64 > 1024)   # as tall as the area allows
    assert min(w / h for w, h in buckets) == 1 / 4


@pytest.mark.parametrize("size, bucket", [
    ((768, 512), (640, 384)),     # 3:2
    ((3000, 2000), (640, 384)),
    ((512, 512), (512, 512)),     # 1:1
    ((100, 100), (512, 512)),
    ((512, 768), (384, 640)),     # 2:3
    ((4000, 900), (1024, 256)),   # beyond 4:1 -> the widest bucket
])
def test_bucket_assignment(size, bucket):
    buckets = make_buckets(512, 64)
    assert assign_bucket(size, buckets) == bucket
    err = abs(math.log(size[0] / size[1] * bucket[1] / bucket[0]))
    assert all(err <= abs(math.log(size[0] / size[1] * h / w)) for w, h in buckets)


def test_center_and_random_crop_boxes():
    crop = plan_crop((300, 200), (64, 64))
    assert crop.box == (50.0, 0.0, 250.0, 200.0) and not crop.flip
    boxes = set()
    for seed in range(20):
        c = plan_crop((300, 200), (64, 64), np.random.default_rng(seed), random_crop=True)
        left, top, right, bottom = c.box
        assert 0 <= left and right <= 300 and (top, bottom) == (0, 200)
        assert right - left == pytest.approx(200)
        assert c == plan_crop((300, 200), (64, 64), np.random.default_rng(seed), random_crop=True)
        boxes.add(c.box)
    assert len(boxes) == 20


def test_pair_transform_identical_geometry():
    target = noise(90, 60, 3)
    seen = set()
    for seed in range(6):
        out, hint, crop = transform_pair(target, target.copy(), (32, 32), np.random.default_rng(seed),
                                         random_crop=True, flip_prob=0.5)
        assert out.size == hint.size == (32, 32)
        assert np.array_equal(np.asarray(out), np.asarray(hint))
        seen.add((crop.box, crop.flip))
        # the check has teeth: a box 3 source pixels off gives a clearly different picture
        left, top, right, bottom = crop.box
        shifted = Crop((left + 3 if left < 3 else left - 3, top, right + 3 if left < 3 else right - 3,
                        bottom), crop.bucket, crop.flip).apply(target)
        assert np.abs(np.asarray(shifted, int) - np.asarray(out, int)).mean() > 10
    assert len(seen) == 6                                             # the crops really moved


def test_pair_transform_half_size_hint():
    smooth = noise(9, 6, 4).resize((90, 60), Image.Resampling.BICUBIC)
    hint = smooth.resize((45, 30), Image.Resampling.BOX)              # a half-resolution hint
    for seed in range(3):
        out, h, crop = transform_pair(smooth, hint, (32, 32), np.random.default_rng(seed), random_crop=True,
                                      flip_prob=0.5)
        assert h.size == out.size and crop == plan_crop((90, 60), (32, 32), np.random.default_rng(seed),
                                                        random_crop=True, flip_prob=0.5)
        assert np.abs(np.asarray(h, int) - np.asarray(out, int)).mean() < 4
    with pytest.raises(ValueError, match="aspect"):
        transform_pair(smooth, noise(60, 60), (32, 32))


def test_flip_mirrors_the_same_crop(tmp_path):
    save(tmp_path / "a.png", noise(48, 32))
    ds = CaptionedImageFolder.scan(cfg(tmp_path, flip=True))
    items = [ds[(e, 0)] for e in range(12)]
    flipped = [it for it in items if it["crop"].flip]
    plain = [it for it in items if not it["crop"].flip]
    assert flipped and plain
    assert torch.equal(flipped[0]["pixel_values"], plain[0]["pixel_values"].flip(-1))


# -- the sampler ----------------------------------------------------------------------------------


SIZES = [(48, 32)] * 7 + [(32, 32)] * 5 + [(32, 48)] * 4


def sampler(**kw):
    buckets = make_buckets(64, 16)
    return BucketBatchSampler([assign_bucket(s, buckets) for s in SIZES], 3, seed=7, **kw)


def run(s: BucketBatchSampler, epochs: range, start=(0, 0)):
    out = []
    for epoch in epochs:
        s.set_epoch(epoch, start[1] if epoch == start[0] else 0)
        out += [tuple(b) for b in s]
    return out


def test_sampler_batches_are_single_bucket_and_cover_the_epoch():
    s = sampler()
    batches = list(s)
    assert len(batches) == len(s) == 3 + 2 + 2
    assert sorted(i for b in batches for _, i in b) == list(range(len(SIZES)))
    for b in batches:
        assert len({SIZES[i] for _, i in b}) == 1 and 1 <= len(b) <= 3
    full = sampler(drop_last=True)
    assert all(len(b) == 3 for b in full) and len(list(full)) == len(full) == 2 + 1 + 1


def order(batches):
    return [[i for _, i in b] for b in batches]


def test_sampler_is_seeded():
    assert run(sampler(), range(3)) == run(sampler(), range(3))
    assert order(run(sampler(), range(0, 1))) != order(run(sampler(), range(1, 2)))   # new epoch, new order
    buckets = make_buckets(64, 16)
    other_seed = BucketBatchSampler([assign_bucket(s, buckets) for s in SIZES], 3, seed=8)
    assert order(run(other_seed, range(1))) != order(run(sampler(), range(1)))


@pytest.mark.parametrize("epoch, step", [(0, 0), (1, 1), (1, 4), (2, 7)])
def test_sampler_resume_equals_uninterrupted(epoch, step):
    s = sampler()
    full = run(s, range(3))
    consumed = sum(len(s) for _ in range(epoch)) + step
    assert run(sampler(), range(epoch, 3), start=(epoch, step)) == full[consumed:]


def test_resumed_samples_equal_uninterrupted(tmp_path):
    for i, (w, h) in enumerate([(48, 32), (48, 32), (32, 32), (32, 48), (32, 48)]):
        save(tmp_path / f"{i}.png", noise(w, h, i))
        write(tmp_path / f"{i}.txt", f"caption {i}")
    c = cfg(tmp_path, random_crop=True, flip=True, caption_dropout=0.3, trigger="sks")

    def batches(epochs, start=(0, 0)):
        ds = CaptionedImageFolder.scan(c)
        bs = ds.batch_sampler(2)
        out = []
        for epoch in epochs:
            bs.set_epoch(epoch, start[1] if epoch == start[0] else 0)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=bs, collate_fn=collate)
            out += [(b["pixel_values"], b["caption"], [k.box for k in b["crop"]]) for b in loader]
        return out

    full = batches(range(2))
    resumed = batches(range(1, 2), start=(1, 1))
    per_epoch = len(full) // 2
    assert len(resumed) == per_epoch - 1
    for (p1, c1, k1), (p2, c2, k2) in zip(full[per_epoch + 1:], resumed):
        assert torch.equal(p1, p2) and c1 == c2 and k1 == k2
    assert len({tuple(p.shape[1:]) for p, _, _ in full}) == 3      # three buckets: (3, 48, 80), ...


def test_duplicate_keeps_first_in_path_order(tmp_path):
    data = encoded(noise(32, 32), "PNG")
    for name in ("b/x.png", "a.png", "c.png"):
        write(tmp_path / name, data)
    records, report = scan_folder(cfg(tmp_path))
    assert [r.rel for r in records] == ["a.png"]
    assert sorted(by_rel(report, "duplicate")) == ["b/x.png", "c.png"]


def test_scan_never_opens_for_writing(tmp_path, monkeypatch):
    """Stronger than comparing hashes: no write-mode open under the folder, even a temporary one."""
    mixed_folder(tmp_path)
    real_open = io.open

    def guarded(file, mode="r", *a, **kw):
        if str(file).startswith(str(tmp_path)) and any(m in mode for m in "wax+"):
            raise AssertionError(f"opened {file} with mode {mode}")
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    ds = CaptionedImageFolder.scan(cfg(tmp_path))
    assert len(ds) == 5 and all(ds[i]["pixel_values"].shape[0] == 3 for i in range(len(ds)))
