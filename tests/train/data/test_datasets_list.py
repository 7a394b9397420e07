"""`data.datasets`: several datasets with repeats or weights, per-entry triggers and resolutions,
regularisation pictures balanced to the training samples, held-out pictures kept out of the epoch.
Each test fails when its option is ignored."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapterkit.train.config import ConfigError, load_config
from adapterkit.train.data.datasets_list import DatasetList, epoch_counts, open_data
from adapterkit.train.data.entries import DatasetEntry
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.data.holdout import split_validation
from adapterkit.train.jobs.batches import BatchPlan
from adapterkit.train.jobs.lora import LoraRecipe
from adapterkit.train.jobs.recipe import public_recipe
from adapterkit.train.jobs.run_metadata import train_samples

BASE = {"resolution": 32, "bucket_step": 8, "min_side": 16}


def picture(path: Path, caption: str, seed: int, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption)


def folder(root: Path, n: int, caption: str, seed: int, size=(32, 32)) -> Path:
    for i in range(n):
        picture(root / f"{i:02d}.png", caption, seed + i, size)
    return root


def recipe(data: dict, tmp_path: Path | None = None, **overrides) -> LoraRecipe:
    return load_config({"model": {"base": "x"}, "data": {**BASE, **data}}, LoraRecipe,
                       [f"{k}={v}" for k, v in overrides.items()])


def data_cfg(entries: list[dict], **kw) -> DataConfig:
    return recipe({"datasets": entries, **kw}).data


def seen(ds, batch_size: int = 2, epochs=range(3)) -> list[Counter]:
    """Per epoch: how often each (dataset, picture) is drawn, through the trainer's BatchPlan."""
    plan = BatchPlan(ds, batch_size, 1, 1, 0)
    out = []
    for epoch in epochs:
        batches = plan.sampler.epoch_batches(epoch)
        keys = [plan.sampler.key(epoch, s) for b in batches for s in b]
        out.append(Counter((ds.describe(k)["dataset"], ds.records[k[1]].rel) for k in keys))
    return out


# -- repeats, weights, regularisation -------------------------------------------------------------

def test_a_dataset_with_repeats_3_is_seen_3_times_per_epoch(tmp_path):
    a, b = folder(tmp_path / "a", 3, "a cat", 0), folder(tmp_path / "b", 2, "a dog", 10, (48, 32))
    ds = open_data(data_cfg([{"root": str(a), "repeats": 3}, {"root": str(b)}]))
    assert isinstance(ds, DatasetList) and len(ds) == 5
    for batch_size in (1, 2, 3):
        for counts in seen(ds, batch_size):
            assert counts == {**{(0, f"{i:02d}.png"): 3 for i in range(3)},
                              **{(1, f"{i:02d}.png"): 1 for i in range(2)}}
    assert "a: 3 x 3 = 9" in ds.summary() and "b: 2 x 1 = 2" in ds.summary()
    assert "epoch: 11 samples (11 training)" in ds.summary()


def test_repeats_multiply_an_entrys_kohya_folders(tmp_path):
    folder(tmp_path / "a" / "2_x", 1, "a cat", 0)
    folder(tmp_path / "a" / "y", 1, "a cat", 1)
    ds = open_data(data_cfg([{"root": str(tmp_path / "a"), "repeats": 3, "kohya_repeats": True},
                             {"root": str(folder(tmp_path / "b", 1, "a dog", 5))}]))
    assert seen(ds, 1)[0] == {(0, "2_x/00.png"): 6, (0, "y/00.png"): 3, (1, "00.png"): 1}


@pytest.mark.parametrize("weights, sizes", [((1, 1), (2, 8)), ((3, 1), (5, 5)), ((1, 2, 5), (7, 3, 2))])
def test_weights_give_each_dataset_its_share_of_the_draws(tmp_path, weights, sizes):
    entries = [{"root": str(folder(tmp_path / f"d{k}", n, f"set {k}", 100 * k)), "weight": w}
               for k, (w, n) in enumerate(zip(weights, sizes))]
    ds = open_data(data_cfg(entries))
    draws = Counter()
    for counts in seen(ds, 2, range(40)):
        for (k, _), n in counts.items():
            draws[k] += n
    total = sum(draws.values())
    for k, w in enumerate(weights):
        assert abs(draws[k] / total - w / sum(weights)) < 0.02, (draws, weights)
    for k, n in enumerate(sizes):                                # every picture is seen
        assert len({rel for counts in seen(ds, 2, range(1)) for (d, rel) in counts if d == k}) == n


def test_the_samples_of_a_share_are_spread_evenly():
    entries = (DatasetEntry("a", weight=1.0), DatasetEntry("b", weight=3.0))
    counts = epoch_counts(entries, [[1] * 4, [1] * 5], 0)
    # n = ceil(max(4 / 0.25, 5 / 0.75)) = 16: a gets 4 (once each), b 12 over 5 pictures (2 or 3 each)
    assert counts[0] == [1, 1, 1, 1] and sum(counts[1]) == 12 and set(counts[1]) == {2, 3}


