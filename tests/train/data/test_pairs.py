"""The ControlNet pairing policy (train/data/pairs.py: PAIR_POLICY, pair_folder,
PairedFolder.scan, PairReport), one row at a time: a conditioning image of another aspect ratio or
a damaged one is skipped and named while the other pairs train; the user's files are only read; an
all-black map is noted; a map of another size is resized and then cropped exactly like its target;
a folder without one usable pair stops, saying why. And the Canny thresholds the ControlNet records
are the ones its maps were made with (no rounding of fractional thresholds)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapterkit.adapters.controlnet import HintSpec
from adapterkit.train.data.buckets import RESAMPLE
from adapterkit.train.data.canny import SETTINGS_KEY, canny, edge_map_tensor, write_png
from adapterkit.train.data.folder import DataConfig, scan_folder
from adapterkit.train.data.pairs import PAIR_POLICY, HintSource, PairedFolder, pair_folder
from adapterkit.train.images import tensor_to_pil, unit_tensor
from support.fixtures import alias
from support.pictures import png_bytes, shape_image, snapshot

images = alias("images", "controlnet_images")

N = 12                                      # the images fixture: img00..img11, img11 is 96x64


def edges(i: int, size=None) -> Image.Image:
    """The Canny map of image i (as the `images` fixture draws it) at its own size, or resized."""
    own = tensor_to_pil(edge_map_tensor(shape_image(i, (96, 64) if i == 11 else (64, 64))), (0.0, 1.0))
    return own if size is None else own.resize(size, RESAMPLE)


def cond_folder(root: Path, special: dict) -> Path:
    """Every image's own map as <root>/imgNN.png, except those in `special`: i -> a PIL image to
    save instead, raw bytes to write instead, or None (no file)."""
    root.mkdir()
    for i in range(N):
        what = special.get(i, edges(i))
        if isinstance(what, Image.Image):
            what.save(root / f"img{i:02d}.png")
        elif what is not None:
            (root / f"img{i:02d}.png").write_bytes(what)
    return root


def data(images, **kw) -> DataConfig:  # noqa: F811 - the imported fixture
    return DataConfig(root=str(images), resolution=64, bucket_step=16, min_side=32, **kw)


def found(ds: PairedFolder) -> dict[str, list[str]]:
    return {k: [rel for rel, _ in v] for k, v in ds.pairs.entries.items()}


def hint_oracle(cond: Image.Image, size, crop) -> torch.Tensor:
    """What the hint of a conditioning image must be: resized to its image's size if needed, then the
    target's own crop (box, scale, flip)."""
    return unit_tensor(crop.apply(cond if cond.size == size else cond.resize(size, RESAMPLE)))


def test_another_aspect_ratio_is_skipped_and_named_and_the_other_pairs_train(images, tmp_path):  # noqa: F811
    cond = cond_folder(tmp_path / "cond", {2: edges(2, (96, 64)), 11: edges(11, (64, 64))})
    ds = PairedFolder.scan(data(images, random_crop=True, flip=True), HintSource(folder=str(cond)))
    assert found(ds) == {"aspect_mismatch": ["img02.png", "img11.png"]}
    assert PAIR_POLICY["aspect_mismatch"][0] == "skip"
    assert len(ds) == N - 2 and {r.rel for r in ds.records} == {f"img{i:02d}.png" for i in range(N)} - \
        {"img02.png", "img11.png"}
    summary = ds.summary()
    assert f"{N - 2} of {N} images paired" in summary
    assert "aspect_mismatch" in summary and PAIR_POLICY["aspect_mismatch"][1] in summary
    assert "img02.png: img02.png is 96x64, the image 64x64" in summary
    assert "img11.png: img11.png is 64x64, the image 96x64" in summary
    # every kept image trains with its own map, cropped (and flipped) like itself, over a few epochs
    for epoch in range(3):
        for i, rec in enumerate(ds.records):
            s = ds[(epoch, i)]
            assert s["hint"].shape == s["pixel_values"].shape
            assert torch.equal(s["hint"], hint_oracle(edges(int(rec.rel[3:5])), rec.size, s["crop"]))


