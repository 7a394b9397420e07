"""Picture folders and captions as reliability.md §5 D lists them (D4, D7, D9, D12-D16), each case
against the policy train/data/folder.py states: skipped, fixed or noted with the file named, or a
refusal listing the files; never a silent empty caption, a file read from outside the folder, or a
name printed so that it is not one line."""
from __future__ import annotations

import io
import os
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapterkit.train.data.captions import clean_caption, control_characters
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, decode_image, scan_folder


def cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **{"resolution": 64, "bucket_step": 16, "min_side": 16, **kw})


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def picture(path: Path, seed: int = 0, size=(32, 32), caption: str | None = "a picture") -> Path:
    write(path, encoded(noise(*size, seed), "PNG"))
    if caption is not None:
        write(path.with_suffix(".txt"), caption)
    return path


def found(report, key: str) -> dict[str, str]:
    return dict(report.entries.get(key, []))


# --- D12: no caption ---------------------------------------------------------------------------------

def test_uncaptioned_pictures_without_a_trigger_are_refused_listing_them(tmp_path):
    picture(tmp_path / "a.png", 1)
    picture(tmp_path / "b.png", 2, caption=None)
    picture(tmp_path / "c.png", 3, caption=" \t\n")                   # whitespace only: no caption
    with pytest.raises(ValueError, match=r"2 images .* no caption and data\.trigger is empty, so they "
                                         r"would train on an empty caption: b\.png, c\.png\..*data\.trigger"):
        scan_folder(cfg(tmp_path))


def test_the_trigger_word_is_the_fallback_caption_and_dropout_1_needs_none(tmp_path):
    picture(tmp_path / "a.png", 1, caption=None)
    ds = CaptionedImageFolder.scan(cfg(tmp_path, trigger="sks"))
    assert ds[0]["caption"] == "sks" and "missing_caption: no caption" in ds.summary()
    records, _ = scan_folder(cfg(tmp_path, caption_dropout=1.0))     # captions never used
    assert len(records) == 1
    picture(tmp_path / "b.png", 2)
    records, report = scan_folder(cfg(tmp_path, missing_caption="skip"))
    assert [r.rel for r in records] == ["b.png"] and list(found(report, "missing_caption")) == ["a.png"]


# --- D13: caption text -------------------------------------------------------------------------------

def test_control_characters_are_replaced_and_reported_per_file(tmp_path):
    picture(tmp_path / "a.png", 1, caption="a red\x00circle\x1b[31m on blue")
    picture(tmp_path / "b.png", 2, caption="a blue\tsquare\r\n")           # tab/newline: whitespace only
    records, report = scan_folder(cfg(tmp_path))
    assert {r.rel: r.caption for r in records} == {"a.png": "a red circle [31m on blue",
                                                   "b.png": "a blue square"}
    assert found(report, "caption_control") == {"a.png": "2 control characters (NUL, ESC, ...) replaced "
                                                         "by spaces"}
    assert "caption_control" in report.summary()
    assert control_characters("a\x00b\x07") == 2 and clean_caption("a\x00b") == "a b"


@pytest.mark.parametrize("raw, text, note", [
    (b"\xef\xbb\xbfa cat", "a cat", None),                              # UTF-8 BOM stripped
    ("a caf\u00e9".encode("utf-16"), "a caf\u00e9", None),              # UTF-16 by its BOM
    ("a caf\u00e9".encode("cp1252"), "a caf\u00e9", "byte 0xe9 at offset 5"),
])
def test_caption_encodings_are_decoded_by_bom_or_named_with_the_byte_offset(tmp_path, raw, text, note):
    picture(tmp_path / "a.png", caption=None)
    write(tmp_path / "a.txt", raw)
    records, report = scan_folder(cfg(tmp_path))
    assert records[0].caption == text
    notes = found(report, "caption_encoding")
    assert (note in notes["a.txt"]) if note else not notes


# --- D14: pairing and duplicates ---------------------------------------------------------------------

def test_one_caption_for_two_pictures_of_one_name_is_flagged(tmp_path):
    picture(tmp_path / "a.png", 1, caption="shared")
    write(tmp_path / "a.jpg", encoded(noise(32, 32, 2), "JPEG"))
    picture(tmp_path / "b.png", 3)
    records, report = scan_folder(cfg(tmp_path))
    assert {r.rel: r.caption for r in records} == {"a.jpg": "shared", "a.png": "shared", "b.png": "a picture"}
    assert found(report, "shared_caption") == {"a.jpg": "a.txt also captions a.png",
                                               "a.png": "a.txt also captions a.jpg"}
    assert "shared_caption" in report.summary() and report.action("shared_caption") == "note"


