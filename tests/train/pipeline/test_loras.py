"""A LoRA's text-encoder part applied wherever a LoRA is accepted (issue 17 item 1, issue 15 item 3):
`load_lora_on_base` puts the U-Net part on the U-Net and the `lora_te*_` / `text_encoder[_2].` part on
the CLIP encoders. Oracle: diffusers' `load_lora_weights` on the same tiny pipeline with the same file:
the prompt embeddings agree (1e-5 relative), and so do the final sampled latents (SD1 and SDXL,
the comparisons of tests/train/pipeline/test_sdxl_generate.py); weight 0 is the base exactly."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
from adapterkit.adapters.lora_files import read_lora, save_lora
from adapterkit.adapters.lora_text import TextLoraSpec, add_text_lora
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_text
from adapterkit.train.pipeline.generate import prompt_conditioning, start_noise, unconditional
from adapterkit.train.pipeline.loras import load_lora_on_base, set_base_lora_weights, text_encoders_of
from adapterkit.train.pipeline.sampling import ddim_sample
from adapterkit.train.pipeline.schedule import NoiseSchedule
from support.fixtures import alias
from support.pipelines import build_tiny_sdxl_pipeline

PROMPTS = ["a red circle on a blue background", "a green square"]
SEEDS = [3, 7]
STEPS = 3
TOL = 1e-5

sd1_dir = alias("sd1_dir", "lora_pipeline")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def lora_file(pipe_dir, path, fmt="kohya", seed=5):
    """A LoRA as after training with the text encoders on: U-Net attn-ff and every encoder's attention
    and MLP projections, lora_up random; written by `save_lora(..., text_encoders=)`."""
    base = load_base(pipe_dir)
    add_lora(base.unet, LoraSpec(rank=4, alpha=2, targets="attn-ff"), "style")
    encoders = text_encoders_of(base)
    for encoder in encoders.values():
        add_text_lora(encoder, TextLoraSpec(rank=4, alpha=8), "style")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (base.unet, *encoders.values()):
            for layer in lora_layers(model).values():
                w = layer.lora_B["style"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    save_lora(base.unet, path, name="style", fmt=fmt, text_encoders=encoders)
    return path


def diffusers_pipe(pipe_dir, cls, lora=None):
    pipe = cls.from_pretrained(pipe_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_sd1_prompt_embeddings_and_latents_move_as_in_diffusers(sd1_dir, tmp_path, fmt):
    path = lora_file(sd1_dir, tmp_path / "style.safetensors", fmt)
    keys = read_lora(path).modules
    assert any(k.startswith("text_encoder.") for k in keys) and any(not k.startswith("text_") for k in keys)
    plain = load_base(sd1_dir)
    base = load_base(sd1_dir)
    applied = load_lora_on_base(base, path, "lora0")
    n_text = sum(k.startswith("text_encoder.") for k in keys)
    assert applied.text == {"text_encoder": n_text} and applied.unet == len(keys) - n_text
    assert f"text_encoder {n_text} modules" in applied.line()

    pipe = diffusers_pipe(sd1_dir, StableDiffusionPipeline, path)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        ours = encode_text(base, PROMPTS).context
    assert rel(ours, theirs) < TOL
    assert rel(encode_text(plain, PROMPTS).context, theirs) > 100 * TOL       # the TE part moved them

    size, guidance = 32, 5.0
    shape = (len(PROMPTS), base.latent_channels, size // 2, size // 2)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    latents = ddim_sample(lambda x, t, c: base.unet(x, t, c), schedule, shape, STEPS,
                          cond=prompt_conditioning(base, PROMPTS, (size, size)),
                          uncond=unconditional(base, (size, size)).repeat(len(PROMPTS)),
                          guidance_scale=guidance, noise=start_noise(SEEDS, shape[1:]))
    with torch.no_grad():
        reference = pipe(PROMPTS, height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance,
                         latents=start_noise(SEEDS, shape[1:]), output_type="latent").images
    assert rel(latents, reference) < TOL


def test_sdxl_both_encoders_and_latents_move_as_in_diffusers(sdxl_dir, tmp_path):
    path = lora_file(sdxl_dir, tmp_path / "xl.safetensors")
    base = load_base(sdxl_dir)
    applied = load_lora_on_base(base, path, "lora0", weight=0.7)
    assert set(applied.text) == {"text_encoder", "text_encoder_2"} and applied.unet > 0
    pipe = diffusers_pipe(sdxl_dir, StableDiffusionXLPipeline)
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        ours = encode_text(base, PROMPTS)
    assert rel(ours.context, embeds) < TOL and rel(ours.pooled, pooled) < TOL
    plain = encode_text(load_base(sdxl_dir), PROMPTS)
    assert rel(plain.context[..., :16], embeds[..., :16]) > 100 * TOL        # text_encoder moved
    assert rel(plain.pooled, pooled) > 100 * TOL                             # ... and text_encoder_2

    size, guidance = (32, 32), 5.0
    shape = (len(PROMPTS), base.latent_channels, 16, 16)
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    latents = ddim_sample(lambda x, t, c: base.unet(x, t, c), schedule, shape, STEPS,
                          cond=prompt_conditioning(base, PROMPTS, size),
                          uncond=unconditional(base, size).repeat(len(PROMPTS)), guidance_scale=guidance,
                          noise=start_noise(SEEDS, shape[1:]))
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        reference = pipe(PROMPTS, height=32, width=32, num_inference_steps=STEPS, guidance_scale=guidance,
                         latents=start_noise(SEEDS, shape[1:]), output_type="latent").images
    assert rel(latents, reference) < TOL


def test_weight_zero_is_the_base_and_the_cache_key_names_the_lora(sd1_dir, tmp_path):
    path = lora_file(sd1_dir, tmp_path / "style.safetensors")
    plain = load_base(sd1_dir)
    base = load_base(sd1_dir)
    load_lora_on_base(base, path, "lora0")
    assert base.fingerprint.text_encoder != plain.fingerprint.text_encoder      # a text cache misses
    assert base.fingerprint.unet == plain.fingerprint.unet
    set_base_lora_weights(base, {"lora0": 0.0})
    assert torch.equal(encode_text(base, PROMPTS).context, encode_text(plain, PROMPTS).context)
    set_base_lora_weights(base, {"lora0": 1.0})
    assert not torch.equal(encode_text(base, PROMPTS).context, encode_text(plain, PROMPTS).context)
    with pytest.raises(ValueError, match="no LoRA named"):
        set_base_lora_weights(base, {"other": 1.0})


def test_a_text_part_for_an_encoder_the_base_lacks_is_refused_before_anything_loads(sd1_dir, sdxl_dir,
                                                                                     tmp_path):
    path = lora_file(sdxl_dir, tmp_path / "xl.safetensors")
    base = load_base(sd1_dir)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_on_base(base, path, "lora0")
    assert not lora_layers(base.unet) and not lora_layers(base.text_encoder)