def test_a_damaged_conditioning_image_is_skipped_reported_and_left_untouched(images, tmp_path):  # noqa: F811
    whole = png_bytes(edges(4))
    cond = cond_folder(tmp_path / "cond", {4: whole[:len(whole) // 2],       # cut mid-data
                                           6: b"not an image at all"})
    before = snapshot(cond)
    ds = PairedFolder.scan(data(images), HintSource(folder=str(cond)))
    assert found(ds) == {"bad_conditioning": ["img04.png", "img06.png"]}
    assert PAIR_POLICY["bad_conditioning"][0] == "skip" and len(ds) == N - 2
    details = dict(ds.pairs.entries["bad_conditioning"])
    assert details["img04.png"].startswith("img04.png: corrupt")
    assert details["img06.png"].startswith("img06.png: unreadable")
    summary = ds.summary()
    assert "bad_conditioning" in summary and "img04.png" in summary and "img06.png" in summary
    for i in range(len(ds)):                                   # the others train
        assert ds[i]["hint"].any()
    assert snapshot(cond) == before                            # same bytes, same mtimes, no new files


def test_an_all_black_map_is_noted_and_still_trained_on(images, tmp_path):  # noqa: F811
    cond = cond_folder(tmp_path / "cond", {8: Image.new("RGB", (64, 64))})
    ds = PairedFolder.scan(data(images), HintSource(folder=str(cond)))
    assert found(ds) == {"blank": ["img08.png"]} and PAIR_POLICY["blank"][0] == "note"
    assert len(ds) == N
    assert "blank" in ds.summary() and "img08.png" in ds.summary()
    i = next(i for i, r in enumerate(ds.records) if r.rel == "img08.png")
    assert not ds[i]["hint"].any()
    assert all(ds[j]["hint"].any() for j in range(N) if j != i)


def test_a_map_of_another_size_is_resized_then_cropped_like_its_target(images, tmp_path):  # noqa: F811
    # half-size maps of a square and of the 96x64 image; a map of the picture itself (not of its
    # edges) for img11 shows the geometry: its hint must line up with the target, flipped or not
    picture = shape_image(11, (96, 64))
    cond = cond_folder(tmp_path / "cond", {1: edges(1, (32, 32)), 11: picture.resize((48, 32), RESAMPLE)})
    ds = PairedFolder.scan(data(images, random_crop=True, flip=True), HintSource(folder=str(cond)))
    assert found(ds) == {"resized": ["img01.png", "img11.png"]} and PAIR_POLICY["resized"][0] == "fix"
    assert dict(ds.pairs.entries["resized"])["img11.png"] == "img11.png: 48x32 -> 96x64"
    assert len(ds) == N
    i1, i11 = (next(i for i, r in enumerate(ds.records) if r.rel == n) for n in ("img01.png", "img11.png"))
    flips = set()
    for epoch in range(8):
        for i, cond_image in ((i1, edges(1, (32, 32))), (i11, picture.resize((48, 32), RESAMPLE))):
            s = ds[(epoch, i)]
            assert s["hint"].shape == s["pixel_values"].shape
            assert torch.equal(s["hint"], hint_oracle(cond_image, ds.records[i].size, s["crop"]))
            assert torch.equal(ds.hint((epoch, i)), s["hint"])                   # what train_step uses
        s = ds[(epoch, i11)]
        flips.add(s["crop"].flip)
        target = (s["pixel_values"] + 1) / 2
        # blurred by the round trip through 48x32, but aligned: far closer than the mirrored target
        assert (s["hint"] - target).abs().mean() < 0.5 * (s["hint"] - target.flip(-1)).abs().mean()
    assert flips == {True, False}


def test_a_folder_without_a_usable_pair_stops_saying_why(images, tmp_path):  # noqa: F811
    whole = png_bytes(edges(0))
    special = {i: edges(i, (96, 64)) if i % 2 else whole[:len(whole) // 3] for i in range(N)}
    special[11] = edges(11, (64, 64))
    cond = cond_folder(tmp_path / "cond", special)
    before = snapshot(cond)
    with pytest.raises(ValueError, match=f"none of the {N} training images has a usable conditioning") as e:
        PairedFolder.scan(data(images), HintSource(folder=str(cond)))
    message = str(e.value)
    for key in ("aspect_mismatch", "bad_conditioning"):
        assert key in message and PAIR_POLICY[key][1] in message
    assert "img00.png" in message and "img01.png" in message and "0 of 12 images paired" in message
    assert snapshot(cond) == before
    records, report = scan_folder(data(images))                # the function itself, as main reaches it
    with pytest.raises(ValueError, match="leave control.folder empty to train on Canny maps"):
        pair_folder(records, report.root, data(images), HintSource(folder=str(cond)))


# --- the Canny thresholds a ControlNet records --------------------------------------------------------

def step(height: int) -> np.ndarray:
    """A vertical step edge 0 -> `height`: Sobel's L1 gradient there is (1 + 2 + 1) x height."""
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, 16:] = height
    return a


def test_fractional_thresholds_act_as_their_floor_so_rounding_them_misrecords():
    # The oracle behind refusing them: cv2.Canny compares integer gradients with the thresholds, so
    # high=151.9 keeps a gradient of 152 = 4 x 38 (as 151 does), while round(151.9) = 152 does not.
    a = step(38)
    made = np.asarray(canny(a, 50, 151.9))
    assert made.any() and np.array_equal(made, np.asarray(canny(a, 50, 151)))
    assert not np.asarray(canny(a, 50, round(151.9))).any()


def test_canny_cli_refuses_fractional_thresholds_and_the_controlnet_records_the_given_ones(
        images, tmp_path, monkeypatch, capsys):  # noqa: F811
    import adapterkit.train.cli.main as train_cli
    monkeypatch.setattr(train_cli, "COMMAND_MODULES", ("adapterkit.train.cli.canny",))  # as test_canny_cli.py
    before = snapshot(images)
    out = tmp_path / "edges"
    assert train_cli.main(["canny", str(images), str(out), "--low", "50.5", "--high", "151.9"]) == 2
    err = capsys.readouterr().err
    assert "whole numbers" in err and "low=50.5" in err and "high=151.9" in err
    assert not out.exists()                                     # refused before writing anything
    assert train_cli.main(["canny", str(images), str(out), "--low", "50", "--high", "151"]) == 0
    ds = PairedFolder.scan(data(images), HintSource(folder=str(out)))
    assert len(ds) == N and not ds.pairs.entries
    assert ds.hint_spec == HintSpec("canny", "like-target", 50, 151)
    assert isinstance(ds.hint_spec.canny_low, int)
    with Image.open(out / "img03.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(canny(shape_image(3), 50, 151)))
    assert snapshot(images) == before


def test_maps_that_carry_fractional_thresholds_record_none(images, tmp_path):  # noqa: F811
    """PNGs written before the CLI refused fractions (or by hand): the maps were made with the floors,
    so recording round(151.9) = 152 would be wrong; no thresholds are recorded, as for mixed ones."""
    cond = tmp_path / "cond"
    cond.mkdir()
    for i in range(N):
        write_png(edges(i), cond / f"img{i:02d}.png",
                  text={SETTINGS_KEY: json.dumps({"low": 50.5, "high": 151.9, "blur": None})})
    ds = PairedFolder.scan(data(images), HintSource(folder=str(cond)))
    assert len(ds) == N and ds.hint_spec == HintSpec("canny", "like-target")
    # whole numbers written as floats (50.0) are recorded, as integers
    for i in range(N):
        write_png(edges(i), cond / f"img{i:02d}.png",
                  text={SETTINGS_KEY: json.dumps({"low": 50.0, "high": 151.0, "blur": None})})
    spec = PairedFolder.scan(data(images), HintSource(folder=str(cond))).hint_spec
    assert spec == HintSpec("canny", "like-target", 50, 151) and isinstance(spec.canny_high, int)
