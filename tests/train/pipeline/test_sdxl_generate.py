"""Sampling SDXL bases (issue 15, item 5): `generate` against diffusers' StableDiffusionXLPipeline on the
reduced SDXL pipeline (support.pipelines.build_tiny_sdxl_pipeline), from the same start noise with the
same scheduler: the size/crop ids of a generated picture, the final latents of our samplers with and
without guidance, the decoded pictures, the same with a kohya SDXL LoRA loaded into both, and
`adapterkit sample` on an SDXL folder."""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

import adapterkit.train.cli.main as cli
from adapterkit.adapters.lora_files import load_lora_file
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import (
    generate,
    generated_time_ids,
    prompt_conditioning,
    start_noise,
    unconditional,
)
from adapterkit.train.pipeline.sampling import SAMPLERS as OURS
from adapterkit.train.pipeline.schedule import NoiseSchedule
from support.pipelines import build_tiny_sdxl_pipeline
from support.unets import SDXL_TINY, write_sdxl_lora

PROMPTS = ["a red circle on a blue background", "a green square"]
SEEDS = [3, 7]
STEPS = 4
TOL = 1e-5          # two U-Net implementations over 4 guided steps differ by ~1e-6 (relative)
SCHEDULERS = {                  # our sampler's name: diffusers' scheduler from the pipeline's config
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "dpmpp_2m": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "dpmpp_2m_karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", use_karras_sigmas=True),
}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def base(pipe_dir):
    return load_base(pipe_dir)


def diffusers_pipe(pipe_dir, sampler="ddim"):
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, local_files_only=True)
    pipe.scheduler = SCHEDULERS[sampler](pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A kohya-layout SDXL LoRA as after training (support.unets.write_sdxl_lora)."""
    return write_sdxl_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


def theirs(pipe, size, guidance, output_type="latent"):
    """The pipeline's final latents (or "pt": pictures in [0, 1]) of PROMPTS from our start noise."""
    noise = start_noise(SEEDS, (4, size[0] // 2, size[1] // 2))
    with torch.no_grad():
        return pipe(PROMPTS, height=size[0], width=size[1], num_inference_steps=STEPS,
                    guidance_scale=guidance, latents=noise, output_type=output_type).images


def test_the_ids_of_a_generated_picture_are_the_pipelines(pipe_dir):
    pipe = diffusers_pipe(pipe_dir)
    expected = pipe._get_add_time_ids((32, 48), (0, 0), (32, 48), dtype=torch.float32,
                                      text_encoder_projection_dim=SDXL_TINY.pooled_dim)
    assert torch.equal(generated_time_ids((32, 48)).float(), expected)
    assert generated_time_ids((32, 48), 3).shape == (3, 6) and generated_time_ids((8, 8)).dtype == torch.int64


@pytest.mark.parametrize("sampler", SCHEDULERS)
@pytest.mark.parametrize("guidance, size", [(1.0, (32, 32)), (5.0, (32, 48))])
def test_final_latents_equal_the_pipelines(base, pipe_dir, sampler, guidance, size):
    sample = OURS[sampler]
    shape = (len(PROMPTS), base.latent_channels, size[0] // 2, size[1] // 2)
    uncond = unconditional(base, size).repeat(len(PROMPTS)) if guidance != 1 else None
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    ours = sample(lambda x, t, c: base.unet(x, t, c), schedule, shape, STEPS,
                  cond=prompt_conditioning(base, PROMPTS, size), uncond=uncond, guidance_scale=guidance,
                  noise=start_noise(SEEDS, shape[1:]))
    reference = theirs(diffusers_pipe(pipe_dir, sampler), size, guidance)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < TOL * reference.abs().max()    # relative: these latents are O(10)
    if guidance != 1:                               # SDXL's unconditional half is zeros, ids included
        assert not uncond.context.any() and not uncond.pooled.any()
        assert torch.equal(uncond.time_ids[0], torch.tensor([*size, 0, 0, *size]))


@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_generate_gives_the_pipelines_pictures(base, pipe_dir, sampler):
    ours = generate(base, PROMPTS, SEEDS, steps=STEPS, guidance=5.0, sampler=sampler, size=(32, 48))
    reference = theirs(diffusers_pipe(pipe_dir, sampler), (32, 48), 5.0, output_type="pt")   # [0, 1]
    assert ours.shape == (2, 3, 32, 48) and ((ours + 1) / 2 - reference).abs().max() < TOL


def test_with_a_lora_both_move_alike(pipe_dir, lora_file):
    plain = generate(load_base(pipe_dir), PROMPTS, SEEDS, steps=STEPS, guidance=5.0)
    base = load_base(pipe_dir)
    load_lora_file(base.unet, lora_file, name="lora0")
    ours = generate(base, PROMPTS, SEEDS, steps=STEPS, guidance=5.0)
    pipe = diffusers_pipe(pipe_dir)
    pipe.load_lora_weights(str(lora_file))
    reference = theirs(pipe, (32, 32), 5.0, output_type="pt")
    assert ((ours + 1) / 2 - reference).abs().max() < TOL
    assert (ours - plain).abs().max() > 100 * TOL       # the LoRA changes the pictures


def test_adapterkit_sample_with_an_sdxl_folder(pipe_dir, lora_file, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "grid.png"
    code = cli.main(["sample", "--base", str(pipe_dir), "--prompt", PROMPTS[0], "--seed", "0", "--seed", "1",
                     "--steps", "2", "--sampler", "euler", "--lora", f"{lora_file}:0.8", "--compare",
                     "--device", "cpu", "-o", str(out)])
    assert code == 0 and out.is_file() and "wrote" in capsys.readouterr().out
    with Image.open(out) as grid:
        assert grid.width > 2 * 32 and grid.height > 2 * 32          # 2 rows (seeds) x 2 columns
