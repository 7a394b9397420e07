"""Caption processing at batch time (tag shuffle, keep_tokens, tag dropout) and kohya's `N_name`
repeat folders: each option changes what a sample or an epoch holds, deterministically per
(seed, epoch, index), and leaves everything as it was when off."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapterkit.train.config import ConfigError, load_config
from adapterkit.train.data.buckets import BucketBatchSampler
from adapterkit.train.data.captions import build_caption, process_tags
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig, folder_repeats, scan_folder
from adapterkit.train.jobs.batches import BatchPlan
from adapterkit.train.jobs.lora import LoraRecipe

TAGS = "sks, red circle, blue ground, flat, outline, small, centered, simple"


def cfg(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **{"resolution": 64, "bucket_step": 16, "min_side": 16, **kw})


def picture(path: Path, caption: str, seed: int, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption)


def tags(caption: str) -> list[str]:
    return caption.split(", ")


# -- captions -------------------------------------------------------------------------------------


def test_off_by_default_the_caption_is_as_written(tmp_path):
    odd = "a,b , c,,d"                              # tag processing would normalise this
    rng = np.random.default_rng(0)
    assert build_caption(odd, "", 0.0, rng) == odd
    assert rng.random() == np.random.default_rng(0).random()      # and no number was drawn
    picture(tmp_path / "a.png", odd, 0)
    ds = CaptionedImageFolder.scan(cfg(tmp_path, flip=True, caption_dropout=0.3))
    for epoch in range(10):                        # the same draws as before the options existed
        rng = np.random.default_rng([0, 1, epoch, 0])
        rng.random()                                # the flip's draw comes first
        assert ds.describe((epoch, 0))["caption"] == build_caption(odd, "", 0.3, rng)


def test_shuffle_is_seeded_and_keeps_every_tag():
    draws = [build_caption(TAGS, "", 0.0, np.random.default_rng([0, i]), shuffle_tags=True)
             for i in range(50)]
    again = [build_caption(TAGS, "", 0.0, np.random.default_rng([0, i]), shuffle_tags=True)
             for i in range(50)]
    assert draws == again
    assert all(sorted(tags(d)) == sorted(tags(TAGS)) for d in draws)
    assert len(set(draws)) > 40                    # 8! orders: shuffled, not fixed


@pytest.mark.parametrize("keep", [1, 3])
def test_kept_tokens_never_move_over_100_shuffles(keep):
    head = tags(TAGS)[:keep]
    draws = [process_tags(TAGS, np.random.default_rng([1, i]), shuffle=True, keep_tokens=keep,
                          tag_dropout=0.5) for i in range(100)]
    assert all(tags(d)[:keep] == head for d in draws)
    assert len({tuple(tags(d)[keep:]) for d in draws}) > 50       # the rest does move
    assert tags(process_tags(TAGS, np.random.default_rng(0), shuffle=True, keep_tokens=99)) == tags(TAGS)


def test_tag_dropout_rate_is_p():
    p, n = 0.3, 2000
    rest = tags(TAGS)[1:]
    dropped = Counter()
    for i in range(n):
        got = tags(process_tags(TAGS, np.random.default_rng([2, i]), keep_tokens=1, tag_dropout=p))
        assert got[0] == "sks"                        # kept, never dropped
        dropped.update(t for t in rest if t not in got)
    for t in rest:                                     # per tag: binomial(2000, 0.3), sd ~0.01
        assert abs(dropped[t] / n - p) < 0.04, (t, dropped[t] / n)
    assert process_tags(TAGS, np.random.default_rng(0), tag_dropout=1.0) == ""
    # the trigger is never dropped, even when it is not kept
    assert process_tags("a, sks, b", np.random.default_rng(0), tag_dropout=1.0, trigger="sks") == "sks"
    assert build_caption("a, b", "sks", 0.0, np.random.default_rng(0), tag_dropout=1.0) == "sks"


def test_dataset_draws_tags_per_epoch_and_index(tmp_path):
    picture(tmp_path / "a.png", TAGS.removeprefix("sks, "), 0)
    picture(tmp_path / "b.png", TAGS.removeprefix("sks, "), 1)
    c = cfg(tmp_path, trigger="sks", shuffle_tags=True, tag_dropout=0.2)
    ds, again = CaptionedImageFolder.scan(c), CaptionedImageFolder.scan(c)
    keys = [(epoch, i) for epoch in range(20) for i in range(2)]
    captions = [ds.describe(k)["caption"] for k in keys]
    assert captions == [again.describe(k)["caption"] for k in keys]     # same seed, same captions
    assert all(c.startswith("sks, ") for c in captions)                 # the trigger goes first
    assert len(set(captions)) > 30                                      # varies by epoch and index
    assert ds.records[0].caption == TAGS.removeprefix("sks, ")          # the scan keeps the caption
    other = CaptionedImageFolder.scan(dataclasses.replace(c, seed=1))
    assert [other.describe(k)["caption"] for k in keys] != captions


def test_tag_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="tag_dropout"):
        cfg(tmp_path, tag_dropout=1.5)
    with pytest.raises(ValueError, match="keep_tokens"):
        cfg(tmp_path, keep_tokens=-1)
    with pytest.raises(ConfigError, match="data.keep_tokens"):
        load_config({"model": {"base": "b"}, "data": {"root": "r", "keep_tokens": -2}}, LoraRecipe)
    recipe = load_config({"model": {"base": "b"}, "data": {"root": "r"}}, LoraRecipe,
                         ["data.shuffle_tags=true", "data.keep_tokens=2", "data.tag_dropout=0.1",
                          "data.kohya_repeats=true"])
    d = recipe.data
    assert (d.shuffle_tags, d.keep_tokens, d.tag_dropout, d.kohya_repeats) == (True, 2, 0.1, True)


# -- repeat folders -------------------------------------------------------------------------------


def repeat_folder(root: Path) -> Path:
    picture(root / "10_mystyle" / "a.png", "a", 0)
    picture(root / "10_mystyle" / "deep" / "b.png", "b", 1, (48, 32))
    picture(root / "reg" / "c.png", "c", 2)
    picture(root / "3_x" / "d.png", "d", 3)
    picture(root / "e.png", "e", 4, (32, 48))
    return root


def test_folder_repeats_rule():
    assert folder_repeats(Path("10_mystyle/a.png"), True) == ("10_mystyle", 10)
    assert folder_repeats(Path("10_mystyle/a.png"), False) == ("10_mystyle", 1)
    assert folder_repeats(Path("10_mystyle.png"), True) == (".", 1)            # a file, not a folder
    assert folder_repeats(Path("mystyle_10/a.png"), True) == ("mystyle_10", 1)
    assert folder_repeats(Path("10_/a.png"), True) == ("10_", 1)               # no name: not the rule
    with pytest.raises(ValueError, match="0_x.*N >= 1"):
        folder_repeats(Path("0_x/a.png"), True)


def test_a_10_name_folder_is_seen_10_times_per_epoch(tmp_path):
    ds = CaptionedImageFolder.scan(cfg(repeat_folder(tmp_path), kohya_repeats=True))
    want = {"10_mystyle/a.png": 10, "10_mystyle/deep/b.png": 10, "reg/c.png": 1, "3_x/d.png": 3, "e.png": 1}
    assert {r.rel: r.repeats for r in ds.records} == want
    for batch_size in (1, 2, 3):
        sampler = ds.batch_sampler(batch_size)
        for epoch in range(3):
            seen = Counter(ds.records[k[1]].rel for b in sampler.epoch_batches(epoch)
                           for k in (sampler.key(epoch, s) for s in b))
            assert seen == want
        assert len(sampler) == sum(-(-n // batch_size) for n in (10 + 1 + 3, 10, 1))  # per bucket
    report = ds.report
    assert report.epoch_samples == 25 and report.folders["10_mystyle"] == [2, 10]
    text = report.summary()
    for line in ("10_mystyle/: 2 x 10 = 20", "3_x/: 1 x 3 = 3", "reg/: 1 x 1 = 1", "./: 1 x 1 = 1",
                 "epoch: 25 samples from 5 images"):
        assert line in text, text


def test_repeats_off_by_default(tmp_path):
    ds = CaptionedImageFolder.scan(cfg(repeat_folder(tmp_path)))
    assert all(r.repeats == 1 for r in ds.records)
    sampler = ds.batch_sampler(1)
    assert sampler.slots == [(i, 0) for i in range(5)] and len(sampler) == 5
    assert ds.report.epoch_samples == 5 and "10_mystyle/: 2 x 1 = 2" in ds.report.summary()
    _, one = scan_folder(cfg(tmp_path / "reg"))
    assert "folders:" not in one.summary()          # a plain folder's report is as before


def test_copies_draw_their_own_caption_and_flip(tmp_path):
    picture(tmp_path / "10_s" / "a.png", TAGS, 0)
    ds = CaptionedImageFolder.scan(cfg(tmp_path, kohya_repeats=True, shuffle_tags=True, flip=True))
    sampler = ds.batch_sampler(1)
    keys = [sampler.key(0, s) for b in sampler.epoch_batches(0) for s in b]
    assert sorted(keys) == [(0, 0)] + [(0, 0, c) for c in range(1, 10)]
    samples = [ds.describe(k) for k in keys]
    assert len({s["caption"] for s in samples}) == 10
    assert len({s["crop"].flip for s in samples}) == 2
    assert ds[keys[3]]["pixel_values"].shape == (3, 64, 64)


def test_repeats_resume_equals_uninterrupted(tmp_path):
    ds = CaptionedImageFolder.scan(cfg(repeat_folder(tmp_path), kohya_repeats=True))

    def run(sampler, epochs, start=(0, 0)):
        out = []
        for epoch in epochs:
            sampler.set_epoch(epoch, start[1] if epoch == start[0] else 0)
            out += [tuple(b) for b in sampler]
        return out

    full = run(ds.batch_sampler(2), range(3))
    per_epoch = len(ds.batch_sampler(2))
    for epoch, step in [(0, 3), (1, 0), (2, per_epoch - 1)]:
        assert run(ds.batch_sampler(2), range(epoch, 3), (epoch, step)) == full[epoch * per_epoch + step:]
    plan, fresh = BatchPlan(ds, 2, 1, 1, 0), BatchPlan(ds, 2, 1, 1, 0)   # the trainer's view
    steps = range(3 * per_epoch)
    assert [plan.keys(s, 0) for s in steps] == [list(b) for b in full]
    assert [fresh.keys(s, 0) for s in reversed(steps)] == [list(b) for b in reversed(full)]


def test_sampler_checks_repeats():
    with pytest.raises(ValueError, match="repeats"):
        BucketBatchSampler([(32, 32)] * 2, 1, repeats=[1])
    with pytest.raises(ValueError, match="repeats"):
        BucketBatchSampler([(32, 32)] * 2, 1, repeats=[1, 0])
