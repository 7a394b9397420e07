"""EMA of the LoRA (`ema:`): the average follows its recursion step by step, is exported beside the raw
file in the same layouts and metadata, resumes exactly, and draws the samples when asked."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterkit.train.jobs.lora as lt
import adapterkit.train.pipeline.generate as generate
from adapterkit.train.jobs.ema import EMA
from adapterkit.train.jobs.lora import main
from support.fixtures import alias
from support.recipes import crash_then_resume
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")
EMA_RUN = {"ema.decay": 0.6, "ema.warmup": False, "output.checkpoint_every": 1, "output.keep_checkpoints": 0}


def states(out):
    folders = sorted((out / "checkpoints").glob("step-*"))
    return [load_file(str(c / "adapter_state.safetensors")) for c in folders]


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def ema_run(pipeline, images, tmp_path_factory):
    return main(recipe(pipeline, images, tmp_path_factory.mktemp("ema") / "run", **EMA_RUN))


def test_the_average_follows_its_recursion_at_every_step(ema_run):
    saved = states(ema_run)                                 # steps 1..4
    assert len(saved) == 4
    names = [k for k in saved[0] if not k.startswith("ema.")]
    assert sorted("ema." + n for n in names) == sorted(k for k in saved[0] if k.startswith("ema."))
    for before, after in zip(saved, saved[1:]):
        for n in names:                                     # ema' = d ema + (1 - d) w', d = 0.6 throughout
            torch.testing.assert_close(after["ema." + n], 0.6 * before["ema." + n] + 0.4 * after[n],
                                       rtol=1e-6, atol=1e-7)
    moved = max((saved[-1]["ema." + n] - saved[-1][n]).abs().max().item() for n in names)
    assert moved > 1e-4                                     # the average is not the weights


def test_the_ema_file_is_written_beside_the_raw_one_in_its_layouts(ema_run):
    for raw, avg in (("lora.safetensors", "lora_ema.safetensors"),
                     ("lora.peft.safetensors", "lora_ema.peft.safetensors")):
        a, b = load_file(str(ema_run / raw)), load_file(str(ema_run / avg))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
        assert any(not torch.equal(a[k], b[k]) for k in a)
        ma, mb = metadata(ema_run / raw), metadata(ema_run / avg)
        assert mb.keys() - ma.keys() == {"adapterkit.ema"}
        assert json.loads(mb["adapterkit.ema"]) == {"decay": 0.6, "warmup": False}
        assert all(mb[k] == ma[k] for k in ma)
    # the peft file's tensors are the checkpoint's average, by name
    last = states(ema_run)[-1]
    peft = load_file(str(ema_run / "lora_ema.peft.safetensors"))
    for name, value in peft.items():
        own = "ema." + name.removeprefix("unet.").replace(".weight", ".default.weight")
        assert torch.equal(value, last[own].to(value.dtype)), name


def test_the_warmup_switch():
    p = torch.nn.Parameter(torch.zeros(3))
    assert [EMA({"p": p}, 0.99).decay_at(n) for n in (0, 5)] == [pytest.approx(0.1), pytest.approx(6 / 15)]
    assert EMA({"p": p}, 0.99, warmup=False).decay_at(0) == 0.99


def test_resume_with_ema_equals_the_uninterrupted_run(ema_run, pipeline, images, tmp_path, monkeypatch):
    resumed = crash_then_resume(
        monkeypatch, lt, lambda: lt.main(recipe(pipeline, images, tmp_path / "resumed", **EMA_RUN)),
        at_call=3)
    for name in ("lora_ema.safetensors", "lora.safetensors"):
        a, b = load_file(str(ema_run / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("use_ema", [True, False])
def test_samples_use_the_average_when_asked(pipeline, images, tmp_path, monkeypatch, use_ema):
    real, seen = generate.generate_columns, []

    def spy(base, *args, **kwargs):
        name, layer = next((n, m) for n, m in base.unet.named_modules() if n.endswith("attn1.to_q"))
        seen.append((f"unet.{name}.lora_B.weight", layer.lora_B["default"].weight.detach().clone()))
        return real(base, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_columns", spy)
    out = main(recipe(pipeline, images, tmp_path / "run", **{
        "ema.decay": 0.6, "ema.samples": use_ema, "train.steps": 2, "sample.prompts": '["a shape"]',
        "sample.steps": 2, "output.checkpoint_every": 0}))
    ema_file = load_file(str(out / "lora_ema.peft.safetensors"))
    raw_file = load_file(str(out / "lora.peft.safetensors"))
    assert len(seen) == 1
    key, value = seen[0]
    want, other = (ema_file, raw_file) if use_ema else (raw_file, ema_file)
    assert torch.equal(value, want[key]) and not torch.equal(value, other[key])


def test_with_fp32_masters_the_ema_averages_the_masters_and_the_model_keeps_its_copies(pipeline, images,
                                                                                        tmp_path):
    """A bf16 base trains its LoRA through fp32 masters: the average is of the masters (fp32 in the
    checkpoint), the EMA file is exported from it, and the raw file is untouched by the export."""
    out = main(recipe(pipeline, images, tmp_path / "run", **{"model.dtype": "bf16", "ema.decay": 0.6,
                                                             "train.steps": 2, "output.checkpoint_every": 0}))
    last = states(out)[-1]
    ema = load_file(str(out / "lora_ema.peft.safetensors"))
    raw = load_file(str(out / "lora.peft.safetensors"))
    for name, value in ema.items():
        own = name.removeprefix("unet.").replace(".weight", ".default.weight")
        assert last["ema." + own].dtype == torch.float32
        assert torch.equal(value.float(), last["ema." + own]), name
        assert torch.equal(raw[name].float(), last[own]), name
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_the_average_covers_the_text_encoders_lora_too(pipeline, images, tmp_path):
    """With the encoder's LoRA training, its tensors are averaged as the U-Net's are: kept as "ema.*" in
    the checkpoint and written averaged into the EMA file (kohya's lora_te_* keys there)."""
    out = main(recipe(pipeline, images, tmp_path / "run", **EMA_RUN, **{"lora.text_encoder.enabled": True}))
    last = states(out)[-1]
    text = [k for k in last if k.startswith("text_encoder.")]
    assert text and all("ema." + k in last for k in text)
    raw, avg = load_file(str(out / "lora.safetensors")), load_file(str(out / "lora_ema.safetensors"))
    te = [k for k in raw if k.startswith("lora_te_")]
    assert te and any(not torch.equal(raw[k], avg[k]) for k in te if "lora_up" in k)
