"""Canny hints, the edge-fidelity score and the folder converter: edges where the picture has them,
scores that move the right way, inputs left byte-identical, bad files reported."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from adapterkit.train.data.canny import (
    SETTINGS_KEY,
    canny,
    canny_folder,
    edge_f1,
    edge_fidelity,
    edge_map_tensor,
)
from support.pictures import png_bytes, snapshot, square, write_canny_folder


def dist_to_border(size=64, lo=16, hi=47) -> np.ndarray:
    """Chebyshev distance of each pixel to the square's outline (its outermost pixel ring)."""
    yy, xx = np.mgrid[:size, :size]
    inside = (xx >= lo) & (xx <= hi) & (yy >= lo) & (yy <= hi)
    to_edge = np.minimum.reduce([np.abs(xx - lo), np.abs(xx - hi), np.abs(yy - lo), np.abs(yy - hi)])
    outside = np.maximum(np.maximum(lo - xx, xx - hi), np.maximum(lo - yy, yy - hi))
    return np.where(inside, to_edge, outside)


def test_square_gives_edges_on_its_border_only():
    edges = canny(square())
    assert edges.mode == "RGB" and edges.size == (64, 64)
    a = np.asarray(edges)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()   # one map, 3 channels
    assert set(np.unique(a)) <= {0, 255}
    on = a[..., 0] > 0
    d = dist_to_border()
    assert on[d > 1].sum() == 0                       # nothing inside the square or out in the field
    # a step edge is marked on one side of the transition or the other: the whole outline, +-1 px
    assert on[d <= 1].sum() >= 0.9 * 4 * (47 - 16)
    assert np.asarray(canny(square(), mode="L")).shape == (64, 64)


def test_thresholds_change_the_output():
    # A weak step (0 -> 30, Sobel L1 magnitude 120) and a strong one (30 -> 255, 900).
    a = np.zeros((48, 48, 3), np.uint8)
    a[:, 16:] = 30
    a[:, 32:] = 255
    cols = lambda e: sorted(set(np.nonzero(np.asarray(e)[..., 0])[1].tolist()))  # noqa: E731
    default, low, none = canny(a), canny(a, low=50, high=100), canny(a, low=1000, high=1100)
    assert cols(default) and all(c in (31, 32) for c in cols(default))     # strong edge only
    assert any(c in (15, 16) for c in cols(low)) and any(c in (31, 32) for c in cols(low))
    assert cols(none) == []
    with pytest.raises(ValueError, match="low <= high"):
        canny(a, low=200, high=100)


def test_blur_removes_noise_edges_and_input_is_untouched():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    before = noise.copy()
    sharp = (np.asarray(canny(noise))[..., 0] > 0).sum()
    blurred = (np.asarray(canny(noise, blur=2.0))[..., 0] > 0).sum()
    assert blurred < sharp / 2
    assert np.array_equal(noise, before)


