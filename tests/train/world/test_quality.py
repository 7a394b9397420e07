"""The quality measures against rendered ground truth: the classifier, the style detectors and the
edge score reach the accuracy their docstrings claim, on scenes the calibration never saw."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from adapterkit.train.world.quality import (
    break_outline,
    calibrate,
    classify,
    degrade,
    edge_f1_score,
    format_report,
    has_style,
    outline_continuity,
    quality_report,
    shape_colour_accuracy,
    shapes_kept,
    style_score,
)
from adapterkit.train.world.shapes import COLOURS, STYLES, canny_map, render, sample_scenes

N = 200
SEED = 2024                    # calibrate() uses seed 0: these are fresh scenes


@pytest.fixture(scope="module")
def world():
    """{(style, condition): (scenes, images)} for style None/outline/stripes, clean/degraded."""
    scenes = sample_scenes(N, SEED)
    rng = np.random.default_rng(SEED)
    out = {}
    for style in (None, *STYLES):
        styled = [replace(s, style=style) for s in scenes]
        clean = [render(s) for s in styled]
        out[style, "clean"] = styled, clean
        out[style, "degraded"] = styled, [degrade(im, rng) for im in clean]
    return out


@pytest.mark.parametrize("style", [None, *STYLES])
@pytest.mark.parametrize("condition, floor", [("clean", 0.97), ("degraded", 0.9)])
def test_classifier_accuracy(world, style, condition, floor):
    scenes, images = world[style, condition]
    acc = shape_colour_accuracy(images, scenes)
    assert set(acc) == {"shape", "colour", "background", "both"}
    assert min(acc.values()) >= floor, acc


@pytest.mark.parametrize("condition", ["clean", "degraded"])
@pytest.mark.parametrize("style", STYLES)
def test_style_detectors(world, style, condition):
    tpr = style_score(world[style, condition][1], style)
    fpr_plain = style_score(world[None, condition][1], style)
    other = next(s for s in STYLES if s != style)
    fpr_other = style_score(world[other, condition][1], style)
    assert tpr >= 0.95 and fpr_plain <= 0.05 and fpr_other <= 0.05, (tpr, fpr_plain, fpr_other)


def test_edge_f1_own_hint_is_one_and_another_scenes_is_low(world):
    scenes, images = world[None, "clean"]
    hints = [canny_map(s) for s in scenes[:60]]
    assert edge_f1_score(images[:60], hints) == 1.0
    others = hints[1:] + hints[:1]
    assert edge_f1_score(images[:60], others) < 0.35
    degraded = world[None, "degraded"][1][:60]
    assert edge_f1_score(degraded, hints) > 0.9
    with pytest.raises(ValueError, match="one hint per sample"):
        edge_f1_score(images[:3], hints[:2])


def test_classify_inputs_and_an_empty_picture():
    s = sample_scenes(1, seed=3)[0]
    image = render(s)
    assert classify(image) == classify(np.asarray(image)) == (s.shape, s.colour, s.background)
    blank = Image.new("RGB", (64, 64), COLOURS["green"])
    assert classify(blank) == (None, None, "green")
    assert not has_style(blank, "outline") and not has_style(blank, "stripes")
    with pytest.raises(TypeError, match="tensor_to_pil"):
        classify(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="unknown style"):
        has_style(image, "sketch")


def test_degrade_is_seeded_and_mild():
    image = render(sample_scenes(1, seed=4)[0])
    a = degrade(image, np.random.default_rng(1))
    b = degrade(image, np.random.default_rng(1))
    assert a.tobytes() == b.tobytes() and a.size == image.size
    diff = np.abs(np.asarray(a, float) - np.asarray(image, float))
    assert 0 < diff.mean() < 20


def test_quality_report_and_table(world):
    scenes, images = world["outline", "degraded"]
    hints = [canny_map(s) for s in scenes[:20]]
    report = quality_report(images[:20], scenes[:20], hints)
    assert list(report) == ["n", "shape", "colour", "background", "both", "outline", "stripes",
                            "outline_continuity", "edge_f1"]
    assert report["n"] == 20 and report["outline"] >= 0.95 and report["stripes"] <= 0.05
    assert report["outline_continuity"] >= 0.97
    assert quality_report(images[:5]).keys() == {"n", "outline", "stripes", "outline_continuity"}
    table = format_report({"base": quality_report(world[None, "clean"][1][:20]), "base + LoRA": report})
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith("base + LoRA") and "edge_f1" in lines[0]
    assert lines[1].split()[-1] == "-"                                 # no hints for that row
    assert format_report(report).splitlines()[1].split()[0] == "20"


def test_calibrate_returns_a_row_per_style_and_condition():
    table = calibrate(n=12, seed=5, conditions=("clean",))
    assert list(table) == ["plain clean", "outline clean", "stripes clean"]
    assert table["plain clean"]["both"] == 1.0 and table["plain clean"]["edge_f1"] == 1.0
    assert table["outline clean"]["outline"] == 1.0 and table["stripes clean"]["stripes"] == 1.0
    with pytest.raises(ValueError, match="unknown conditions"):
        calibrate(n=2, conditions=("blurry",))


def test_outline_continuity_separates_clean_from_broken_outlines(world):
    """Fresh scenes: every outlined render, clean or degraded, scores above every picture whose outline
    is broken over 30% of the way round (degraded alike); plain pictures score 0 (calibrate_outline
    has the figures)."""
    scenes, _ = world["outline", "clean"]
    rng = np.random.default_rng(0)
    kept = [outline_continuity(im) for key in (("outline", "clean"), ("outline", "degraded"))
            for im in world[key][1][:60]]
    broken = [outline_continuity(degrade(break_outline(s, rng, share=0.3, specks=20), rng))
              for s in scenes[:60]]
    plain = [outline_continuity(im) for im in world[None, "clean"][1][:60]]
    assert min(kept) > max(broken), (min(kept), max(broken))
    assert np.mean(kept) >= 0.99 and np.mean(broken) <= 0.85 and max(plain) == 0.0


def test_shapes_kept_counts_lost_and_shrunk_shapes(world):
    scenes, images = world["outline", "clean"]
    scenes, images = scenes[:12], images[:12]
    same = shapes_kept(images, images, scenes)
    assert same == {"shapes_lost": 0, "size_ratio": 1.0}
    other = {"circle": "square", "square": "circle", "triangle": "hexagon", "star": "circle",
             "hexagon": "triangle", "cross": "circle"}
    wrong = [render(replace(s, shape=other[s.shape])) for s in scenes[:3]] + images[3:]
    assert shapes_kept(images, wrong, scenes)["shapes_lost"] == 3
    small = [render(replace(s, size=s.size * 0.7)) for s in scenes]
    assert shapes_kept(images, small, scenes)["size_ratio"] < 0.8
