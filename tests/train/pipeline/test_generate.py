"""train.generate on a tiny random pixel-space base (16 px pictures, 8 x 8 latents): each image is
a function of its own (prompt, seed), whatever the batch; it is exactly what the sampler gives for
one image; a ControlNet at init changes nothing and a trained-looking one does; bad inputs fail
before sampling."""
import re

import numpy as np
import pytest
import torch

from adapterkit.adapters.controlnet import ControlNet
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import decode, encode_prompts
from adapterkit.train.pipeline.generate import generate, start_noise, to_images
from adapterkit.train.pipeline.sampling import SAMPLERS
from adapterkit.train.pipeline.schedule import NoiseSchedule
from adapterkit.train.world.shapes import canny_map, caption, sample_scenes
from support.unets import controlnet_for

PROMPTS = ["a red circle on a blue background", "a white cross on a green background",
           "a yellow star on a purple background", ""]
SEEDS = [0, 7, 123, 7]
KW = {"steps": 3, "guidance": 3.0}


@pytest.fixture(scope="module")
def base(pixel_base_dir):
    return load_base(pixel_base_dir)


def hints_for(n: int, size: int = 16) -> list:
    return [canny_map(s, size) for s in sample_scenes(n, 5)]


def test_an_image_does_not_depend_on_its_batch(base):
    whole = generate(base, PROMPTS, SEEDS, batch_size=4, **KW)
    assert whole.shape == (4, 3, 16, 16) and whole.dtype == torch.float32
    assert whole.min() >= -1 and whole.max() <= 1
    for batch_size in (1, 3):
        assert torch.allclose(generate(base, PROMPTS, SEEDS, batch_size=batch_size, **KW), whole, atol=1e-4)
    flipped = generate(base, PROMPTS[::-1], SEEDS[::-1], batch_size=2, **KW)
    assert torch.allclose(flipped.flip(0), whole, atol=1e-4)
    # ... and it does depend on its own seed and prompt
    assert (whole[1] - whole[3]).abs().max() > 0.05               # seed 7, other prompt
    other_seed = generate(base, PROMPTS[:1], [1], **KW)
    assert (other_seed[0] - whole[0]).abs().max() > 0.05


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_image_is_what_the_sampler_gives_for_its_seed(base, sampler):
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    cond, uncond = encode_prompts(base, PROMPTS[1:2]), encode_prompts(base, [""])
    latents = SAMPLERS[sampler](lambda x, t, c: base.unet(x, t, c), schedule, (1, 12, 8, 8), 3,
                                torch.Generator().manual_seed(7), cond=cond, uncond=uncond,
                                guidance_scale=3.0)
    image = generate(base, PROMPTS[1:2], [7], sampler=sampler, **KW)
    assert torch.isfinite(image).all() and torch.allclose(image, decode(base, latents), atol=1e-5)
    if sampler != "ddim":
        assert (image - generate(base, PROMPTS[1:2], [7], **KW)).abs().max() > 1e-3
    assert torch.equal(start_noise([7], (12, 8, 8)), torch.randn((1, 12, 8, 8),
                                                                 generator=torch.Generator().manual_seed(7)))


def test_euler_and_guidance_one_run_and_differ(base):
    ddim = generate(base, PROMPTS[:2], SEEDS[:2], **KW)
    euler = generate(base, PROMPTS[:2], SEEDS[:2], sampler="euler", **KW)
    plain = generate(base, PROMPTS[:2], SEEDS[:2], steps=3, guidance=1.0)
    assert torch.isfinite(euler).all() and torch.isfinite(plain).all()
    assert (euler - ddim).abs().max() > 1e-3 and (plain - ddim).abs().max() > 1e-3
    images = to_images(ddim)
    assert [im.size for im in images] == [(16, 16)] * 2 and images[0].mode == "RGB"


def test_a_controlnet_at_init_changes_nothing(base):
    plain = generate(base, PROMPTS, SEEDS, **KW)
    cn = controlnet_for(base)
    assert torch.equal(generate(base, PROMPTS, SEEDS, controlnet=cn, hints=hints_for(4), **KW), plain)