def test_edge_map_tensor_is_the_3_channel_hint_in_0_1():
    t = edge_map_tensor(square())
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert set(t.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(t[0], t[2])
    assert torch.equal(t[0], torch.from_numpy(np.asarray(canny(square(), mode="L")) / 255.0).float())


def line_map(col: int, size=32) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[4:28, col] = 255
    return m


def test_edge_f1_identical_disjoint_and_shifted():
    ref = line_map(10)
    assert edge_f1(ref, ref) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(line_map(25), ref)["f1"] == 0.0                    # 15 px apart
    shifted = line_map(11)
    assert edge_f1(shifted, ref, tolerance_px=1)["f1"] == 1.0
    assert edge_f1(shifted, ref, tolerance_px=0)["f1"] < 1.0
    assert edge_f1(line_map(13), ref, tolerance_px=2)["f1"] == 0.0    # tolerance is a distance


def test_edge_f1_precision_and_recall_are_asymmetric():
    ref = line_map(10)
    both = np.maximum(ref, line_map(20))                               # the edge plus a spurious one
    s = edge_f1(both, ref, tolerance_px=1)
    assert s["recall"] == 1.0 and s["precision"] == pytest.approx(0.5)
    s = edge_f1(ref, both, tolerance_px=1)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(0.5)


def test_edge_f1_formats_and_empty_maps():
    hint = edge_map_tensor(square())                                   # (3, H, W) float {0, 1}
    assert edge_f1(canny(square()), hint)["f1"] == 1.0                 # PIL 0/255 vs tensor 0/1
    assert edge_f1(np.asarray(hint[0]) > 0.5, hint)["f1"] == 1.0        # bool mask
    empty = np.zeros((64, 64), np.uint8)
    assert edge_f1(empty, empty)["f1"] == 1.0
    assert edge_f1(empty, hint) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(np.zeros((8, 8), np.uint8), empty)


def test_edge_fidelity_of_the_source_image_is_perfect():
    im = square()
    assert edge_fidelity(im, edge_map_tensor(im))["f1"] == 1.0
    moved = square(lo=20, hi=51)
    assert edge_fidelity(moved, edge_map_tensor(im))["f1"] < 0.5


# -- folders --------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    return write_canny_folder(tmp_path / "images")


def test_canny_folder_writes_one_png_reports_the_corrupt_and_keeps_inputs(folder, tmp_path):
    before = snapshot(folder)
    out = tmp_path / "edges"
    report = canny_folder(folder, out)
    assert sorted(p.name for p in out.rglob("*")) == ["good.png"]    # no temp files left behind
    assert report.written == ["good.png"]
    assert [rel for rel, _ in report.entries["corrupt"]] == ["broken.png"]
    assert [s[0] for s in report.skipped] == ["broken.png"]
    assert report.image_files == 2 and report.ignored == 1
    assert "broken.png" in report.summary()
    assert snapshot(folder) == before
    with Image.open(out / "good.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(canny(square())))
        settings = json.loads(im.text[SETTINGS_KEY])
    assert (settings["low"], settings["high"], settings["blur"]) == (100, 200, None)


def test_canny_folder_refuses_its_own_input(folder):
    before = snapshot(folder)
    with pytest.raises(ValueError, match="is the input folder"):
        canny_folder(folder, folder)
    with pytest.raises(ValueError, match="inside the input folder"):
        canny_folder(folder, folder / "edges")
    with pytest.raises(ValueError, match="contains the input folder"):
        canny_folder(folder, folder.parent)
    assert snapshot(folder) == before


def test_canny_folder_keeps_existing_outputs_unless_overwrite(folder, tmp_path):
    out = tmp_path / "edges"
    canny_folder(folder, out)
    (out / "good.png").write_bytes(b"mine")
    report = canny_folder(folder, out)
    assert report.kept == ["good.png"] and report.written == []
    assert (out / "good.png").read_bytes() == b"mine"
    report = canny_folder(folder, out, overwrite=True)
    assert report.written == ["good.png"]
    assert (out / "good.png").read_bytes().startswith(b"\x89PNG")


def test_canny_folder_mirrors_subfolders_fixes_exif_and_reports_clashes(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # rotate 90 degrees on display
    (src / "sub" / "rotated.png").write_bytes(png_bytes(wide, exif=exif))
    (src / "a.png").write_bytes(png_bytes(square()))
    (src / "a.jpg").write_bytes(png_bytes(square()))                    # PNG bytes named .jpg
    report = canny_folder(src, tmp_path / "out", low=50, high=150)
    assert sorted(report.written) == ["a.png", "sub/rotated.png"]
    with Image.open(tmp_path / "out" / "sub" / "rotated.png") as im:
        assert im.size == (20, 40)                                      # upright, as training sees it
    assert [rel for rel, _ in report.entries["exif_rotated"]] == ["sub/rotated.png"]
    assert [rel for rel, _ in report.entries["name_clash"]] == ["a.png"]   # a.jpg sorts first
    assert [rel for rel, _ in report.entries["wrong_extension"]] == ["a.jpg"]


def test_canny_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.md").write_text("hi")
    with pytest.raises(ValueError, match="no images found"):
        canny_folder(tmp_path / "in", tmp_path / "out")
