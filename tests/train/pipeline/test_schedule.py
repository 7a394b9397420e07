"""The noise schedule and loss against diffusers (the oracle) and against the papers' formulas."""
import dataclasses
import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from adapterkit.train.pipeline.schedule import PRESETS, NoiseSchedule, diffusion_loss, offset_noise
from support import REPO

# (beta_schedule, beta_start, beta_end, rescale_betas_zero_snr)
SCHEDULES = [
    ("linear", 0.0001, 0.02, False),
    ("scaled_linear", 0.00085, 0.012, False),
    ("squaredcos_cap_v2", 0.0001, 0.02, False),
    ("scaled_linear", 0.00085, 0.012, True),
]
PREDICTIONS = ["epsilon", "v_prediction"]

# The scheduler_config.json files of the released models, as published.
SD15_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
               "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
               "clip_sample": False}
SD21_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
               "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
               "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def make(schedule, start, end, zsnr, prediction="epsilon"):
    cfg = dict(beta_schedule=schedule, beta_start=start, beta_end=end, rescale_betas_zero_snr=zsnr,
               prediction_type=prediction)
    return NoiseSchedule(**cfg), DDPMScheduler(**cfg)


def in_float64(theirs):
    """diffusers' scheduler with its own betas multiplied out in float64.

    Its stock table is a float32 cumprod, so its sqrt(1 - a_t) near t=0 (a_t ~ 0.9999) is off by up to
    ~4e-6; the float64 table (betas as diffusers makes them, its zero-SNR rescale run in float64) removes
    that and nothing else of diffusers' arithmetic.
    """
    betas = DDPMScheduler.from_config({**theirs.config, "rescale_betas_zero_snr": False}).betas.double()
    if theirs.config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    theirs.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return theirs


@pytest.mark.parametrize("spec", SCHEDULES, ids=lambda s: f"{s[0]}{'-zsnr' if s[3] else ''}")
def test_alphas_cumprod_match_diffusers(spec):
    ours, theirs = make(*spec)
    assert ours.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spec", SCHEDULES, ids=lambda s: f"{s[0]}{'-zsnr' if s[3] else ''}")
def test_add_noise_and_target_match_diffusers(spec, prediction):
    ours, theirs = make(*spec, prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 5, 5, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    stock = theirs.add_noise(x0, noise, t)
    theirs = in_float64(theirs)
    x0_64, noise_64 = x0.double(), noise.double()
    noisy = ours.add_noise(x0, noise, t)
    assert noisy.dtype == torch.float32
    assert torch.allclose(noisy.double(), theirs.add_noise(x0_64, noise_64, t), atol=1e-6, rtol=0)
    assert torch.allclose(noisy, stock, atol=5e-6, rtol=0)       # stock diffusers: its float32 table
    want = noise_64 if prediction == "epsilon" else theirs.get_velocity(x0_64, noise_64, t)
    assert torch.allclose(ours.target(x0, noise, t).double(), want, atol=1e-6, rtol=0)


def test_zero_terminal_snr_rescale_matches_diffusers():
    ours = NoiseSchedule(rescale_betas_zero_snr=True)
    base = NoiseSchedule()
    betas32 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(betas32.double()), dim=0)
    assert torch.allclose(ours.alphas_cumprod, theirs, atol=1e-6, rtol=0)
    # Lin et al. 2024 Algorithm 1: SNR exactly 0 at the end, the first step unchanged, still decreasing.
    assert ours.alphas_cumprod[-1] == 0 and ours.snr(torch.tensor([999])).item() == 0
    assert torch.isclose(ours.alphas_cumprod[0], base.alphas_cumprod[0], atol=1e-12)
    assert (ours.alphas_cumprod.diff() < 0).all()


@pytest.mark.parametrize("spec", SCHEDULES, ids=lambda s: f"{s[0]}{'-zsnr' if s[3] else ''}")
def test_snr_from_alphas(spec):
    ours, theirs = make(*spec)
    a = in_float64(theirs).alphas_cumprod
    assert torch.allclose(ours.snr(torch.arange(1000)).double(), a / (1 - a), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spec", SCHEDULES, ids=lambda s: f"{s[0]}{'-zsnr' if s[3] else ''}")
def test_min_snr_weights_follow_the_paper(spec, prediction, gamma):
    ours, theirs = make(*spec, prediction)
    t = torch.arange(1000)
    # Hang et al. 2023: x0-space weight min(SNR, gamma), divided by SNR (eps) or SNR + 1 (v); SNR from
    # diffusers' table, written out here independently of train/pipeline/schedule.py.
    a = in_float64(theirs).alphas_cumprod
    snr = a / (1 - a)
    want = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction == "epsilon" else snr + 1)
    want[snr == 0] = 1.0      # the authors' code: the SNR-0 step of a zero-terminal schedule keeps weight 1
    w = ours.min_snr_weights(t, gamma)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert torch.allclose(w.double(), want, rtol=1e-4, atol=1e-6)
    assert w[999] > 0 and w[0] > 0