def test_a_controlnet_steers_by_its_hints_in_any_batch(base):
    plain = generate(base, PROMPTS, SEEDS, **KW)
    cn = controlnet_for(base, zero=False)
    hints = hints_for(4)
    steered = generate(base, PROMPTS, SEEDS, controlnet=cn, hints=hints, batch_size=4, **KW)
    assert (steered - plain).abs().max() > 0.05
    # the hint goes with its prompt through the batches (and the CFG doubling)
    one_by_one = generate(base, PROMPTS, SEEDS, controlnet=cn, hints=hints, batch_size=1, **KW)
    assert torch.allclose(one_by_one, steered, atol=1e-4)
    other_hints = generate(base, PROMPTS, SEEDS, controlnet=cn, hints=hints[::-1], **KW)
    assert (other_hints - steered).abs().max() > 0.05
    # tensors in [0, 1] are the same hints as the pictures; scale 0 is the plain U-Net
    as_tensor = torch.stack([torch.from_numpy(np.asarray(h, np.float32) / 255).permute(2, 0, 1)
                             for h in hints])
    assert torch.equal(generate(base, PROMPTS, SEEDS, controlnet=cn, hints=as_tensor, **KW), steered)
    assert torch.equal(generate(base, PROMPTS, SEEDS, controlnet=cn, hints=hints, control_scale=0.0,
                                **KW), plain)
    assert cn.training is False


def test_a_non_square_size_with_its_hints(base):
    """(H, W) sizes (the ControlNet trainer samples its hints at their buckets' sizes): a 16 x 24
    picture, its hints of that size, and the same seed-to-picture contract as the square size."""
    cn = controlnet_for(base, zero=False)
    hints = torch.stack([torch.from_numpy(np.asarray(canny_map(s, 24), np.float32) / 255).permute(2, 0, 1)
                         for s in sample_scenes(2, 5)])[:, :, 4:20]                 # (2, 3, 16, 24)
    wide = generate(base, PROMPTS[:2], SEEDS[:2], size=(16, 24), controlnet=cn, hints=hints, **KW)
    assert wide.shape == (2, 3, 16, 24) and torch.isfinite(wide).all()
    assert torch.allclose(generate(base, PROMPTS[:2], SEEDS[:2], size=(16, 24), controlnet=cn, hints=hints,
                                   batch_size=1, **KW), wide, atol=1e-4)
    with pytest.raises(ValueError, match=re.escape("each (3, 16, 24)")):
        generate(base, PROMPTS[:2], SEEDS[:2], size=(16, 24), controlnet=cn, hints=hints_for(2), **KW)


BAD = {                       # name: (keyword arguments given base, what the error says)
    "seeds": (lambda b: {"seeds": [0]}, "one seed per prompt"),
    "sampler": (lambda b: {"sampler": "plms"},
                "unknown sampler 'plms'; expected one of ddim, euler, dpmpp_2m, dpmpp_2m_karras"),
    "size": (lambda b: {"size": 15}, "not a multiple of the base's latent scale 2"),
    "batch": (lambda b: {"batch_size": 0}, "batch_size must be >= 1"),
    "hints alone": (lambda b: {"hints": hints_for(2)}, "without a ControlNet"),
    "no hints": (lambda b: {"controlnet": controlnet_for(b)}, "needs hints"),
    "hint size": (lambda b: {"controlnet": controlnet_for(b), "hints": hints_for(2, size=8)},
                  "each (3, 16, 16)"),
    "hint range": (lambda b: {"controlnet": controlnet_for(b), "hints": torch.full((2, 3, 16, 16), 255.0)},
                   "in [0, 1]"),
    "hint count": (lambda b: {"controlnet": controlnet_for(b), "hints": hints_for(3)}, "one hint per prompt"),
    "8x controlnet": (lambda b: {"controlnet": ControlNet.from_unet(b.unet), "hints": hints_for(2)},
                      "downsamples 8x"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_fail_before_sampling(base, case, monkeypatch):
    monkeypatch.setitem(SAMPLERS, "ddim", lambda *a, **k: pytest.fail("sampled"))
    make, message = BAD[case]
    kw = {"seeds": [0, 1], **KW, **make(base)}
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(base, [caption(s) for s in sample_scenes(2, 0)], **kw)
