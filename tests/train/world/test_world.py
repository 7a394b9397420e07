"""The shapes world: scenes from a seed, renders byte for byte, captions that say what is drawn,
shapes inside the frame, and training folders that train.data reads as intended."""
import itertools
import json
import re
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from adapterkit.train.data.canny import SETTINGS_KEY, canny
from adapterkit.train.data.folder import DataConfig, scan_folder
from adapterkit.train.world.shapes import (
    COLOURS,
    MARGIN,
    SCENES_NAME,
    SHAPES,
    SIZE_RANGE,
    STYLES,
    Scene,
    canny_map,
    caption,
    load_scenes,
    render,
    render_folder,
    sample_scene,
    sample_scenes,
    shape_mask,
)

CAPTION = re.compile(r"an? (\w+) (\w+) on an? (\w+) background(?:, (\w+))?")


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    a = render_folder(tmp_path / "a", 12, seed=7, style="stripes", trigger="sks")
    b = render_folder(tmp_path / "b", 12, seed=7, style="stripes", trigger="sks")
    assert a == b
    assert png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")
    c = render_folder(tmp_path / "c", 12, seed=8, style="stripes", trigger="sks")
    assert c != a and png_bytes(tmp_path / "c") != png_bytes(tmp_path / "a")
    again = Scene.from_dict(json.loads(json.dumps(a[0].to_dict())))     # through scenes.jsonl
    assert again == a[0] and render(again).tobytes() == render(a[0]).tobytes()


@pytest.mark.parametrize("scene, trigger, text", [
    (Scene("star", "red", "blue", (0.5, 0.5), 0.3), None, "a red star on a blue background"),
    (Scene("circle", "orange", "white", (0.5, 0.5), 0.3), None, "an orange circle on a white background"),
    (Scene("cross", "green", "orange", (0.5, 0.5), 0.3, 10, "outline"), "sks",
     "a green cross on an orange background, sks"),
])
def test_caption_text(scene, trigger, text):
    assert caption(scene, trigger) == text


def test_captions_name_the_scene():
    for s in sample_scenes(300, seed=1, style="outline"):
        m = CAPTION.fullmatch(caption(s, "zkz"))
        assert m and m.groups() == (s.colour, s.shape, s.background, "zkz")


def test_colours_stay_apart():
    """The docstring's promise: CIE76 >= 34 and >= 80 in some channel (a Canny edge) for every pair."""
    rgb = np.array(list(COLOURS.values()), np.float32)
    lab = cv2.cvtColor(rgb[None] / 255, cv2.COLOR_RGB2LAB)[0]
    for i, j in itertools.combinations(range(len(rgb)), 2):
        assert np.linalg.norm(lab[i] - lab[j]) >= 34 and np.abs(rgb[i] - rgb[j]).max() >= 80
    assert (0, 0, 0) not in COLOURS.values()                            # the outline's colour


def test_sampling_covers_the_world_and_never_hides_the_shape():
    scenes = sample_scenes(1500, seed=2)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS) == {s.background for s in scenes}
    assert all(s.colour != s.background for s in scenes)
    sizes = np.array([s.size for s in scenes])
    assert SIZE_RANGE[0] <= sizes.min() and sizes.max() <= SIZE_RANGE[1]
    assert all(s.style is None for s in scenes)
    assert sample_scene(np.random.default_rng(0), "stripes").style == "stripes"


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_lie_inside_the_frame_with_a_background_border(size):
    for s in sample_scenes(200, seed=3, style="outline"):
        m = shape_mask(s, size, supersample=4)
        assert m.any()
        band = max(1, int(MARGIN * size * 4))                          # the margin, in subpixels
        assert not (m[:band].any() or m[-band:].any() or m[:, :band].any() or m[:, -band:].any())
        a = np.asarray(render(s, size))
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])       # (4 * size, 3)
        assert (border == COLOURS[s.background]).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"shape": "oval"}, "unknown shape"),
    ({"colour": "teal"}, "unknown colour"),
    ({"background": "red"}, "both red"),
    ({"style": "sketch"}, "unknown style"),
    ({"center": (0.1, 0.5)}, "leaves the frame"),
    ({"size": 0.6}, "size"),
])
def test_bad_scenes_are_refused(kwargs, match):
    good = {"shape": "star", "colour": "red", "background": "blue", "center": (0.5, 0.5), "size": 0.3}
    with pytest.raises(ValueError, match=match):
        Scene(**{**good, **kwargs})


def test_styles_change_the_inside_and_keep_the_silhouette():
    for s in sample_scenes(30, seed=4):
        plain = np.asarray(render(s)).astype(int)
        bg = np.array(COLOURS[s.background])
        silhouette = (plain != bg).any(axis=2)
        # Antialiased: edge pixels mix shape and background colour.
        assert len({tuple(p) for p in plain[silhouette]}) > 2
        for style in STYLES:
            styled = np.asarray(render(replace(s, style=style))).astype(int)
            assert ((styled != bg).any(axis=2) == silhouette).all()     # same outer shape
            changed = (styled != plain).any(axis=2)
            assert changed.sum() > 0.2 * silhouette.sum()               # visibly another style
        outline = np.asarray(render(replace(s, style="outline")))
        assert (outline[silhouette] == 0).all(axis=1).sum() > 0.1 * silhouette.sum()   # black ring


def test_render_size_and_canny_map():
    s = sample_scenes(1, seed=5)[0]
    assert render(s, 128).size == (128, 128) and render(s).mode == "RGB"
    hint = canny_map(s)
    assert hint.mode == "RGB" and hint.size == (64, 64)
    assert hint.tobytes() == canny(render(s)).tobytes() == canny_map(render(s)).tobytes()
    assert np.asarray(hint).any()


def test_render_folder_writes_pairs_and_edges(tmp_path):
    out = tmp_path / "world"
    scenes = render_folder(out, 5, seed=6, style="outline", trigger="sks", with_edges=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"0000{i}.{e}" for i in range(5) for e in ("png", "txt")] + [SCENES_NAME])
    assert load_scenes(out) == scenes
    for i, s in enumerate(scenes):
        assert (out / f"0000{i}.txt").read_text() == caption(s, "sks")
        assert Image.open(out / f"0000{i}.png").tobytes() == render(s).tobytes()
        edge = Image.open(tmp_path / "world_canny" / f"0000{i}.png")
        assert edge.tobytes() == canny_map(s).tobytes()
        assert json.loads(edge.text[SETTINGS_KEY])["low"] == 100
    # Edges live beside the folder, so the trainer sees exactly the captioned images.
    records, report = scan_folder(DataConfig(root=str(out), resolution=64))
    assert len(records) == 5 and not report.entries


def test_render_folder_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "world"
    render_folder(out, 4, seed=0)
    before = png_bytes(out)
    with pytest.raises(FileExistsError, match="not empty"):
        render_folder(out, 4, seed=1)
    assert png_bytes(out) == before                                    # nothing touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError):
        render_folder(tmp_path / "other", 2, seed=0)
    (out / "notes.md").write_text("mine")
    render_folder(out, 2, seed=1, overwrite=True)                      # an earlier render replaced
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00000.txt", "00001.png",
                                                     "00001.txt", "notes.md", SCENES_NAME]
    assert load_scenes(out) == sample_scenes(2, seed=1)
    with pytest.raises(ValueError):
        render_folder(tmp_path / "none", 0, seed=0)