def test_regularisation_pictures_fill_as_many_samples_as_the_training_ones(tmp_path):
    a = folder(tmp_path / "a", 4, "a cat", 0)
    few, many = folder(tmp_path / "few", 5, "a photo", 20), folder(tmp_path / "many", 20, "a photo", 40)
    ds = open_data(data_cfg([{"root": str(a), "repeats": 3}, {"root": str(few), "regularization": True}]))
    counts = seen(ds, 2)[0]
    reg = {rel: n for (k, rel), n in counts.items() if k == 1}
    assert sum(reg.values()) == 12 and len(reg) == 5 and set(reg.values()) == {2, 3}    # cycled
    assert ds.train_samples == 12 and ds.reg_samples == 12
    assert "few: 5 reg, balanced to the training samples = 12 (loss x 1)" in ds.summary()
    ds = open_data(data_cfg([{"root": str(a)}, {"root": str(many), "regularization": True,
                                                 "prior_loss_weight": 0.25}]))
    reg = {rel: n for (k, rel), n in seen(ds, 2)[0].items() if k == 1}
    assert sum(reg.values()) == 4 and set(reg.values()) == {1}      # 4 of 20 used, as kohya does
    assert len(ds) == 8 and "16 more reg pictures than samples: unused" in ds.summary()
    assert {ds.describe(i)["loss_weight"] for i in range(len(ds))} == {1.0, 0.25}


# -- per-entry trigger, captions and resolution ---------------------------------------------------

def test_each_entrys_trigger_is_in_its_captions_only(tmp_path):
    a, b = folder(tmp_path / "a", 3, "red, circle", 0), folder(tmp_path / "b", 3, "blue, square", 10)
    reg = folder(tmp_path / "r", 3, "a shape", 20)
    ds = open_data(data_cfg([{"root": str(a), "trigger": "aaa"},
                             {"root": str(b), "trigger": "bbb", "shuffle_tags": True, "repeats": 4},
                             {"root": str(reg), "regularization": True, "trigger": ""}], trigger="top"))
    captions: dict[int, set] = {0: set(), 1: set(), 2: set()}
    plan = BatchPlan(ds, 1, 1, 1, 0)
    for epoch in range(3):
        for batch in plan.sampler.epoch_batches(epoch):
            d = ds.describe(plan.sampler.key(epoch, batch[0]))
            captions[d["dataset"]].add(d["caption"])
    assert captions[0] == {"aaa, red, circle"}                               # as written, not shuffled
    assert all(c.startswith("bbb") or ", bbb" in c for c in captions[1]) and len(captions[1]) > 1
    assert not any("aaa" in c or "top" in c for c in captions[1] | captions[2])
    assert captions[2] == {"a shape"}
    assert ds.cfg.varies_captions            # one entry shuffles: captions are encoded per step


def test_each_entry_has_its_own_resolution(tmp_path):
    a, b = folder(tmp_path / "a", 1, "a", 0, (64, 64)), folder(tmp_path / "b", 1, "b", 1, (64, 64))
    ds = open_data(data_cfg([{"root": str(a)}, {"root": str(b), "resolution": 48}]))
    assert ds.bucket_of == [(32, 32), (48, 48)]
    assert ds[(0, 1)]["pixel_values"].shape == (3, 48, 48)
    assert ds.buckets == tuple(sorted(set(ds.parts[0].buckets) | set(ds.parts[1].buckets)))


def test_one_root_is_served_as_before(tmp_path):
    cfg = DataConfig(root=str(folder(tmp_path / "a", 2, "a", 0)), **BASE)
    assert cfg.parts() == (cfg,) and type(open_data(cfg)) is CaptionedImageFolder
    assert not cfg.varies_captions and recipe({"root": cfg.root}).data == cfg


# -- held-out pictures are not in the epoch -------------------------------------------------------

def test_held_out_pictures_are_not_counted_in_the_epoch(tmp_path):
    folder(tmp_path / "10_style", 4, "a cat", 0)
    folder(tmp_path / "other", 4, "a dog", 10)
    cfg = recipe({"root": str(tmp_path), "kohya_repeats": True, "validation": {"fraction": 0.25}}).data
    train, held = split_validation(open_data(cfg))
    assert len(held) == 2 and len(train) == 6
    held_10 = sum(r.rel.startswith("10_style") for r in held.records)
    want = (4 - held_10) * 10 + (4 - (2 - held_10))
    assert train.report.epoch_samples == want == sum(r.repeats for r in train.records)
    assert f"epoch: {want} samples from 6 images (2 more held out for validation, not counted)" \
        in train.summary()
    assert train_samples(train) == want                       # the files' ss_num_train_images