def test_byte_identical_pictures_are_reported_by_content(tmp_path):
    picture(tmp_path / "a.png", 1)
    write(tmp_path / "sub" / "z.png", (tmp_path / "a.png").read_bytes())
    records, report = scan_folder(cfg(tmp_path))
    assert [r.rel for r in records] == ["a.png"]
    assert found(report, "duplicate") == {"sub/z.png": "same bytes as a.png"}


# --- D15: files outside the folder -------------------------------------------------------------------

def test_a_symlink_out_of_the_folder_is_skipped_and_never_read(tmp_path):
    root, outside = tmp_path / "pics", tmp_path / "private"
    picture(root / "a.png", 1)
    picture(outside / "secret.png", 2, caption="secret words")
    (root / "b.png").symlink_to(outside / "secret.png")
    (root / "c.txt").symlink_to(outside / "secret.txt")                 # a caption from outside
    picture(root / "c.png", 3, caption=None)
    (root / "d.png").symlink_to(root / "a.png")                         # inside: read (a duplicate)
    records, report = scan_folder(cfg(root, trigger="sks"))
    assert sorted(r.rel for r in records) == ["a.png", "c.png"]
    assert {r.rel: r.caption for r in records}["c.png"] == ""            # the outside caption unread
    skipped = found(report, "outside_root")
    assert set(skipped) == {"b.png", "c.txt"} and str(outside / "secret.png") in skipped["b.png"]
    assert report.action("outside_root") == "skip" and report.image_files == 4
    assert list(found(report, "duplicate")) == ["d.png"]


@pytest.mark.parametrize("name", ["../x.png", "/etc/x.png", "file:///x.png", "https://a.b/x.png"])
def test_metadata_naming_a_file_outside_the_folder_is_reported(tmp_path, name):
    picture(tmp_path / "pics" / "a.png", 1)
    picture(tmp_path / "x.png", 2)
    write(tmp_path / "pics" / "metadata.jsonl", f'{{"file_name": "{name}", "text": "escape"}}\n')
    records, report = scan_folder(cfg(tmp_path / "pics"))
    assert [r.rel for r in records] == ["a.png"]
    assert "unsafe file_name" in found(report, "metadata")["metadata.jsonl:1"]


# --- D16: names ----------------------------------------------------------------------------------

