"""DDIM, Euler and DPM++ 2M against diffusers' schedulers stepping the same model from the same noise."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from adapterkit.train.pipeline.sampling import (
    SAMPLERS,
    ddim_sample,
    dpmpp_2m_sample,
    euler_sample,
    spaced_timesteps,
)
from adapterkit.train.pipeline.schedule import NoiseSchedule
from adapterkit.unet import PRESETS, UNet, as_conditioning

SHAPE = (2, 4, 8, 8)
# SD1.5's file plus an explicit spacing: without one, diffusers' DDIM reads "leading", its Euler "linspace".
BASE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading"}


class Toy:
    """A fixed random channel mix of x, squashed, plus a term in t and one in the context; logs its calls.

    For epsilon it adds sqrt(1 - a_t) x, the exact eps of unit-Gaussian data (the exact v is 0), so samples
    stay O(1) like real latents and an absolute tolerance means what it says.
    """

    def __init__(self, prediction="epsilon", channels=4):
        self.w = torch.randn(channels, channels, generator=seeded(0)) / channels**0.5
        self.eps = prediction == "epsilon"
        self.a = NoiseSchedule().alphas_cumprod.float()
        self.calls = []

    def __call__(self, x, t, context):
        context = as_conditioning(context).context           # our samplers pass a Conditioning
        self.calls.append((x.shape[0], torch.as_tensor(t).clone(), context.clone()))
        t = torch.as_tensor(t).reshape(-1, 1, 1, 1)          # diffusers passes one 0-d t, we pass (N,)
        mixed = (self.w @ x.flatten(2)).reshape(x.shape)     # (C, C) @ (N, C, HW): mix channels
        out = 0.3 * torch.tanh(mixed) + 0.1 * torch.cos(t.float() / 300)
        out = out + 0.2 * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return out + (1 - self.a[t.long()]).sqrt() * x if self.eps else out


def contexts(batch=SHAPE[0]):
    g = seeded(3)
    return torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 5, 8, generator=g)


def diffusers_loop(scheduler, model, x, cond, uncond, scale, steps, **step_kwargs):
    # The stepping loop of diffusers' StableDiffusionPipeline, minus the VAE and the text encoder.
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        # txt2img starts at the first step; without this diffusers' lookup takes the second of two equal
        # first timesteps (its img2img rule), which DPM-Solver's Karras steps under zero-terminal SNR have.
        scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if scale == 1:
            out = model(x_in, t, cond)
        else:
            out_u, out_c = model(torch.cat([x_in, x_in]), t, torch.cat([uncond, cond])).chunk(2)
            out = out_u + scale * (out_c - out_u)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def noise(seed=0):
    return torch.randn(SHAPE, generator=seeded(seed))


CASES = [dict(prediction_type=p, timestep_spacing=s) for p in ("epsilon", "v_prediction")
         for s in ("leading", "trailing")]
CASES += [dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
          dict(prediction_type="epsilon", timestep_spacing="leading", clip_sample=True,
               set_alpha_to_one=True)]


def case_id(c):
    return "-".join(str(v) for v in c.values())


@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ddim_matches_diffusers(case, scale):
    config = {**BASE, **case}
    cond, uncond = contexts()
    toy = Toy(case["prediction_type"])
    ours = ddim_sample(toy, NoiseSchedule.from_config(config), SHAPE, 10, seeded(0),
                       cond=cond, uncond=uncond, guidance_scale=scale)
    theirs = diffusers_loop(DDIMScheduler.from_config(config), toy, noise(), cond, uncond, scale, 10)
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_draws_noise_like_diffusers(eta):
    config = {**BASE, "prediction_type": "v_prediction"}
    cond, uncond = contexts()
    toy = Toy("v_prediction")
    ours = ddim_sample(toy, NoiseSchedule.from_config(config), SHAPE, 10, seeded(5), eta=eta,
                       cond=cond, uncond=uncond, guidance_scale=7.5)
    g = seeded(5)
    start = torch.randn(SHAPE, generator=g)                  # the pipeline's latents come first, then steps
    theirs = diffusers_loop(DDIMScheduler.from_config(config), toy, start, cond, uncond, 7.5, 10,
                            eta=eta, generator=g)
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_euler_matches_diffusers(case, scale):
    config = {**BASE, **case}
    cond, uncond = contexts()
    toy = Toy(case["prediction_type"])
    ours = euler_sample(toy, NoiseSchedule.from_config(config), SHAPE, 10, seeded(0),
                        cond=cond, uncond=uncond, guidance_scale=scale)
    scheduler = EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(10)
    # We start every spacing at sqrt(sigma_max^2 + 1) (the std of x_T in sigma space); diffusers does so
    # for "leading" only, so the loop is given that start explicitly.
    start_scale = (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    if case["timestep_spacing"] == "leading":
        assert torch.isclose(start_scale, scheduler.init_noise_sigma)
    theirs = diffusers_loop(scheduler, toy, noise() * start_scale, cond, uncond, scale, 10)
    assert torch.isfinite(ours).all()
    # Under zero-terminal SNR sigma_max = 4096 and diffusers' step x + d dt cancels two numbers of that
    # size in float32, leaving ~1e-4 of its own rounding (ours avoids it: see the exact-model test).
    assert (ours - theirs).abs().max() <= (1e-4 if case.get("rescale_betas_zero_snr") else 1e-5)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"]).eval()


ORACLES = {ddim_sample: DDIMScheduler, euler_sample: EulerDiscreteScheduler,
           dpmpp_2m_sample: DPMSolverMultistepScheduler}


@pytest.mark.parametrize("sampler", list(ORACLES), ids=lambda f: f.__name__)
def test_tiny_unet_as_model_fn(sampler, tiny_unet):
    # Our U-Net plugs in as model_fn as it is. Guidance is left at 1 here: a random-init U-Net under
    # guidance 7.5 moves its result by ~3e-5 when its start noise moves by 1e-7 (diffusers' as much as
    # ours), so the 1e-5 comparison of the guided path is made on the toy above.
    config = {**BASE, "prediction_type": "v_prediction"}
    shape = (1, 4, 8, 8)
    cond = torch.randn(1, 6, 64, generator=seeded(2))
    ours = sampler(tiny_unet, NoiseSchedule.from_config(config), shape, 3, seeded(1),
                   cond=cond)
    scheduler = ORACLES[sampler].from_config(config)
    scheduler.set_timesteps(3)
    start = torch.randn(shape, generator=seeded(1)) * scheduler.init_noise_sigma
    with torch.no_grad():
        theirs = diffusers_loop(scheduler, tiny_unet, start, cond, None, 1.0, 3)
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timesteps_are_diffusers_set_timesteps(spacing, offset):
    config = {**BASE, "timestep_spacing": spacing, "steps_offset": offset}
    schedule = NoiseSchedule.from_config(config)
    ddim, euler = DDIMScheduler.from_config(config), EulerDiscreteScheduler.from_config(config)
    for steps in range(1, 1000 if offset else 1001):
        ours = spaced_timesteps(schedule, steps)
        ddim.set_timesteps(steps)
        assert ours.dtype == torch.int64 and len(ours) == steps and ours.min() >= 0 and ours.max() <= 999
        # diffusers' float arange yields one extra trailing timestep, -1, for some counts (61, 103, ...).
        assert torch.equal(ours, ddim.timesteps[:steps]), steps
        if steps in (1, 10, 25, 30, 50, 61, 999):
            euler.set_timesteps(steps)
            assert torch.equal(ours, euler.timesteps[:steps].long()), steps


def test_timesteps_refuse_what_they_cannot_do():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        spaced_timesteps(s, 0)
    with pytest.raises(ValueError, match="past the last trained one"):
        spaced_timesteps(s, 1000)                    # leading with steps_offset=1 would start at 1000
    with pytest.raises(ValueError, match="'leading' or 'trailing'"):
        spaced_timesteps(dataclasses.replace(s, timestep_spacing="linspace"), 10)


@pytest.mark.parametrize("prediction, spacing, steps, zero_snr", [
    ("epsilon", "leading", 7, False), ("epsilon", "trailing", 30, False),
    ("v_prediction", "leading", 7, False), ("v_prediction", "trailing", 30, False),
    ("v_prediction", "trailing", 10, True),
])
@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_a_model_that_knows_x0_gets_it_back(sampler, prediction, spacing, steps, zero_snr):
    # With one data point the exact model is known in closed form; every ODE sampler must land on it for
    # any spacing, including trailing steps that do not divide T (where diffusers' DDIM steps to t - 33
    # while the next listed timestep is t - 34) and from SNR 0 (Euler and DPM++ starting at sigma = 4096),
    # and at Karras sigmas that are not the called timestep's (the exact x0 does not depend on t).
    schedule = NoiseSchedule(prediction_type=prediction, timestep_spacing=spacing, set_alpha_to_one=True,
                             rescale_betas_zero_snr=zero_snr)
    x0 = torch.randn(SHAPE, generator=seeded(9))
    a = schedule.alphas_cumprod

    def exact(x, t, context):
        at = a[t].float().reshape(-1, 1, 1, 1)
        eps = (x - at.sqrt() * x0) / (1 - at).sqrt()
        return eps if prediction == "epsilon" else at.sqrt() * eps - (1 - at).sqrt() * x0

    out = sampler(exact, schedule, SHAPE, steps, seeded(0), cond=torch.zeros(2, 1, 1))
    assert (out - x0).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_guidance_is_one_call_on_uncond_then_cond(sampler):
    cond, uncond = contexts()
    toy = Toy()
    sampler(toy, NoiseSchedule(), SHAPE, 5, seeded(0), cond=cond, uncond=uncond,
            guidance_scale=3.0)
    assert len(toy.calls) == 5
    for batch, t, context in toy.calls:
        assert batch == 2 * SHAPE[0] and t.shape == (batch,) and t.dtype == torch.int64
        assert torch.equal(context, torch.cat([uncond, cond]))
    toy = Toy()
    sampler(toy, NoiseSchedule(), SHAPE, 5, seeded(0), cond=cond, guidance_scale=1.0)
    assert [(b, c.shape[0]) for b, _, c in toy.calls] == [(SHAPE[0], SHAPE[0])] * 5


@pytest.mark.parametrize("sampler", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_guidance_with_equal_contexts_changes_nothing(sampler):
    cond, _ = contexts()
    plain = sampler(Toy(), NoiseSchedule(), SHAPE, 5, seeded(0), cond=cond)
    guided = sampler(Toy(), NoiseSchedule(), SHAPE, 5, seeded(0), cond=cond,
                     uncond=cond.clone(), guidance_scale=7.5)
    assert torch.allclose(plain, guided, atol=1e-5)


def test_sampler_errors_are_clear():
    cond, uncond = contexts()
    g = seeded(0)
    with pytest.raises(ValueError, match="needs an unconditional context"):
        ddim_sample(Toy(), NoiseSchedule(), SHAPE, 5, g, cond=cond, guidance_scale=7.5)
    with pytest.raises(ValueError, match="cond has batch 1, the latents 2"):
        euler_sample(Toy(), NoiseSchedule(), SHAPE, 5, g, cond=cond[:1])
    zero_snr_eps = NoiseSchedule(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for sampler in (ddim_sample, SAMPLERS["dpmpp_2m"], SAMPLERS["dpmpp_2m_karras"]):
        with pytest.raises(ValueError, match="need v_prediction"):
            sampler(Toy(), zero_snr_eps, SHAPE, 5, g, cond=cond)
    with pytest.raises(ValueError, match="past the last trained one"):
        dpmpp_2m_sample(Toy(), NoiseSchedule(), SHAPE, 999, g, cond=cond)      # 999 x 1 + 1 = 1000
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        dpmpp_2m_sample(Toy(), NoiseSchedule(), SHAPE, 0, g, cond=cond, karras=True)


# -- DPM++ 2M against DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) --------

DPM_CASES = CASES[:5]           # eps and v, leading and trailing, v under zero-terminal SNR


@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
@pytest.mark.parametrize("case", DPM_CASES, ids=case_id)
def test_dpmpp_2m_matches_diffusers(case, karras, steps, scale):
    config = {**BASE, **case}
    cond, uncond = contexts()
    toy = Toy(case["prediction_type"])
    ours = dpmpp_2m_sample(toy, NoiseSchedule.from_config(config), SHAPE, steps, seeded(0), cond=cond,
                           uncond=uncond, guidance_scale=scale, karras=karras)
    scheduler = DPMSolverMultistepScheduler.from_config({**config, "use_karras_sigmas": karras},
                                                        algorithm_type="dpmsolver++", solver_order=2)
    assert scheduler.init_noise_sigma == 1.0                 # both start from unit noise
    theirs = diffusers_loop(scheduler, toy, noise(), cond, uncond, scale, steps)
    assert torch.isfinite(ours).all()
    # diffusers computes each step's coefficients in float32 (log alpha - log sigma, exp(-h) - 1), ours
    # in float64: at 25 eps Karras steps (|x| ~ 4) a float64 run of the same steps is 1.0e-5 from
    # diffusers' result and 1.4e-6 from ours, so the bound is relative.
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("karras", [False, True], ids=["discrete", "karras"])
@pytest.mark.parametrize("case", [dict(timestep_spacing="leading", steps_offset=1),
                                  dict(timestep_spacing="leading", steps_offset=0),
                                  dict(timestep_spacing="trailing"),
                                  dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)],
                         ids=case_id)
def test_dpmpp_2m_steps_are_diffusers_set_timesteps(case, karras):
    # The timesteps the model is called at (the toy's log of calls) for many step counts.
    config = {**BASE, **case, "prediction_type": "v_prediction"}
    schedule = NoiseSchedule.from_config(config)
    scheduler = DPMSolverMultistepScheduler.from_config({**config, "use_karras_sigmas": karras})
    log_sigmas = np.log(np.array(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5))
    for steps in [*range(1, 60), 100, 200, 998]:
        toy = Toy("v_prediction")
        dpmpp_2m_sample(toy, schedule, SHAPE, steps, seeded(0), cond=torch.zeros(2, 1, 1), karras=karras)
        ours = [int(t[0]) for _, t, _ in toy.calls]
        scheduler.set_timesteps(steps)
        theirs = scheduler.timesteps.tolist()[:steps]
        assert len(ours) == steps and min(ours) >= 0 and max(ours) <= 999
        for i in (i for i in range(steps) if ours[i] != theirs[i]):
            # Only where diffusers' float32 interpolation puts t within 1e-3 of a half (Karras: 18, 35, ...).
            t = scheduler._sigma_to_t(np.array(float(scheduler.sigmas[i])), log_sigmas)
            assert karras and abs(t % 1 - 0.5) < 1e-3 and abs(ours[i] - theirs[i]) == 1, (steps, i)
