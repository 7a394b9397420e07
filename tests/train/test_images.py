"""Sample grids and the loss curve: exact geometry, labels that are really drawn, a curve that is
inside its axes and goes the way the data goes, and bad values that are noted instead of fatal."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from adapterkit.train.images import ema, loss_curve_png, make_grid, save_grid, tensor_to_pil, write_png

WHITE = (255, 255, 255)


def test_tensor_to_pil_maps_the_stated_range():
    t = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(tensor_to_pil(t))[0, :, 0].tolist() == [0, 128, 255, 255]   # rounded, clipped
    half = torch.full((3, 2, 2), 0.5)
    assert np.asarray(tensor_to_pil(half, value_range=(0, 1)))[0, 0].tolist() == [128] * 3
    assert np.asarray(tensor_to_pil(half))[0, 0].tolist() == [191] * 3            # (0.5+1)/2*255
    assert tensor_to_pil(torch.zeros(1, 4, 5)).mode == "L"
    assert tensor_to_pil(torch.zeros(1, 3, 4, 5)).size == (5, 4)                   # batch of one
    with pytest.raises(ValueError, match="NaN"):
        tensor_to_pil(torch.tensor([[[float("nan")]]]))
    with pytest.raises(ValueError, match="shape"):
        tensor_to_pil(torch.zeros(2, 3, 4, 5))


def cells(n, w=32, h=24):
    """n distinct solid-colour RGB images."""
    return [Image.new("RGB", (w, h), (40 * i % 256, 255 - 30 * i, 90)) for i in range(n)]


def test_grid_without_labels_is_exactly_the_cells():
    ims = cells(6)
    grid = make_grid(ims, 2, 3)
    assert grid.size == (3 * 32, 2 * 24)
    for i, im in enumerate(ims):
        r, c = divmod(i, 3)
        assert grid.crop((c * 32, r * 24, c * 32 + 32, r * 24 + 24)).tobytes() == im.tobytes()


def test_grid_labels_add_margins_and_are_drawn(tmp_path):
    ims = cells(6)
    path = save_grid(ims, 2, 3, tmp_path / "grid.png", row_labels=["lora 0", "lora 1"],
                     col_labels=["c0", "c1", "a long column label that will not fit"], title="scales")
    grid = Image.open(path).convert("RGB")
    left, top = grid.width - 3 * 32, grid.height - 2 * 24
    assert left > 0 and top > 0                                         # margins exist...
    for i, im in enumerate(ims):                                        # ...and cells sit past them
        r, c = divmod(i, 3)
        box = (left + c * 32, top + r * 24, left + c * 32 + 32, top + r * 24 + 24)
        assert grid.crop(box).tobytes() == im.tobytes()
    a = np.asarray(grid)
    for r in range(2):                                                  # each row label has ink
        assert (a[top + r * 24:top + (r + 1) * 24, :left] != WHITE).any()
    for c in range(3):                                                  # each column label has ink
        assert (a[top // 2:top, left + c * 32:left + (c + 1) * 32] != WHITE).any()
    assert (a[:top // 2] != WHITE).any()                                # the title
    untitled = make_grid(ims, 2, 3, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    assert untitled.height < grid.height and untitled.width - 96 > 0


def test_grid_takes_tensors_in_either_range_and_leaves_empty_cells():
    t = torch.ones(3, 8, 8)                                              # white in both ranges
    grid = make_grid([t, None, torch.zeros(3, 8, 8)], 1, 3, background=(10, 20, 30))
    a = np.asarray(grid)
    assert (a[:, :8] == 255).all() and (a[:, 8:16] == (10, 20, 30)).all()
    assert (a[:, 16:] == 128).all()                                     # 0 in [-1, 1] is mid-grey
    assert (np.asarray(make_grid([torch.zeros(3, 8, 8)], 1, 1, value_range=(0, 1))) == 0).all()


def test_grid_refuses_wrong_counts():
    with pytest.raises(ValueError, match="do not fit"):
        make_grid(cells(5), 2, 2)
    with pytest.raises(ValueError, match="row_labels has 1 entries for 2 rows"):
        make_grid(cells(4), 2, 2, row_labels=["one"])


def test_write_png_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.png"
    write_png(Image.new("RGB", (4, 4), (1, 2, 3)), path)
    write_png(Image.new("RGB", (4, 4), (9, 9, 9)), path, text={"k": "v"})
    assert [p.name for p in path.parent.iterdir()] == ["b.png"]         # no temp file left
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (9, 9, 9) and im.text == {"k": "v"}


def curve_pixels(path, box):
    """Coordinates of the curves' (blue-dominant) pixels, and how many lie outside the plot box."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = (a[..., 2] - a[..., 0] > 60) & (a[..., 2] > 120)
    ys, xs = np.nonzero(blue)
    l, t, r, b = box
    outside = ((xs < l) | (xs > r) | (ys < t) | (ys > b)).sum()
    return xs, ys, outside