def test_an_nfd_caption_pairs_with_its_nfc_picture(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    picture(tmp_path / f"{nfc}.png", 1, caption=None)
    write(tmp_path / f"{nfd}.txt", "a cup")                             # as macOS writes names
    picture(tmp_path / f"{nfd}2.png", 2, caption=None)
    write(tmp_path / "metadata.jsonl", f'{{"file_name": "{nfc}2.png", "text": "two cups"}}\n')
    records, report = scan_folder(cfg(tmp_path))
    assert sorted(r.caption for r in records) == ["a cup", "two cups"]
    assert not report.entries.get("orphan_caption") and not report.entries.get("metadata")


def test_names_with_a_newline_or_bytes_not_utf8_are_shown_verbatim(tmp_path):
    root = os.fsencode(tmp_path)
    for raw in (b"two\nlines.png", b"latin\xe9.png"):
        with open(os.path.join(root, raw), "wb") as f:
            f.write(b"not a picture")
    picture(tmp_path / "good.png", 1)
    _, report = scan_folder(cfg(tmp_path))
    text = report.summary()
    assert "'two\\nlines.png'" in text and "'latin\\udce9.png'" in text
    assert all(line.isprintable() for line in text.splitlines())
    text.encode("utf-8")                                                 # printable on a UTF-8 terminal


def test_a_picture_deleted_or_replaced_after_the_scan_is_an_error_naming_it(tmp_path):
    a, b = picture(tmp_path / "a.png", 1), picture(tmp_path / "b.png", 2)
    ds = CaptionedImageFolder.scan(cfg(tmp_path))
    a.unlink()
    with pytest.raises(ValueError, match=r"a\.png was removed or cannot be read since the folder was"):
        ds[0]
    write(b, encoded(noise(32, 32, 9), "PNG"))
    with pytest.raises(ValueError, match=r"b\.png changed since the folder was scanned"):
        ds[1]


# --- D7: sizes and aspect ----------------------------------------------------------------------------

def test_strips_and_thumbnails_are_skipped_or_flagged_against_the_buckets(tmp_path):
    picture(tmp_path / "a.png", 1)
    for name, size in (("strip.png", (1, 2000)), ("tiny.png", (8, 8)), ("tall.png", (16, 1200)),
                       ("thumb.png", (20, 20))):
        picture(tmp_path / name, 2, size=size)
    records, report = scan_folder(cfg(tmp_path))
    assert set(found(report, "too_small")) == {"strip.png", "tiny.png"}
    fit = found(report, "bucket_fit")
    assert set(fit) == {"tall.png", "thumb.png"} and report.action("bucket_fit") == "note"
    assert fit["tall.png"].startswith("16x1200 into bucket 32x128: the crop keeps 5% of the picture")
    assert fit["thumb.png"] == "20x20 is upscaled 3.2x to its bucket 64x64"
    assert sorted(r.rel for r in records) == ["a.png", "tall.png", "thumb.png"]


# --- D4: extensions ------------------------------------------------------------------------------------

def test_mixed_case_extensions_and_png_bytes_named_jpg_are_decoded_by_content(tmp_path):
    for i, name in enumerate(["a.JPG", "b.Jpeg", "c.PnG"]):
        fmt = "PNG" if name.lower().endswith("png") else "JPEG"
        write(tmp_path / name, encoded(noise(32, 32, i), fmt))
        write((tmp_path / name).with_suffix(".txt"), name)
    write(tmp_path / "d.jpg", encoded(noise(32, 32, 7), "PNG"))
    write(tmp_path / "d.txt", "png inside")
    records, report = scan_folder(cfg(tmp_path))
    assert sorted(r.rel for r in records) == ["a.JPG", "b.Jpeg", "c.PnG", "d.jpg"]
    assert list(found(report, "wrong_extension")) == ["d.jpg"]


# --- D9: CMYK ------------------------------------------------------------------------------------------

def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def cmyk_profile(ink_lab=(50.0, 60.0, 40.0)) -> bytes:
    """A minimal ICC v2 CMYK printer profile (lut8 A2B0 on a 2-point grid): paper (no ink) is white,
    full black ink near black, any other full ink prints `ink_lab`, a red. So cyan ink *means* red here:
    only a decoder that applies the profile gets red; Pillow's formula gives cyan."""
    def lab(L, a, b):                                                   # the 8-bit Lab encoding of lut8
        return bytes([round(L / 100 * 255), round(a + 128), round(b + 128)])
    black = lab(5, 0, 0)
    # grid (c, m, y, k) in {0, 1}^4, k fastest: paper, then black wherever k = 1, the red elsewhere
    clut = lab(100, 0, 0) + black + b"".join(black if i % 2 else lab(*ink_lab) for i in range(2, 16))
    ramp = bytes(range(256))
    lut = (b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + ramp * 4 + clut + ramp * 3)
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", 5) + b"test\0" + b"\0" * 81
    tags = [(b"desc", desc), (b"cprt", b"text\0\0\0\0none\0"),
            (b"wtpt", b"XYZ \0\0\0\0" + _s15(0.9642) + _s15(1.0) + _s15(0.8249)), (b"A2B0", lut)]
    table, data, start = struct.pack(">I", len(tags)), b"", 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        data += b"\0" * (-(start + len(data)) % 4)
        table += sig + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
              + b"\0" * 12 + b"acspAPPL" + b"\0" * 24 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    return header + table + data


def test_cmyk_goes_through_its_icc_profile_when_it_has_one():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    with_profile, fixes = decode_image(encoded(cyan, "JPEG", icc_profile=cmyk_profile()))
    r, g, b = np.asarray(with_profile)[8, 8].astype(int)
    assert fixes == ["cmyk"] and r > 150 and r > g + 80                 # the profile's red
    plain, _ = decode_image(encoded(cyan, "JPEG"))                       # Adobe-inverted, no profile
    assert np.abs(np.asarray(plain)[8, 8].astype(int) - (0, 255, 255)).max() <= 8
    broken, _ = decode_image(encoded(cyan, "JPEG", icc_profile=b"\0" * 200))    # unusable: the formula
    assert np.abs(np.asarray(broken)[8, 8].astype(int) - (0, 255, 255)).max() <= 8
