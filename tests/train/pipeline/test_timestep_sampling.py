"""Timestep sampling and debiased-estimation weights against their definitions: the SD3 paper's
densities (Esser et al. 2024, eqs. 19 and 20) integrated numerically over each discrete timestep's
interval, kohya sd-scripts' weight on a diffusers schedule, and the x0-loss identity for eps and v."""
import math

import pytest
import torch
from diffusers import DDPMScheduler
from scipy import integrate, optimize

from adapterkit.train.pipeline.schedule import NoiseSchedule, TimestepSampling, diffusion_loss

N = 100_000
KS = 1.63 / math.sqrt(N)        # Kolmogorov-Smirnov bound at the 1% level


def draw(sampling, T=1000, n=N, seed=0):
    schedule = NoiseSchedule(num_train_timesteps=T)
    return schedule.sample_timesteps(n, torch.Generator().manual_seed(seed), sampling=sampling)


def empirical_cdf(t, T):
    """P(t <= k) for k = 0..T-1."""
    return torch.bincount(t, minlength=T).cumsum(0).double() / len(t)


def logit_normal_density(u, m, s):
    # Esser et al. 2024 eq. 19, written from the paper.
    return 1 / (s * math.sqrt(2 * math.pi)) / (u * (1 - u)) * math.exp(-(math.log(u / (1 - u)) - m) ** 2
                                                                      / (2 * s * s))


def f_mode(v, s):
    # Esser et al. 2024 eq. 20.
    return 1 - v - s * (math.cos(math.pi / 2 * v) ** 2 - 1 + v)


def test_the_default_is_todays_uniform_draw():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = NoiseSchedule().sample_timesteps(64, g1)
    assert torch.equal(ours, torch.randint(0, 1000, (64,), generator=g2))
    assert torch.equal(NoiseSchedule().sample_timesteps(64, torch.Generator().manual_seed(3),
                                                        sampling=TimestepSampling()), ours)


def test_uniform_in_a_restricted_range_is_half_open():
    t = draw(TimestepSampling(min_timestep=200, max_timestep=300), n=20_000)
    assert t.min().item() == 200 and t.max().item() == 299
    counts = torch.bincount(t - 200, minlength=100).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.25        # ~200 per value


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_matches_the_papers_density(m, s):
    T = 1000
    cdf = empirical_cdf(draw(TimestepSampling("logit_normal", logit_mean=m, logit_std=s)), T)
    ks = list(range(0, T, 37)) + [T - 2]
    want = [integrate.quad(logit_normal_density, 1e-12, (k + 1) / T, args=(m, s), limit=200)[0] for k in ks]
    got = cdf[ks]
    assert (got - torch.tensor(want, dtype=torch.float64)).abs().max() < KS
    uniform = empirical_cdf(draw(TimestepSampling()), T)[ks]
    assert (uniform - torch.tensor(want, dtype=torch.float64)).abs().max() > 10 * KS   # the test can fail


@pytest.mark.parametrize("scale", [1.29, 0.5, -0.8])
def test_mode_sampling_matches_the_papers_map(scale):
    # u = f_mode(v) with v uniform and f decreasing: P(u < x) = 1 - f^-1(x); t <= k <=> u < (k + 1) / T.
    T = 1000
    cdf = empirical_cdf(draw(TimestepSampling("mode", mode_scale=scale)), T)
    ks = list(range(0, T - 1, 41))
    want = [1 - optimize.brentq(lambda v, k=k: f_mode(v, scale) - (k + 1) / T, 0, 1, xtol=1e-12) for k in ks]
    assert (cdf[ks] - torch.tensor(want, dtype=torch.float64)).abs().max() < KS
    uniform = empirical_cdf(draw(TimestepSampling()), T)[ks]
    assert (uniform - torch.tensor(want, dtype=torch.float64)).abs().max() > 5 * KS


