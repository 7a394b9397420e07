"""The validation loss of the LoRA job: held-out pictures never trained on, the same value for the same
weights at every evaluation, logged beside the training loss, early stop, exact resume; and the split
itself (train/data/split.py)."""
import dataclasses
import json
import shutil

import pytest

import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import ConfigError
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.data.holdout import split_validation
from adapterkit.train.data.split import ValidationSplit
from adapterkit.train.jobs.lora import main
from adapterkit.train.jobs.validation import Validator
from support.fixtures import alias
from support.pictures import shape_image
from support.recipes import crash_then_resume
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")
VALIDATED = {"data.validation.fraction": 0.25, "validation.every": 2,
             "validation.timesteps": "[50, 500, 950]"}


def rows(path):
    return [json.loads(r) for r in path.read_text().splitlines()]


def scan(root, **split):
    cfg = DataConfig(root=str(root), resolution=32, bucket_step=8, min_side=32, trigger="sks",
                     validation=ValidationSplit(**split))
    return CaptionedImageFolder.scan(cfg)


def test_a_fraction_holds_out_pictures_deterministically(images, tmp_path):
    folder = tmp_path / "pics"
    shutil.copytree(images, folder)
    shutil.copy(folder / "img00.png", folder / "copy00.png")   # a duplicate: the scan keeps one file
    train, held = split_validation(scan(folder, fraction=0.25))
    again_train, again_held = split_validation(scan(folder, fraction=0.25))
    assert [r.rel for r in held.records] == [r.rel for r in again_held.records]
    assert len(held) == 4 and len(train) == 12
    assert not {r.sha256 for r in train.records} & {r.sha256 for r in held.records}
    other = split_validation(scan(folder, fraction=0.25, seed=1))[1]
    assert [r.rel for r in other.records] != [r.rel for r in held.records]
    assert not held.cfg.flip and held.cfg.caption_dropout == 0 and not held.cfg.shuffle_tags
    assert split_validation(scan(folder))[1] is None


def test_a_validation_folder_must_not_share_pictures_or_folders(images, tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    shutil.copy(images / "img03.png", val / "renamed.png")
    with pytest.raises(ValueError, match=r"1 validation pictures are also training pictures \(renamed\.png = "
                                         r"img03\.png\): remove them"):
        split_validation(scan(images, folder=str(val)))
    with pytest.raises(ValueError, match="overlap"):
        split_validation(scan(images.parent, folder=str(images)))
    with pytest.raises(ValueError, match="holds out all"):
        split_validation(scan(val, fraction=0.5))
    with pytest.raises(ValueError, match="fraction or folder, not both"):
        ValidationSplit(fraction=0.1, folder=str(val))


def test_validation_pictures_are_never_trained_on_and_the_loss_is_logged(pipeline, images, tmp_path,
                                                                          monkeypatch):
    real, trained = lt.noisy_batch, set()

    def spy(dataset, *args, **kwargs):
        b = real(dataset, *args, **kwargs)
        trained.update(s["sha256"] for s in b.samples)
        return b

    monkeypatch.setattr(lt, "noisy_batch", spy)
    out = main(recipe(pipeline, images, tmp_path / "run", **VALIDATED, **{"train.steps": 8}))
    held = split_validation(scan(images, fraction=0.25))[1]
    assert trained and not trained & {r.sha256 for r in held.records}
    log = rows(out / "validation.jsonl")
    assert [r["step"] for r in log] == [0, 2, 4, 6, 8]
    assert all(r["val_loss"] > 0 for r in log) and len({r["val_loss"] for r in log}) == 5
    assert (out / "validation.png").is_file()
    assert [r["step"] for r in rows(out / "loss.jsonl")] == list(range(1, 9))


def test_the_same_weights_give_the_same_loss_and_validating_leaves_training_alone(pipeline, images,
                                                                                  tmp_path, monkeypatch):
    """With LoRA dropout on (the global generator, train mode), two calls on the same weights agree bit
    for bit (eval mode, fixed noise), and a run that validates on a folder trains exactly as one that
    does not (no draw of the training's generators)."""
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        shape_image(i).save(val / f"v{i}.png")
        (val / f"v{i}.txt").write_text("a shape")
    real, pairs = Validator.loss, []

    def twice(self):
        pairs.append((real(self), real(self)))
        return pairs[-1][0]

    monkeypatch.setattr(Validator, "loss", twice)
    options = {"lora.dropout": 0.5, "train.steps": 4}
    plain = main(recipe(pipeline, images, tmp_path / "plain", **options))
    validated = main(recipe(pipeline, images, tmp_path / "validated", **options, **{
        "data.validation.folder": str(val), "validation.every": 2}))
    assert len(pairs) == 3 and all(a == b for a, b in pairs)
    assert len({a for a, _ in pairs}) == 3                   # and the weights did change between them
    losses = lambda out: [r["loss"] for r in rows(out / "loss.jsonl")]   # noqa: E731
    assert losses(plain) == losses(validated)


def test_no_improvement_stops_early_and_exports(pipeline, images, tmp_path, capsys):
    # a new best must beat the best by min_delta = 1e9: only the first evaluation (step 0) is one
    out = main(recipe(pipeline, images, tmp_path / "run", **(VALIDATED | {
        "validation.every": 1, "validation.patience": 2, "validation.min_delta": 1e9, "train.steps": 6})))
    assert [r["step"] for r in rows(out / "validation.jsonl")] == [0, 1, 2]
    printed = capsys.readouterr().out
    assert "early stop at step 2" in printed and "(best" in printed and "at step 0)" in printed
    assert [r["step"] for r in rows(out / "loss.jsonl")] == [1, 2]
    assert (out / "lora.safetensors").is_file()                              # exported as at a normal end


def test_resume_repeats_the_validation_curve(pipeline, images, tmp_path, monkeypatch):
    straight = main(recipe(pipeline, images, tmp_path / "straight", **VALIDATED))
    resumed = crash_then_resume(
        monkeypatch, lt, lambda: lt.main(recipe(pipeline, images, tmp_path / "resumed", **VALIDATED)),
        at_call=4)
    assert rows(straight / "validation.jsonl") == rows(resumed / "validation.jsonl")
    assert [r["step"] for r in rows(resumed / "validation.jsonl")] == [0, 2, 4]


def test_validation_settings_need_held_out_pictures(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match=r"validation: settings need held-out pictures"):
        recipe(pipeline, images, tmp_path, **{"validation.patience": 3})
    with pytest.raises(ConfigError, match=r"data\.validation\.fraction"):
        recipe(pipeline, images, tmp_path, **{"data.validation.fraction": 1.0})
    cfg = recipe(pipeline, images, tmp_path, **{"data.validation.fraction": 0.25,
                                                "validation.timesteps": "[1000]"})
    with pytest.raises(ValueError, match=r"validation\.timesteps \[1000\] are outside"):
        main(dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(tmp_path / "bad"))))