def test_min_snr_weight_shapes_the_loss():
    s = NoiseSchedule()
    t = torch.tensor([0, 999])
    w = s.min_snr_weights(t, 5.0)
    # eps: the high-SNR (t=0) step is damped to gamma/SNR, the low-SNR (t=999) step keeps weight 1.
    assert w[0] < 0.01 and w[1] == 1.0
    with pytest.raises(ValueError, match="min_snr_gamma"):
        s.min_snr_weights(t, 0.0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusion_loss_is_weighted_mse_in_fp32(prediction):
    s = NoiseSchedule(prediction_type=prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, 4, 6, 6, generator=g)
    t = torch.tensor([3, 200, 700, 999])
    target = s.target(x0, noise, t)
    assert diffusion_loss(target.clone(), x0, noise, t, s) == 0
    out = torch.randn(4, 4, 6, 6, generator=g).to(torch.bfloat16)
    plain = diffusion_loss(out, x0, noise, t, s)
    assert plain.dtype == torch.float32
    assert torch.isclose(plain, ((out.float() - target) ** 2).mean())
    weighted = diffusion_loss(out, x0, noise, t, s, min_snr_gamma=5.0)
    per_sample = ((out.float() - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.isclose(weighted, (per_sample * s.min_snr_weights(t, 5.0)).mean())
    with pytest.raises(ValueError, match="does not match"):
        diffusion_loss(out[:, :3], x0, noise, t, s)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(4,\)"):
        s.add_noise(x0, noise, t[:2])


def test_offset_noise():
    shape = (3, 4, 8, 8)
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    noisy = offset_noise(shape, 0.1, torch.Generator().manual_seed(7))
    # Same first draw, plus a constant per (sample, channel): diffusers' --noise_offset order.
    shift = noisy - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand(shape), atol=1e-6)
    g = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=g)
    assert torch.allclose(shift[:, :, :1, :1], 0.1 * torch.randn(3, 4, 1, 1, generator=g), atol=1e-6)


def test_sample_timesteps_uniform_and_seeded():
    s = NoiseSchedule()
    t = s.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert t.min() == 0 and t.max() == 999
    assert abs(t.double().mean().item() - 499.5) < 10
    assert torch.equal(t, s.sample_timesteps(20000, torch.Generator().manual_seed(0)))


def test_presets_are_the_released_configs():
    assert NoiseSchedule.from_config(SD15_CONFIG) == PRESETS["sd1"] == NoiseSchedule()
    assert NoiseSchedule.from_config(SD21_CONFIG) == PRESETS["sd2-v"]
    assert PRESETS["sd2"].prediction_type == "epsilon"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_agree_with_the_shipped_scheduler_configs(name):
    # train/pipeline/base.py hands these files to from_config; the two must not drift apart.
    path = REPO / "configs" / "schedulers" / f"{name}.json"
    assert NoiseSchedule.from_config(json.loads(path.read_text())) == PRESETS[name]


def test_missing_keys_mean_what_diffusers_means():
    ours = NoiseSchedule.from_config({})
    theirs = DDIMScheduler().config
    for k, v in ours.to_config().items():
        assert theirs[k] == v, k


def test_config_round_trips_through_diffusers():
    s = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                      timestep_spacing="trailing")
    assert NoiseSchedule.from_config(s.to_config()) == s
    theirs = DDIMScheduler.from_config(s.to_config())
    assert theirs.config.prediction_type == "v_prediction" and theirs.config.timestep_spacing == "trailing"
    assert torch.allclose(s.alphas_cumprod, theirs.alphas_cumprod.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler, EulerDiscreteScheduler,
                                 DPMSolverMultistepScheduler, LCMScheduler])
def test_reads_any_diffusers_scheduler_config(cls):
    config = dict(cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    s = NoiseSchedule.from_config(config)
    assert torch.allclose(s.alphas_cumprod, cls.from_config(config).alphas_cumprod.double(), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' is not supported; choose one of linear"),
    ({"prediction_type": "sample"}, "x0-prediction"),
    ({"timestep_spacing": "even"}, "timestep_spacing"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"timestep_type": "continuous"}, "continuous"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start <= beta_end"),
    ({"num_train_timesteps": 1}, "at least 2"),
])
def test_refuses_what_it_cannot_honour(change, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_config({**SD15_CONFIG, **change})


def test_schedule_is_immutable_and_comparable():
    s = NoiseSchedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.prediction_type = "v_prediction"
    assert s != dataclasses.replace(s, prediction_type="v_prediction")
