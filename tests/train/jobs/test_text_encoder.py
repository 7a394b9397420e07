"""Training the text encoders' LoRA (issue 17 item 1, issue 15 item 3; train/jobs/text_encoder.py) on the
tiny fixture pipelines: the files hold the text-encoder part in kohya and diffusers names, diffusers'
load_lora_weights consumes every key and its text encoder then gives our embeddings; the encoder's
LoRA moves only while it trains (stop_after_steps); its learning rate is its own parameter group; a
resumed run equals the uninterrupted one with the encoder training and stopping; off by default."""
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import ConfigError
from adapterkit.train.jobs.lora import main
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_text
from adapterkit.train.pipeline.loras import load_lora_on_base
from support.fixtures import alias
from support.pipelines import build_tiny_sdxl_pipeline
from support.recipes import crash_then_resume, last_adapter_state
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")
TE = {"lora.text_encoder.enabled": "true", "lora.text_encoder.lr": "[2e-3]"}
PROMPTS = ["sks, a red circle", "a blue star"]


def keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def text_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("text_encoder")}


def checkpoint(out, step) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "adapter_state.safetensors"))


@pytest.fixture(scope="module")
def trained(pipeline, images, tmp_path_factory):
    """4 steps with the text encoder's LoRA on, stopped after step 3; checkpoints at 2 and 4."""
    return main(recipe(pipeline, images, tmp_path_factory.mktemp("te") / "run",
                       **TE, **{"lora.text_encoder.stop_after_steps": 3}))


def test_the_files_hold_the_text_part_and_diffusers_reads_every_key_as_we_do(pipeline, trained):
    from diffusers import StableDiffusionPipeline
    kohya, peft = trained / "lora.safetensors", trained / "lora.peft.safetensors"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys(kohya))
    assert any(k.startswith("text_encoder.") for k in keys(peft))
    plain = encode_text(load_base(pipeline), PROMPTS).context
    for path in (kohya, peft):
        ours_base = load_base(pipeline)
        applied = load_lora_on_base(ours_base, path, "lora0")
        assert applied.text == {"text_encoder": 6}          # q, k, v, out_proj, fc1, fc2 of its one layer
        pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
        state, alphas = pipe.lora_state_dict(str(path))
        pipe.load_lora_weights(str(path))
        te_layers = {n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A")}
        assert len(te_layers) == 6 and len(state) == len([k for k in keys(path) if not k.endswith(".alpha")])
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        ours = encode_text(ours_base, PROMPTS).context
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        assert (theirs - plain).abs().max() > 1e-4                         # the encoder moved


def test_the_encoder_lora_moves_only_while_it_trains(pipeline, images, trained, tmp_path):
    at2, at4 = checkpoint(trained, 2), checkpoint(trained, 4)
    te2, te4 = text_state(at2), text_state(at4)
    assert te2 and te2.keys() == te4.keys()
    b = [k for k in te2 if ".lora_B." in k]
    assert all(te4[k].abs().max() > 0 for k in b)                           # it trained ...
    assert any(not torch.equal(te2[k], te4[k]) for k in te2)                # ... in step 3
    unet_keys = [k for k in at2 if not k.startswith("text_encoder")]
    assert any(not torch.equal(at2[k], at4[k]) for k in unet_keys)
    # stopped after step 3: step 4 left it as it was (a run to step 3 is the reference)
    three = main(recipe(pipeline, images, tmp_path / "three", **TE,
                        **{"lora.text_encoder.stop_after_steps": 3, "train.steps": 3,
                           "output.checkpoint_every": 3}))
    te3 = text_state(checkpoint(three, 3))
    assert all(torch.equal(te3[k], te4[k]) for k in te3)
    # off (the default): the state holds no text-encoder tensor and the base encoder never changes
    off = last_adapter_state(main(recipe(pipeline, images, tmp_path / "off")))
    assert not text_state(off)


def test_resume_equals_the_uninterrupted_run_with_the_encoder_training_and_stopping(pipeline, images, trained,
                                                                                     tmp_path, monkeypatch):
    over = TE | {"lora.text_encoder.stop_after_steps": 3}
    resumed = crash_then_resume(monkeypatch, lt, lambda: main(recipe(pipeline, images, tmp_path / "resumed",
                                                                     **over)))
    a, b = last_adapter_state(trained), last_adapter_state(resumed)
    assert a.keys() == b.keys() and text_state(a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = lambda out: [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    for x, y in zip(rows(trained), rows(resumed), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    optimizer = resumed / "checkpoints" / "step-000004" / "optimizer.json"
    groups = json.loads(optimizer.read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 2e-3]              # optim.lr, then the encoder's


def test_sdxl_trains_only_the_encoders_with_a_learning_rate(images, tmp_path):
    pipe_dir = build_tiny_sdxl_pipeline(tmp_path / "sdxl")
    out = main(recipe(pipe_dir, images, tmp_path / "run", **{
        "lora.text_encoder.enabled": "true", "lora.text_encoder.lr": "[1e-3, 0]", "train.steps": 2,
        "output.checkpoint_every": 0}))
    names = keys(next(out.glob("*.safetensors")))
    assert any(k.startswith("lora_te1_") for k in names) and not any(k.startswith("lora_te2_") for k in names)
    # the first encoder is read at its penultimate layer: its last (of 2) layer gets no LoRA
    assert not any(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in names)
    # diffusers' SDXL loader takes every key and its embeddings are ours
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, local_files_only=True)
    path = out / "lora.safetensors"
    pipe.load_lora_weights(str(path))
    attached = sum(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())
    ours = load_base(pipe_dir)
    applied = load_lora_on_base(ours, path, "lora0")
    assert applied.text == {"text_encoder": attached} and attached == 6
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    cond = encode_text(ours, PROMPTS)
    assert (cond.context - embeds).abs().max() <= 1e-5 * embeds.abs().max()
    assert (cond.context - encode_text(load_base(pipe_dir), PROMPTS).context).abs().max() > 1e-5


def test_a_bf16_base_trains_the_encoder_lora_through_fp32_masters(pipeline, images, tmp_path):
    out = main(recipe(pipeline, images, tmp_path / "run", **TE, **{"model.dtype": "bf16", "train.steps": 2,
                                                                    "output.checkpoint_every": 2}))
    state = text_state(checkpoint(out, 2))
    assert state and all(t.dtype == torch.float32 for t in state.values())      # the masters, fp32
    assert any(t.abs().max() > 0 for k, t in state.items() if ".lora_B." in k)


def test_bad_text_encoder_settings_are_refused_by_name(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match="enabled"):
        recipe(pipeline, images, tmp_path, **{"lora.text_encoder.lr": "[1e-3]"})
    with pytest.raises(ConfigError, match="kind loha"):
        recipe(pipeline, images, tmp_path, **{"lora.text_encoder.enabled": "true", "lora.kind": "loha"})
    with pytest.raises(ConfigError, match="stop_after_steps"):
        recipe(pipeline, images, tmp_path, **{"lora.text_encoder.enabled": "true",
                                              "lora.text_encoder.stop_after_steps": "-1"})
    with pytest.raises(ConfigError, match="SDXL has 2"):
        recipe(pipeline, images, tmp_path, **{"lora.text_encoder.enabled": "true",
                                              "lora.text_encoder.lr": "[1e-3, 1e-3, 1e-3]"})
    with pytest.raises(ValueError, match="this base has 1 text encoder"):             # SD1: one encoder
        main(recipe(pipeline, images, tmp_path / "run", **{"lora.text_encoder.enabled": "true",
                                                           "lora.text_encoder.lr": "[1e-3, 1e-3]"}))
