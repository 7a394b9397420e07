"""The LoRA job on several datasets (`data.datasets`): regularisation pictures' loss is scaled by their
prior_loss_weight (0: they give no gradient), and a resumed run equals the uninterrupted one with two
datasets and a reg set on."""
import json
import shutil

import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file

import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import load_config
from adapterkit.train.jobs.lora import LoraRecipe, main
from adapterkit.train.pipeline.schedule import NoiseSchedule, diffusion_loss
from support.fixtures import alias
from support.recipes import crash_then_resume

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


def subset(images, dest, numbers, invert=False):
    """Pictures `numbers` of the fixture folder (64x64 each) with their captions, in `dest`;
    `invert`: the same files with every pixel inverted (other content, same size and caption)."""
    dest.mkdir(parents=True)
    for i in numbers:
        src = images / f"img{i:02d}.png"
        if invert:
            ImageOps.invert(Image.open(src).convert("RGB")).save(dest / src.name)
        else:
            shutil.copy(src, dest / src.name)
        shutil.copy(src.with_suffix(".txt"), dest / f"img{i:02d}.txt")
    return dest


def recipe(pipeline, out, datasets, steps=3, sections=None, overrides=(), **data) -> LoraRecipe:
    return load_config({**(sections or {}),
        "model": {"base": str(pipeline)},
        "data": {"datasets": datasets, "resolution": 32, "bucket_step": 8, "min_side": 32, "trigger": "sks",
                 **data},
        "lora": {"rank": 4, "alpha": 4, "targets": "attn"},
        "optim": {"lr": 1e-3},
        "train": {"steps": steps, "batch_size": 4, "min_snr_gamma": 5.0},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1},
    }, LoraRecipe, list(overrides))


def test_sample_weights_scale_each_samples_loss():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 900])
    out.requires_grad_(True)
    per = torch.stack([diffusion_loss(out[i:i + 1], x0[i:i + 1], noise[i:i + 1], t[i:i + 1], s, 5.0)
                       for i in range(3)])
    w = torch.tensor([1.0, 0.0, 0.5])
    loss = diffusion_loss(out, x0, noise, t, s, 5.0, weights=w)
    torch.testing.assert_close(loss, (per * w).mean())
    loss.backward()
    assert not out.grad[1].any() and out.grad[0].abs().sum() > 0 and out.grad[2].abs().sum() > 0


@pytest.fixture(scope="module")
def folders(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {"a": subset(images, root / "a", range(0, 5)), "b": subset(images, root / "b", range(5, 8)),
            "reg": subset(images, root / "reg", range(8, 12)),
            "reg_inverted": subset(images, root / "reg_inverted", range(8, 12), invert=True)}


def test_a_prior_loss_weight_of_0_makes_reg_pictures_give_no_gradient(pipeline, folders, tmp_path,
                                                                       monkeypatch):
    real, weights = lt.diffusion_loss, []

    def spy(*args, **kwargs):
        weights.append(kwargs.get("weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lt, "diffusion_loss", spy)

    def run(reg: str, prior: float):
        entries = [{"root": str(folders["a"])}, {"root": str(folders["b"]), "trigger": "zzz"},
                   {"root": str(folders[reg]), "name": "reg", "regularization": True,
                    "prior_loss_weight": prior, "trigger": ""}]
        out = main(recipe(pipeline, tmp_path / f"{reg}-{prior}", entries))
        return load_file(str(out / "lora.safetensors"))

    ignored, ignored_inverted = run("reg", 0.0), run("reg_inverted", 0.0)
    seen = [w for w in weights if w is not None]
    assert seen and all(set(w.tolist()) <= {0.0, 1.0} and 0.0 in w.tolist() for w in seen)
    for k in ignored:                      # other reg pictures, the same LoRA: they give no gradient
        torch.testing.assert_close(ignored[k], ignored_inverted[k], rtol=0, atol=1e-7, msg=k)
    counted, counted_inverted = run("reg", 1.0), run("reg_inverted", 1.0)
    assert max((counted[k] - counted_inverted[k]).abs().max() for k in counted) > 1e-5
    assert max((counted[k] - ignored[k]).abs().max() for k in counted) > 1e-5


def test_resume_equals_uninterrupted_with_two_datasets_and_a_reg_set(pipeline, folders, tmp_path,
                                                                      monkeypatch):
    """Several datasets with repeats and a regularisation set, and with them every other option of the
    job at once (issue 17's proof): logit-normal timesteps in a range, debiased weighting, Prodigy
    (Adafactor where prodigyopt is missing) with cosine restarts, the text encoder's LoRA, LoRA+, the EMA
    and the validation loss."""
    import importlib.util
    prodigy = importlib.util.find_spec("prodigyopt") is not None
    options = {"train.timestep_sampling": "logit_normal", "train.min_timestep": 20, "train.max_timestep": 980,
               "train.debiased_estimation": True, "optim.optimizer": "prodigy" if prodigy else "adafactor",
               "optim.lr": 1.0 if prodigy else 1e-3, "optim.schedule": "cosine_with_restarts",
               "optim.restarts": 2, "ema.decay": 0.7, "lora.text_encoder.enabled": True}
    if not prodigy:                     # LoRA+'s own rate for B: not with Prodigy (one step size for all)
        options["lora.loraplus_lr_ratio"] = 4
    entries = [{"root": str(folders["a"]), "repeats": 2, "trigger": "aaa"},
               {"root": str(folders["b"]), "shuffle_tags": True},
               {"root": str(folders["reg"]), "regularization": True, "prior_loss_weight": 0.5}]

    def run(name):
        return lt.main(recipe(pipeline, tmp_path / name, entries, steps=5,
                              sections={"validation": {"every": 1}}, validation={"fraction": 0.25},
                              overrides=[f"{k}={v}" for k, v in options.items()]))

    straight = run("straight")
    resumed = crash_then_resume(monkeypatch, lt, lambda: run("resumed"), at_call=4)
    for name in ("lora.safetensors", "lora_ema.safetensors", "lora_ema.peft.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("lora_te_") for k in load_file(str(straight / "lora.safetensors"))), \
        "the text encoder's LoRA is in the file"
    for log in ("loss.jsonl", "validation.jsonl"):
        rows = [[{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in
                 (out / log).read_text().splitlines()] for out in (straight, resumed)]
        assert rows[0] == rows[1] and len(rows[0]) >= 2, log
    with safe_open(str(straight / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    # a: 5 pictures, 1 held out, x 2 = 8; b: 3, 1 held out = 2; reg: 10 samples over 4 pictures
    assert meta["ss_num_train_images"] == "10" and meta["ss_num_reg_images"] == "10"
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 4},
                                                   "b": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 2, "img_count": 4}}
    assert "aaa" in json.loads(meta["ss_tag_frequency"])["a"]
