"""The tiny base's pretrain recipe on CPU: a few steps write a pipeline folder that load_base reads,
resume after a crash repeats the uninterrupted run, the tokenizer takes any text, the CLI runs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import adapterkit.train.jobs.pretrain as pt
from adapterkit.train.config import load_config
from adapterkit.train.jobs.guards import TrainingOutOfMemory
from adapterkit.train.jobs.pretrain import PretrainRecipe, main
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import decode, encode_images, encode_prompts
from adapterkit.train.world import shapes as world
from adapterkit.unet import PRESETS
from adapterkit.unet.weights import CheckpointError
from support import REPO


def recipe(out, **overrides) -> PretrainRecipe:
    cfg = {
        "model": {"image_size": 16, "text_layers": 1, "text_width": 32},
        "data": {"seed": 3, "caption_dropout": 0.5},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 2},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1},
        "sample": {"steps": 2, "seeds": [0], "prompts": ["a red circle on a blue background"]},
    }
    return load_config(cfg, PretrainRecipe, [f"{k}={v}" for k, v in overrides.items()])


def _state(out: Path) -> dict:
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(str(ckpt / "adapter_state.safetensors"))


def test_a_short_run_writes_a_pipeline_folder_that_load_base_reads(tmp_path, capsys):
    out = main(recipe(tmp_path / "run"))
    assert "MB)" in capsys.readouterr().out
    assert (out / "samples" / "final.png").is_file()
    folder = out / "base"
    for part in ("model_index.json", "unet/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part
    assert (out / "checkpoints" / "step-000003" / "base" / "model_index.json").is_file()
    unet_file = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet_file.values())
    rows = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)

    base = load_base(folder)
    assert base.vae is None and base.family.name == "tiny" and base.pixel_patch == 2
    assert base.latent_channels == 12 and base.latent_scale == 2
    assert base.unet.config.sample_size == 8 and base.unet.config.context_dim == 32
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1              # the fold is exact both ways
    latents = encode_images(base, pixels)
    assert latents.shape == (2, 12, 8, 8) and torch.equal(decode(base, latents), pixels)
    assert base.scheduler_config == pt.scheduler_config_named("tiny-pixel")     # what it trained with
    assert base.prediction_type == "v_prediction" and base.scheduler_config["rescale_betas_zero_snr"]
    # the trained weights are what was exported (to fp16 rounding)
    trained = _state(out)
    for name, value in base.unet.state_dict().items():
        assert torch.allclose(value, trained[f"unet.{name}"].half().float())
    context = encode_prompts(base, ["a red circle on a blue background", ""])
    assert context.shape == (2, 77, 32)
    with torch.no_grad():
        y = base.unet(torch.randn(2, 12, 8, 8), torch.tensor([10, 900]), context)
    assert y.shape == (2, 12, 8, 8) and torch.isfinite(y).all()


def test_a_folded_base_without_its_patch_size_is_refused(tmp_path):
    out = main(recipe(tmp_path / "run", **{"train.steps": 1, "sample.prompts": "[]"}))
    index_file = out / "base" / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["_adapterkit_pixel_patch"]               # 12 channels read as plain RGB: must not load
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="12-channel latents.*_adapterkit_pixel_patch"):
        load_base(out / "base")


def test_out_of_memory_names_what_to_lower(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(pt, "train_step", oom)
    with pytest.raises(TrainingOutOfMemory, match=r"step 1 with batch_size=2 \(CUDA out of memory.*"
                                                  r"Lower train.batch_size\. Last good checkpoint: none yet"):
        main(recipe(tmp_path / "run"))


def test_stage_widths_are_a_recipe_setting():
    unet = pt.make_unet(pt.PretrainModelConfig(channels=(96, 64, 128)))
    assert [s.channels for s in unet.config.stages] == [96, 64, 128]
    assert [s.attention for s in unet.config.stages] == [s.attention for s in PRESETS["tiny"].stages]
    assert unet.conv_in.out_channels == 96 and unet.conv_in.in_channels == 12
    with pytest.raises(ValueError, match="3 stage widths, each a multiple of 32"):
        pt.make_unet(pt.PretrainModelConfig(channels=(48, 64, 128)))


def test_pixel_patch_must_fit_the_image():
    with pytest.raises(ValueError, match="pixel_patch must be one of"):
        pt.make_unet(pt.PretrainModelConfig(image_size=24, pixel_patch=2))


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    kw = {"train.steps": 4, "data.pool_size": 32, "train.ema_decay": 0.9}
    straight = main(recipe(tmp_path / "straight", **kw))

    real_step, calls = pt.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                      # steps 1-2 done and step 2's checkpoint written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pt, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(recipe(tmp_path / "resumed", **kw))
    monkeypatch.setattr(pt, "train_step", real_step)
    resumed = main(recipe(tmp_path / "resumed", **kw))

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert any(k.startswith("ema.unet.") for k in a)             # the average resumes too
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = lambda out: [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(resumed)] == [1, 2, 3, 4]
    for x, y in zip(rows(straight), rows(resumed)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_the_export_holds_the_ema_and_the_checkpoint_both(tmp_path):
    out = main(recipe(tmp_path / "run", **{"train.ema_decay": 0.5, "optim.lr": 1e-2}))
    state = _state(out)
    exported = load_file(str(out / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    name = "conv_in.weight"
    ema, live = state[f"ema.unet.{name}"], state[f"unet.{name}"]
    assert (ema - live).abs().max() > 1e-3                       # the average lags the weights
    assert torch.equal(exported[name], ema.half())
    ckpt_unet = sorted((out / "checkpoints").glob("step-*"))[-1] / "base" / "unet"
    assert torch.equal(load_file(str(ckpt_unet / "diffusion_pytorch_model.safetensors"))[name], ema.half())


def test_the_tokenizer_accepts_any_text():
    tok = pt.make_tokenizer()
    unk = tok.convert_tokens_to_ids("<|unk|>")
    for text in ("a red circle on a blue background", "Émoji 🎨 CAFÉ naïve, 东京!", "", "\t\n  ",
                 "x" * 500):
        ids = tok([text], padding="max_length", max_length=77, truncation=True).input_ids[0]
        assert len(ids) == 77 and max(ids) < len(tok)
    ids = tok("a 🎨 é").input_ids
    assert unk in ids
    assert tok("RED Circle").input_ids == tok("red circle").input_ids
    # every character of the world's captions is in the vocabulary
    scenes = world.sample_scenes(50, 0)
    assert all(unk not in tok(world.caption(s)).input_ids for s in scenes)


def test_the_pool_renders_the_same_bytes_in_parallel():
    scenes = world.sample_scenes(256, 1)
    assert np.array_equal(pt.render_scenes(scenes, 16, workers=2), pt.render_scenes(scenes, 16))


def test_cli_runs_the_recipe_from_yaml(tmp_path):
    from adapterkit.train.cli.main import main as cli

    cfg = tmp_path / "small.yaml"
    cfg.write_text("model: {image_size: 16, text_layers: 1, text_width: 32}\n"
                   "data: {pool_size: 8}\ntrain: {batch_size: 2}\nsample: {prompts: []}\n")
    assert cli(["train", "pretrain", str(cfg), "train.steps=2", f"output.dir={tmp_path / 'run'}"]) == 0
    assert load_base(tmp_path / "run" / "base").text_encoder.config.hidden_size == 32


def test_the_shipped_recipe_loads():
    cfg = load_config(REPO / "configs" / "tiny_pretrain.yaml", PretrainRecipe)
    assert cfg.model.image_size == world.SIZE and cfg.data.pool_size > 0 and cfg.train.steps >= 1000
