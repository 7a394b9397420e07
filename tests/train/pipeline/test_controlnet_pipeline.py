"""End-to-end oracle for ControlNet sampling: our sampler (`train.generate.generate`, the path of
`adapterkit sample` and of the ControlNet job's sample grids) against diffusers'
StableDiffusionControlNetPipeline on one tiny random SD folder (8x VAE), one steering ControlNet file
of ours, one prompt, one hint, DDIM from the folder's scheduler config, classifier-free guidance and
the same starting noise: the same latents and pictures, at control scale 1 and 0.5, and visibly not
the plain U-Net's.

Starting noise. `generate` takes seeds, not latents: image i starts from `start_noise([seed_i], ...)`
(a CPU generator per image, train/pipeline/generate.py). We give diffusers exactly that tensor as `latents=`
(DDIM's init_noise_sigma is 1, so the pipeline uses it as is) and check, by watching the sampler's
`noise` argument, that our run really started from it.
"""
import pytest
import torch

import adapterkit.train.pipeline.generate as train_generate
from adapterkit.adapters.controlnet_files import load_controlnet, save_controlnet
from adapterkit.train.data.canny import edge_map_tensor
from adapterkit.train.images import tensor_to_pil
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import generate, start_noise
from support.fixtures import alias
from support.pictures import shape_image
from support.unets import controlnet_for

pipeline = alias("pipeline", "controlnet_pipeline")