def test_loss_curve_is_drawn_inside_its_axes_and_follows_the_data(tmp_path):
    steps = np.arange(500)
    losses = 0.05 + np.exp(-steps / 100) + 0.02 * np.random.default_rng(0).random(500)
    info = loss_curve_png(steps, losses, tmp_path / "loss.png", title="loss", size=(640, 360))
    with Image.open(info.path) as im:
        assert im.size == (640, 360) and im.format == "PNG"
    l, t, r, b = info.plot_box
    assert 0 < l < r < 640 and 0 < t < b < 360
    xs, ys, outside = curve_pixels(info.path, info.plot_box)
    assert len(xs) > 300 and outside == 0
    # falling loss: the curve is high (small y) at the left, low at the right
    left_y = ys[xs < l + (r - l) // 5].mean()
    right_y = ys[xs > r - (r - l) // 5].mean()
    assert left_y < right_y - (b - t) / 3
    assert info.points == 500 and info.skipped == 0 and info.window == 25


def test_loss_curve_skips_non_finite_values_with_a_note(tmp_path, caplog):
    losses = [1.0, float("nan"), 0.5, float("inf"), 0.25, 0.2]
    with caplog.at_level(logging.WARNING, logger="adapterkit.train.images"):
        info = loss_curve_png(range(6), losses, tmp_path / "loss.png", smooth=2, log_y=True)
    assert info.skipped == 2 and info.points == 4
    assert "2 non-finite values skipped" in info.note and "non-finite" in caplog.text
    a = np.asarray(Image.open(info.path).convert("RGB")).astype(int)
    assert ((a[..., 0] - a[..., 2] > 80) & (a[..., 0] > 150)).any()     # the note, in red
    _, _, outside = curve_pixels(info.path, info.plot_box)
    assert outside == 0
    info = loss_curve_png([0, 1, 2], [0.5, 0.0, -1.0], tmp_path / "log.png", log_y=True)
    assert info.skipped == 2 and "<= 0" in info.note


def test_loss_curve_survives_no_usable_values(tmp_path):
    info = loss_curve_png([0, 1], [float("nan")] * 2, tmp_path / "loss.png", size=(300, 200))
    assert info.points == 0 and Image.open(info.path).size == (300, 200)
    info = loss_curve_png([], [], tmp_path / "empty.png")
    assert info.note == "no loss values"
    with pytest.raises(ValueError, match="3 steps but 2 losses"):
        loss_curve_png([0, 1, 2], [1.0, 2.0], tmp_path / "bad.png")


def test_ema_is_bias_corrected():
    assert ema(np.array([2.0, 2.0, 2.0]), 10).tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert ema(np.array([1.0, 3.0]), 1).tolist() == [1.0, 3.0]


def test_grid_labels_wrap_whole_prompts_and_the_footer_is_drawn(tmp_path):
    """A long prompt (the trigger word at its end) is wrapped onto several lines, never cut; the footer
    adds a band of ink under the cells."""
    from PIL import ImageDraw

    from adapterkit.train.images import _font, _text_size, _wrap
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(12)
    prompt = "a red star on a blue background with a thin outline and soft light, sks"
    wrapped = _wrap(draw, prompt, font, 120)
    assert wrapped.count("\n") >= 2 and "..." not in wrapped and wrapped.replace("\n", " ") == prompt
    assert all(_text_size(draw, line, font)[0] <= 120 for line in wrapped.split("\n"))
    assert _wrap(draw, "word " * 200, font, 60, max_lines=3).endswith("...")
    ims = cells(2)
    plain = make_grid(ims, 2, 1, row_labels=["a", "b"])
    footed = make_grid(ims, 2, 1, row_labels=["a", "b"], footer="seed 0, euler, 20 steps, guidance 5")
    assert footed.height > plain.height and footed.width == plain.width
    a = np.asarray(footed.convert("RGB"))
    assert (a[plain.height:] != WHITE).any()
