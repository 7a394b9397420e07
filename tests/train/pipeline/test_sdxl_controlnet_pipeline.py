"""Sampling with SDXL ControlNets (issue 16, item 4): `generate` (the path of `adapterkit sample`) against
diffusers' StableDiffusionXLControlNetPipeline on the reduced SDXL pipeline with an 8x VAE, one
ControlNet file of ours loaded in both, Euler from the folder's scheduler config, guidance 5 and the
same start noise: the same final latents at control scale 1 and 0.5, in guess mode, with two
ControlNets summed, and with a kohya SDXL LoRA on the U-Net; then `adapterkit sample` with all of it."""
import functools

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from PIL import Image

import adapterkit.train.pipeline.generate as train_generate
from adapterkit.adapters.controlnet_files import load_controlnet, save_controlnet
from adapterkit.adapters.lora_files import load_lora_file
from adapterkit.train.cli.main import main as cli
from adapterkit.train.data.canny import edge_map_tensor
from adapterkit.train.images import tensor_to_pil
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import generate, start_noise
from support.cli import drawn_grids
from support.pictures import shape_image
from support.pipelines import build_tiny_pipeline_8x_vae, build_tiny_sdxl_pipeline
from support.unets import controlnet_for, write_sdxl_lora

PROMPT, SEED, STEPS, GUIDANCE, SIZE = "a red circle on a blue background", 3, 3, 5.0, 64
# Latents of Euler start at sigma_max (~15) and end near unit scale; one controlled U-Net call of ours
# and diffusers' agree to ~1e-6 (tests/adapters/test_sdxl_controlnet.py). Relative 1e-5 of the largest
# value, as tests/train/pipeline/test_sdxl_generate.py; a wrong scale, hint, id or residual is >= 1e-2.
RTOL = 1e-5


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), vae_scale=8)


@pytest.fixture(scope="module")
def files(pipe_dir, tmp_path_factory):
    """Two steering ControlNet folders for the base (zero convs and conv_out moved) and a kohya SDXL LoRA."""
    root = tmp_path_factory.mktemp("adapters")
    base = load_base(pipe_dir)
    for seed in (0, 1):
        save_controlnet(controlnet_for(base, seed=seed, zero=False), root / f"cn{seed}")
    write_sdxl_lora(root / "style.safetensors")
    return root


def hint(i: int) -> Image.Image:
    return tensor_to_pil(edge_map_tensor(shape_image(i)), (0.0, 1.0))     # a Canny map, 64 x 64, {0, 255}