PROMPT, SEED, STEPS, GUIDANCE, SIZE = "a red circle on a blue background", 3, 3, 4.0, 64
# Tolerance on latents (~unit scale, fp32). One controlled U-Net call of ours and of diffusers agree to
# ~1e-6 (tests/test_controlnet_files.py: residuals and U-Net outputs within 1e-5), summed in other
# orders (attention, GroupNorm). Guidance multiplies the difference of the conditional and
# unconditional halves by 4 and DDIM carries it through 3 steps, so 1e-4 leaves a margin of ~10x over
# rounding while a real difference (a wrong scale, hint, timestep or missing residual) is >= 1e-2.
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(pipeline, tmp_path_factory):  # noqa: F811 - the imported fixture
    """(our base, our ControlNet loaded from its file, diffusers' ControlNet pipeline, the hint image)."""
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    base = load_base(pipeline)
    folder = tmp_path_factory.mktemp("controlnet") / "cn"
    save_controlnet(controlnet_for(base, zero=False), folder)          # zero convs + conv_out moved: steers
    cn = load_controlnet(folder, base.unet).eval()
    sd = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        controlnet=ControlNetModel.from_pretrained(folder).eval(),
        scheduler=DDIMScheduler.from_config(sd.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hint = tensor_to_pil(edge_map_tensor(shape_image(1)), (0.0, 1.0))  # a Canny map, 64 x 64, {0, 255}
    return base, cn, pipe, hint


def ours(base, cn, hint, scale, monkeypatch, **extra) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s final latents (what it decodes) and its pictures in [0, 1]; scale None: no
    ControlNet. Checks that sampling started from `start_noise([SEED], ...)`."""
    seen = {}
    real_sample, real_decode = train_generate.SAMPLERS["ddim"], train_generate.decode

    def sample(*args, **kwargs):
        seen["noise"] = kwargs["noise"]
        return real_sample(*args, **kwargs)

    def decode(b, latents):
        seen["latents"] = latents
        return real_decode(b, latents)

    monkeypatch.setitem(train_generate.SAMPLERS, "ddim", sample)
    monkeypatch.setattr(train_generate, "decode", decode)
    hints = hint if isinstance(cn, list) else [hint]                  # several: one hint list per ControlNet
    kw = {"controlnet": cn, "hints": hints, "control_scale": scale, **extra} if scale is not None else {}
    images = generate(base, [PROMPT], [SEED], steps=STEPS, guidance=GUIDANCE, sampler="ddim", size=SIZE, **kw)
    assert torch.equal(seen["noise"], noise(base))
    return seen["latents"], (images + 1) / 2


def noise(base) -> torch.Tensor:
    return start_noise([SEED], (base.latent_channels, SIZE // base.latent_scale, SIZE // base.latent_scale))


def theirs(pipe, base, hint, scale: float, output_type: str, **extra) -> torch.Tensor:
    return pipe(PROMPT, image=hint, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, controlnet_conditioning_scale=scale, latents=noise(base).clone(),
                output_type=output_type, return_dict=False, **extra)[0]


def test_our_sampler_gives_the_latents_and_pictures_of_diffusers_controlnet_pipeline(setup, monkeypatch):
    base, cn, pipe, hint = setup
    with torch.no_grad():
        their_latents = theirs(pipe, base, hint, 1.0, "latent")
        their_images = theirs(pipe, base, hint, 1.0, "pt")              # decoded, in [0, 1]
    our_latents, our_images = ours(base, cn, hint, 1.0, monkeypatch)
    plain_latents, _ = ours(base, None, None, None, monkeypatch)
    assert our_latents.shape == their_latents.shape == (1, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(our_latents, their_latents, atol=ATOL, rtol=0)
    # the pictures too (the same VAE decode, [-1, 1] -> [0, 1] as diffusers' postprocess)
    torch.testing.assert_close(our_images, their_images, atol=ATOL, rtol=0)
    # the ControlNet steers: without it the latents are far outside the tolerance
    assert (their_latents - plain_latents).abs().max() > 100 * ATOL


def test_conditioning_scale_half_is_diffusers_controlnet_conditioning_scale_half(setup, monkeypatch):
    base, cn, pipe, hint = setup
    with torch.no_grad():
        half, full = theirs(pipe, base, hint, 0.5, "latent"), theirs(pipe, base, hint, 1.0, "latent")
    our_half, _ = ours(base, cn, hint, 0.5, monkeypatch)
    torch.testing.assert_close(our_half, half, atol=ATOL, rtol=0)
    assert (half - full).abs().max() > 100 * ATOL                     # the scale matters at this tolerance


def test_guess_mode_is_diffusers_guess_mode(setup, monkeypatch):
    """guess_mode: residuals scaled 0.1x .. 1x by depth, and under guidance the ControlNet steers the
    conditional half only; diffusers' pipeline does both."""
    base, cn, pipe, hint = setup
    with torch.no_grad():
        guessed = theirs(pipe, base, hint, 1.0, "latent", guess_mode=True)
        plain = theirs(pipe, base, hint, 1.0, "latent")
    our_guessed, _ = ours(base, cn, hint, 1.0, monkeypatch, guess_mode=True)
    torch.testing.assert_close(our_guessed, guessed, atol=ATOL, rtol=0)
    assert (guessed - plain).abs().max() > 100 * ATOL                 # guess mode is not the plain mode


def test_two_controlnets_sum_like_diffusers_multicontrolnet(setup, pipeline, tmp_path, monkeypatch):  # noqa: F811
    """Two ControlNets, each with its own hint and scale: our summed residuals sample what diffusers'
    pipeline with a list of ControlNets (its MultiControlNetModel) samples."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    base, cn, pipe, hint = setup
    save_controlnet(controlnet_for(base, seed=1, zero=False), tmp_path / "cn2")
    cn2 = load_controlnet(tmp_path / "cn2", base.unet).eval()
    hint2 = tensor_to_pil(edge_map_tensor(shape_image(4)), (0.0, 1.0))
    multi = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": [
        pipe.controlnet, ControlNetModel.from_pretrained(tmp_path / "cn2").eval()]})
    multi.set_progress_bar_config(disable=True)
    with torch.no_grad():
        both = multi(PROMPT, image=[hint, hint2], height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, controlnet_conditioning_scale=[0.8, 0.5],
                     latents=noise(base).clone(), output_type="latent", return_dict=False)[0]
        first = theirs(pipe, base, hint, 0.8, "latent")
    our_both, _ = ours(base, [cn, cn2], [[hint], [hint2]], [0.8, 0.5], monkeypatch)
    torch.testing.assert_close(our_both, both, atol=ATOL, rtol=0)
    assert (both - first).abs().max() > 100 * ATOL                    # the second ControlNet counts
