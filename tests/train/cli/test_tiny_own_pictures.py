"""configs/tiny_own_pictures.yaml: a LoRA on the bundled tiny base from a folder of one's own pictures
(issue 22 item 4), run from another directory for a few steps on landscape, portrait and square
pictures: the bundled base is found by name, the pictures go to aspect buckets (not all to 64 x 64,
where the demo's recipe centre-crops them), the trigger ends every caption (what the tiny base's
character-level text encoder wants), and previews are sampled as the demo samples.
"""
import json

from PIL import Image

from adapterkit.train.config import load_config
from adapterkit.train.data.captions import build_caption
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.jobs.lora import LoraRecipe
from adapterkit.train.paths import data_dir
from adapterkit.train.world.shapes import caption, render, sample_scenes
from adapterkit.unet.weights import read_header
from support.cli import run

RECIPE = data_dir("configs") / "tiny_own_pictures.yaml"
SIZES = [(96, 64), (64, 96), (80, 64), (64, 80), (64, 64), (120, 72)]


def own_pictures(folder):
    """Shapes-world scenes on canvases of several aspect ratios, captioned without the trigger."""
    folder.mkdir()
    for i, (scene, (w, h)) in enumerate(zip(sample_scenes(len(SIZES), 7, "outline"), SIZES)):
        picture = render(scene, 64)
        canvas = Image.new("RGB", (w, h), picture.getpixel((0, 0)))
        canvas.paste(picture, ((w - 64) // 2, (h - 64) // 2))
        canvas.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(caption(scene))
    return folder


def test_the_trigger_goes_after_the_caption():
    assert build_caption("a red star", "sks", 0.0, None, trigger_at="end") == "a red star, sks"
    assert build_caption("a red star", "sks", 0.0, None) == "sks, a red star"
    assert build_caption("a red star, sks", "sks", 0.0, None, trigger_at="end") == "a red star, sks"


def test_own_pictures_recipe_runs_with_aspect_buckets_and_a_trailing_trigger(tmp_path, monkeypatch, capsys):
    data = own_pictures(tmp_path / "mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                 # model.base assets/tiny-base: the bundled one
    overrides = [f"data.root={data}", "output.dir=out", "train.steps=2", "train.batch_size=2",
                 "sample.steps=2", "sample.seeds=[0]", "output.checkpoint_every=0"]
    code, out, err = run(["train", "lora", RECIPE, *overrides], capsys)
    assert code == 0, err
    buckets = next(line for line in out.splitlines() if line.startswith("buckets:"))
    parts = buckets[len("buckets: "):].split(", ")
    shapes = [tuple(map(int, part.split(":")[0].split("x"))) for part in parts]
    assert any(w != h for w, h in shapes), buckets        # not every picture squashed into 64 x 64
    assert {(48, 80), (80, 48)} <= set(shapes), buckets   # portrait and landscape alike

    cfg = load_config(RECIPE, LoraRecipe, overrides)
    dataset = CaptionedImageFolder.scan(cfg.data)
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    trained = [c for c in captions if c]                   # caption dropout may empty one
    assert trained and all(c.endswith(", sks") and not c.startswith("sks") for c in trained), captions

    lora = elsewhere / "out" / "my-style.safetensors"
    recipe = json.loads(read_header(lora)[1]["adapterkit.training_config"])
    assert recipe["data"]["trigger_at"] == "end"
    assert recipe["sample"]["guidance"] == 3.0 and cfg.sample.steps == 2
    assert (elsewhere / "out").is_dir() and any((elsewhere / "out").glob("*.png"))   # the preview grid