def noise(base) -> torch.Tensor:
    f = base.latent_scale
    return start_noise([SEED], (base.latent_channels, SIZE // f, SIZE // f))


@functools.cache
def our_parts(pipe_dir, files, n: int, lora: bool):
    """Our base (with the LoRA loaded or not) and ControlNets cn0..cn{n-1}; cached: sampling changes
    neither."""
    base = load_base(pipe_dir)
    if lora:
        load_lora_file(base.unet, files / "style.safetensors", name="style")
    return base, [load_controlnet(files / f"cn{i}", base.unet).eval() for i in range(n)]


@functools.cache
def their_pipe(pipe_dir, files, n: int, lora: bool) -> StableDiffusionXLControlNetPipeline:
    xl = StableDiffusionXLPipeline.from_pretrained(pipe_dir, local_files_only=True)
    nets = [ControlNetModel.from_pretrained(files / f"cn{i}", local_files_only=True).eval() for i in range(n)]
    pipe = StableDiffusionXLControlNetPipeline(**xl.components, controlnet=nets if n > 1 else nets[0])
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(files / "style.safetensors"))
    return pipe


def ours(pipe_dir, files, scales, hints, lora=False, **extra) -> torch.Tensor:
    """`generate`'s final latents (what it decodes) with ControlNets cn0.. at `scales`."""
    base, nets = our_parts(pipe_dir, files, len(scales), lora)
    seen = {}
    real_decode = train_generate.decode

    def decode(b, latents):
        seen["latents"] = latents
        return real_decode(b, latents)

    train_generate.decode = decode
    try:
        several = len(nets) > 1
        generate(base, [PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE, sampler="euler", size=SIZE,
                 controlnet=nets if several else nets[0],
                 hints=[[h] for h in hints] if several else [hints[0]],
                 control_scale=scales if several else scales[0], **extra)
    finally:
        train_generate.decode = real_decode
    return seen["latents"]


def theirs(pipe_dir, files, scales, hints, lora=False, **extra) -> torch.Tensor:
    several = len(scales) > 1
    pipe = their_pipe(pipe_dir, files, len(scales), lora)
    base, _ = our_parts(pipe_dir, files, 1, False)
    with torch.no_grad():
        return pipe(PROMPT, image=hints if several else hints[0], height=SIZE, width=SIZE,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    controlnet_conditioning_scale=scales if several else scales[0],
                    latents=noise(base).clone(), output_type="latent", return_dict=False, **extra)[0]


def close(a, b) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= RTOL * b.abs().max().item()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_final_latents_equal_the_sdxl_controlnet_pipelines(pipe_dir, files, scale):
    reference = theirs(pipe_dir, files, [scale], [hint(1)])
    assert close(ours(pipe_dir, files, [scale], [hint(1)]), reference)
    plain = ours(pipe_dir, files, [0.0], [hint(1)])                      # scale 0: the plain U-Net
    assert (reference - plain).abs().max() > 1e3 * RTOL * reference.abs().max()


def test_guess_mode_is_the_pipelines_guess_mode(pipe_dir, files):
    guessed = theirs(pipe_dir, files, [1.0], [hint(1)], guess_mode=True)
    assert close(ours(pipe_dir, files, [1.0], [hint(1)], guess_mode=True), guessed)
    plain = theirs(pipe_dir, files, [1.0], [hint(1)])
    assert (guessed - plain).abs().max() > 1e3 * RTOL * guessed.abs().max()


def test_two_controlnets_summed_with_an_sdxl_lora(pipe_dir, files):
    both = theirs(pipe_dir, files, [0.8, 0.5], [hint(1), hint(4)], lora=True)
    assert close(ours(pipe_dir, files, [0.8, 0.5], [hint(1), hint(4)], lora=True), both)
    without = theirs(pipe_dir, files, [0.8, 0.5], [hint(1), hint(4)])
    assert (both - without).abs().max() > 1e3 * RTOL * both.abs().max()      # the LoRA counts


def test_adapterkit_sample_with_sdxl_controlnets_and_a_lora(pipe_dir, files, tmp_path, capsys):
    edges = tmp_path / "edges.png"
    hint(2).save(edges)
    common = ["sample", "--base", str(pipe_dir), "--prompt", "a red shape", "--steps", "2",
              "--sampler", "euler",
              "--device", "cpu", "--controlnet", str(files / "cn0"), "--hint", str(edges)]

    def grid(name, *extra):
        """The sampled picture of one run (the grid's last cell; the first shows the hint)."""
        with drawn_grids() as drawn:
            assert cli([*common, *extra, "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).is_file()
        return drawn[-1]["cells"][-1].astype(int)
    one = grid("one.png")
    two = grid("two.png", "--controlnet", str(files / "cn1"), "--hint", str(edges), "--guess-mode")
    styled = grid("lora.png", "--lora", f"{files / 'style.safetensors'}:0.8")
    off = grid("off.png", "--controlnet", str(files / "cn1"), "--hint", str(edges),
               "--control-scale", "1", "--control-scale", "0")
    assert one.shape == two.shape == styled.shape
    assert np.abs(one - two).max() > 0 and np.abs(one - styled).max() > 0
    assert np.array_equal(one, off)                  # a second ControlNet at scale 0 changes nothing
    sd1 = tmp_path / "sd1"                           # an SD1.x ControlNet on the SDXL base: refused
    save_controlnet(controlnet_for(load_base(build_tiny_pipeline_8x_vae(tmp_path / "sd1base"))), sd1)
    assert cli(["sample", "--base", str(pipe_dir), "--prompt", "x", "--steps", "1", "--controlnet", str(sd1),
                "--hint", str(edges), "-o", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
    assert "An SD1.x ControlNet cannot steer an SDXL U-Net" in capsys.readouterr().err