def test_several_datasets_hold_out_from_training_entries_only(tmp_path):
    a, b = folder(tmp_path / "a", 4, "a cat", 0), folder(tmp_path / "b", 8, "a dog", 10)
    reg = folder(tmp_path / "r", 10, "a photo", 30)
    cfg = data_cfg([{"root": str(a), "repeats": 2, "trigger": "aaa"}, {"root": str(b)},
                    {"root": str(reg), "regularization": True}], validation={"fraction": 0.25})
    train, held = split_validation(open_data(cfg))
    assert [len(p) for p in held.parts] == [1, 2] and len(held) == 3
    assert train.train_samples == 3 * 2 + 6 == train_samples(train) and train.reg_samples == 12
    assert "a: 3 x 2 = 6 (1 held out for validation, not counted)" in train.summary()
    assert held.describe(0)["caption"] == "aaa, a cat"             # served with its entry's settings
    trained = {r.sha256 for r in train.records}
    assert not trained & {r.sha256 for r in held.records}


# -- the recipe is checked when it loads ----------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ({"root": "x", "datasets": [{"root": "y"}]}, "give root .* or datasets .*, not both"),
    ({}, r"root is missing \(a required key\)"),
    ({"datasets": [{"root": "y", "repeats": 2, "weight": 1.0}]},
     r"datasets\[0\]: give repeats \(2\) or weight"),
    ({"datasets": [{"root": "y", "repats": 2}]},
     r"datasets\[0\]\.repats: unknown key; did you mean 'repeats'"),
    ({"datasets": [{"root": "y", "repeats": 0}]}, r"datasets\[0\]\.repeats: must be >= 1"),
    ({"datasets": [{"root": "y", "weight": 0}]}, r"datasets\[0\]\.weight: must be > 0"),
    ({"datasets": [{"root": "y"}, {"root": "r", "regularization": True, "repeats": 2}]},
     "regularization entry takes no repeats or weight"),
    ({"datasets": [{"root": "y", "prior_loss_weight": 0.5}]}, "prior_loss_weight applies to regularization"),
    ({"datasets": [{"root": "y", "weight": 1}, {"root": "z"}]},
     r"datasets \[0\] have a weight and datasets \[1\]"),
    ({"datasets": [{"root": "r", "regularization": True}]}, "has only regularization entries"),
    ({"datasets": [{"root": "a/y"}, {"root": "b/y"}]}, "two datasets are named 'y'"),
    ({"datasets": [{"root": "y"}, {"root": "z", "resolution": 36}]}, r"datasets\[1\] \(z\): resolution 36"),
    ({"datasets": [{"root": "y", "tag_dropout": 2}]}, r"datasets\[0\]\.tag_dropout: must be >= 0 and <= 1"),
])
def test_bad_datasets_fail_when_the_recipe_loads(data, message):
    with pytest.raises(ConfigError, match=message):
        recipe(data)


def test_overlapping_or_shared_pictures_are_refused(tmp_path):
    a = folder(tmp_path / "a", 2, "a", 0)
    folder(tmp_path / "a" / "sub", 1, "a", 5)
    with pytest.raises(ValueError, match=r"datasets\[0\] .* and \[1\] .* overlap"):
        open_data(data_cfg([{"root": str(a)}, {"root": str(a / "sub"), "name": "sub"}]))
    folder(tmp_path / "b", 1, "a", 0)                           # the bytes of a/00.png
    with pytest.raises(ValueError, match=r"same picture is in data.datasets\[0\] \(00.png\) and "
                                         r"data.datasets\[1\] \(00.png\)"):
        open_data(data_cfg([{"root": str(tmp_path / "b")}, {"root": str(a)}]))


def test_entry_roots_resolve_beside_the_recipe_and_stay_private(tmp_path):
    folder(tmp_path / "pics" / "a", 1, "a", 0)
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {base: x}\ndata: {resolution: 32, bucket_step: 8, min_side: 16,\n"
                    "  datasets: [{root: pics/a, repeats: 2}]}\n")
    cfg = load_config(path, LoraRecipe)
    assert Path(cfg.data.datasets[0].root) == tmp_path / "pics" / "a"
    assert public_recipe(cfg)["data"]["datasets"][0]["root"] == "a"


def test_the_recipe_round_trips_and_caption_keys_follow_the_entries():
    from adapterkit.train.config import to_dict
    cfg = recipe({"shuffle_tags": True, "datasets": [{"root": "y", "shuffle_tags": False, "weight": 2},
                                                     {"root": "z", "weight": 1, "trigger": "t"}]})
    assert load_config(to_dict(cfg), LoraRecipe) == cfg
    assert [p.shuffle_tags for p in cfg.data.parts()] == [False, True]
    assert [p.trigger for p in cfg.data.parts()] == ["", "t"] and cfg.data.varies_captions
    only_off = recipe({"shuffle_tags": True, "datasets": [{"root": "y", "shuffle_tags": False}]})
    assert not only_off.data.varies_captions


def test_the_controlnet_job_refuses_several_datasets():
    from adapterkit.train.jobs.controlnet import ControlNetRecipe
    with pytest.raises(ConfigError, match="ControlNet job trains on one folder of pairs"):
        load_config({"model": {"base": "x"}, "data": {**BASE, "datasets": [{"root": "y"}]}}, ControlNetRecipe)