def test_mode_scale_zero_is_uniform_and_the_ranges_map_inside():
    cdf = empirical_cdf(draw(TimestepSampling("mode", mode_scale=0.0)), 1000)
    assert (cdf - torch.arange(1, 1001, dtype=torch.float64) / 1000).abs().max() < KS
    for kind in ("logit_normal", "mode"):
        t = draw(TimestepSampling(kind, min_timestep=100, max_timestep=400, logit_std=3.0), n=20_000)
        assert t.min().item() >= 100 and t.max().item() <= 399
        assert t.min().item() < 110 and t.max().item() > 390      # reaches both ends of the range


def test_bad_ranges_and_scales_are_refused():
    with pytest.raises(ValueError, match=r"max_timestep <= 1000"):
        draw(TimestepSampling(max_timestep=1001), n=4)
    with pytest.raises(ValueError, match=r"min_timestep < max_timestep"):
        draw(TimestepSampling(min_timestep=500, max_timestep=500), n=4)
    with pytest.raises(ValueError, match=r"mode_scale must be in"):
        TimestepSampling("mode", mode_scale=2.0)
    with pytest.raises(ValueError, match=r"timestep_sampling='beta' is not supported"):
        TimestepSampling("beta")


def test_debiased_weights_are_kohyas_on_a_diffusers_schedule():
    # kohya sd-scripts library/custom_train_functions.py: all_snr = (sqrt(a) / sqrt(1 - a))^2 from the
    # diffusers scheduler's alphas_cumprod, weight = 1 / sqrt(min(snr, 1000)).
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a = theirs.alphas_cumprod.double()
    all_snr = (a.sqrt() / (1 - a).sqrt()) ** 2
    t = torch.arange(1000)
    want = 1 / torch.sqrt(torch.minimum(all_snr, torch.full_like(all_snr, 1000)))
    ours = NoiseSchedule().debiased_weights(t)
    torch.testing.assert_close(ours.double(), want, rtol=2e-5, atol=0)
    assert ours[0] == pytest.approx(1 / math.sqrt(1000))          # SD's t = 0 has SNR ~1170: capped


@pytest.mark.parametrize("zsnr", [False, True])
def test_debiased_eps_and_v_losses_are_one_objective(zsnr):
    """For one x0 prediction, the eps-loss and the v-loss it implies, each with its debiased weight, are
    sqrt(SNR) times the x0-MSE (where SNR < 1000 and > 0): the weighting is the same for both models."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    x0_hat = x0 + 0.3 * torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([30, 150, 400, 700, 900, 998])
    eps_s = NoiseSchedule(rescale_betas_zero_snr=zsnr)
    v_s = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=zsnr)
    a = eps_s.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = eps_s.add_noise(x0, noise, t)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    snr = eps_s.snr(t)
    x0_mse = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    want = (snr.sqrt() * x0_mse).mean()
    eps_loss = diffusion_loss(eps_hat, x0, noise, t, eps_s, debiased=True)
    v_loss = diffusion_loss(v_hat, x0, noise, t, v_s, debiased=True)
    torch.testing.assert_close(eps_loss, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(v_loss, want, rtol=1e-4, atol=0)
    plain = diffusion_loss(v_hat, x0, noise, t, v_s)
    assert abs(plain.item() - want.item()) > 0.1 * want.item()      # the weighting is not a no-op


def test_debiased_weight_is_one_at_zero_snr_and_combines_with_min_snr():
    s = NoiseSchedule(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert s.debiased_weights(torch.tensor([999])).item() == 1.0
    g = torch.Generator().manual_seed(1)
    x0, noise, out = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([10, 300, 600, 999])
    per = ((out - s.target(x0, noise, t)) ** 2).flatten(1).mean(1)
    both = diffusion_loss(out, x0, noise, t, s, min_snr_gamma=5.0, debiased=True)
    torch.testing.assert_close(both, (per * s.min_snr_weights(t, 5.0) * s.debiased_weights(t)).mean())
