"""Samplers for the training previews: DDIM, Euler and DPM-Solver++(2M), with classifier-free guidance.

    model_fn = lambda x, t, cond: unet(x, t, cond)           # a ControlNet wraps this, nothing else
    latents = ddim_sample(model_fn, schedule, (4, 4, 64, 64), steps=30, generator=g,
                          cond=text, uncond=empty_text, guidance_scale=7.5)

`cond` and `uncond` are conditioning records (unet.Conditioning; a bare context tensor is taken as
one). `model_fn(x, t, cond)` gets fp32 `x` (N, C, H, W), int64 timesteps `t` (N,) and the record, and returns
the schedule's prediction (eps or v) of x's shape; it casts to its own dtype itself. With guidance it is
called once per step on a doubled batch: the first half is unconditional, the second conditional, in
that order (diffusers' layout, so a wrapper that tiles a control hint needs no more than `cat([h, h])`).

The samplers match diffusers' DDIMScheduler / EulerDiscreteScheduler / DPMSolverMultistepScheduler
stepping loops to fp32 rounding (tests/train/pipeline/test_sampling*.py), except where diffusers'
arithmetic drifts from the algorithm:
- DDIM steps from each listed timestep to the next one listed (the DDIM paper's sub-sequence); diffusers
  steps to t - T // steps, which differs for "trailing" spacing when `steps` does not divide T.
- Euler starts from noise x sqrt(sigma_max^2 + 1), the std of x_T in sigma space, for every spacing;
  diffusers uses that for "leading" only and sigma_max for "trailing"/"linspace".
- "trailing" gives exactly `steps` timesteps; diffusers' float arange adds a t = -1 for some counts (61).
- DPM++ 2M with Karras sigmas calls the model at each sigma's nearest timestep, found in float64 for every
  beta schedule; diffusers interpolates in float32, so a t within ~1e-3 of a half can round the other
  way (one step of 18, 35, 43, ... Karras steps on SD's schedule), and truncates for "squaredcos_cap_v2".
`SAMPLERS` names them all (the command line's and the recipes' choices).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from adapterkit.unet import Conditioning, as_conditioning

from .schedule import NoiseSchedule

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]

# diffusers' EulerDiscreteScheduler floors a_T at the smallest fp16 subnormal so that a zero-terminal-SNR
# schedule's first sigma is finite (sqrt(2^24) = 4096) instead of infinite.
_MIN_ALPHA_CUMPROD = 2.0**-24


def check_steps(schedule: NoiseSchedule, steps: int) -> int:
    """`steps` against the schedule's training timesteps (1..T, what every sampler can visit); returns T."""
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (num_train_timesteps), got {steps}")
    return T


def spaced_timesteps(schedule: NoiseSchedule, steps: int) -> Tensor:
    """The `steps` training timesteps a sampler visits, noisiest first (int64); diffusers' `set_timesteps`.

    "leading" (SD's default): k * (T // steps) + steps_offset for k = steps-1..0, so 50 steps start at 981
    and never reach T-1. "trailing": round(T - k T / steps) - 1 for k = 0..steps-1, starting at T-1 —
    the spacing a zero-terminal-SNR model needs to begin from pure noise (Lin et al. 2024,
    arXiv:2305.08891, §3.3 and Table 2).
    """
    T = check_steps(schedule, steps)
    if schedule.timestep_spacing == "leading":
        t = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (T // steps) + schedule.steps_offset
        if t[0] >= T:
            raise ValueError(f"{steps} 'leading' steps with steps_offset={schedule.steps_offset} would start "
                             f"at timestep {int(t[0])}, past the last trained one ({T - 1}); use fewer steps")
    elif schedule.timestep_spacing == "trailing":
        # diffusers' numpy arithmetic to the last bit, since ties (937.5) round half-to-even: a float
        # arange realises its step as (T - T/steps) - T. We stop at k = steps - 1, where diffusers' arange
        # sometimes yields one more value (t = -1, for steps = 61, 103, ...).
        step = (T - T / steps) - T
        t = torch.round(T + torch.arange(steps, dtype=torch.float64) * step).to(torch.int64) - 1
    else:
        raise ValueError(f"timestep_spacing={schedule.timestep_spacing!r} is not supported by our samplers; "
                         "use 'leading' or 'trailing' (dataclasses.replace(schedule, timestep_spacing=...))")
    return t


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: Sequence[int], steps: int,
                generator: torch.Generator | None = None, eta: float = 0.0, *, cond: Conditioning | Tensor,
                uncond: Conditioning | Tensor | None = None, guidance_scale: float = 1.0,
                noise: Tensor | None = None) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16) from fresh noise.

    eta=0 is the deterministic sampler; eta=1 has DDPM's posterior variance. Noise (the start, then one
    draw per step when eta > 0) comes from `generator` in diffusers' order; `noise` (of `shape`) gives
    the start instead (e.g. one seed per image: train.generate). Returns fp32 latents.
    """
    ts = spaced_timesteps(schedule, steps)
    a = schedule.alphas_cumprod
    if schedule.prediction_type == "epsilon" and a[ts[0]] == 0:
        raise ValueError("an epsilon model cannot denoise from SNR 0 (x0 = (x - eps) / 0); zero-terminal-SNR "
                         "schedules need v_prediction (Lin et al. 2024 §3.2) or 'leading' spacing")
    final = 1.0 if schedule.set_alpha_to_one else a[0].item()
    cond, uncond = _records(cond, uncond)
    x = _start(shape, generator, cond.device, noise)
    ts = ts.tolist()
    for i, t in enumerate(ts):
        a_t = a[t].item()
        a_prev = a[ts[i + 1]].item() if i + 1 < len(ts) else final
        out = _guided(model_fn, x, t, cond, uncond, guidance_scale)
        x0, eps = _split(out, x, a_t, schedule.prediction_type)
        if schedule.clip_sample:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        # sigma_t(eta) of eq. 16: eta x the std of DDPM's posterior q(x_prev | x_t, x0).
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
        if eta > 0:
            x = x + std * _noise(shape, generator, cond.device)
    return x


@torch.no_grad()
def euler_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: Sequence[int], steps: int,
                 generator: torch.Generator | None = None, *, cond: Conditioning | Tensor,
                 uncond: Conditioning | Tensor | None = None,
                 guidance_scale: float = 1.0, noise: Tensor | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, "EDM", Algorithm 2
    with S_churn = 0 and without the second-order correction), as diffusers' EulerDiscreteScheduler.

    The VP sample x_t is x / sqrt(sigma^2 + 1) with sigma = sqrt((1 - a_t) / a_t); each step moves x along
    d = (x - x0_hat) / sigma to the next sigma, and the last one to sigma = 0. The start is unit noise
    from `generator`, or `noise` (of `shape`) when given, times sqrt(sigma_max^2 + 1). Returns fp32 latents.
    """
    ts = spaced_timesteps(schedule, steps)
    a = schedule.alphas_cumprod.clamp(min=_MIN_ALPHA_CUMPROD)
    sigmas = (((1 - a) / a).sqrt()[ts]).tolist() + [0.0]
    cond, uncond = _records(cond, uncond)
    x = _start(shape, generator, cond.device, noise) * math.sqrt(sigmas[0] ** 2 + 1)
    for i, t in enumerate(ts.tolist()):
        sigma, c_in = sigmas[i], 1 / math.sqrt(sigmas[i] ** 2 + 1)
        out = _guided(model_fn, x * c_in, t, cond, uncond, guidance_scale)
        if schedule.prediction_type == "epsilon":
            x0 = x - sigma * out
        else:
            # x0 = sqrt(a) x_t - sqrt(1 - a) v with x_t = c_in x, sqrt(a) = c_in, sqrt(1 - a) = sigma c_in.
            x0 = x * c_in**2 - out * (sigma * c_in)
        # The Euler step x + (sigma' - sigma) d with d = (x - x0) / sigma, written as the same number
        # without cancelling two O(sigma) terms (sigma_max = 4096 under zero-terminal SNR).
        x = x0 + (sigmas[i + 1] / sigma) * (x - x0)
    return x


@torch.no_grad()
def dpmpp_2m_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: Sequence[int], steps: int,
                    generator: torch.Generator | None = None, *, cond: Conditioning | Tensor,
                    uncond: Conditioning | Tensor | None = None, guidance_scale: float = 1.0,
                    noise: Tensor | None = None, karras: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): A1111's "DPM++ 2M", ComfyUI's
    "dpmpp_2m", diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).

    A multistep solver of the probability-flow ODE in data prediction. With alpha = sqrt(a),
    sigma_vp = sqrt(1 - a), sigma = sigma_vp / alpha (so the paper's lambda = log(alpha / sigma_vp) is
    -log sigma) and h = lambda_next - lambda = log(sigma / sigma_next), one step of the VP sample x_t is
    x_next = (sigma_vp_next / sigma_vp) x + alpha_next (1 - e^-h) D, where D = x0_hat (first order:
    DDIM's step) or D = x0_hat + (x0_hat - x0_prev) / (2 r) with r = h_prev / h (second order, from the
    previous step's x0_hat: no extra model call). The first step has no previous x0_hat and is
    first-order. The paper ends at a small t_eps; we end, as diffusers (final_sigmas_type="zero") and
    k-diffusion do, at sigma = 0, where h is infinite and the second-order term inf x 0: the last step
    is first-order for every step count and returns the model's x0_hat (diffusers' `lower_order_final`,
    which acts under 15 steps, changes nothing there for solver_order=2). diffusers' other options
    (solver_type="heun", final_sigmas_type="sigma_min", lambda_min_clipped, thresholding,
    euler_at_final) are not read: this is their defaults.

    Timesteps: "trailing" as `spaced_timesteps`; "leading" as diffusers' DPM-Solver spaces it, not as
    DDIM: k * (T // (steps + 1)) + steps_offset for k = steps..1, the grid of steps + 1 points whose last
    one is the final sigma = 0 (10 steps: 901, 811, ..., 91). `karras` (A1111's "DPM++ 2M
    Karras") takes the sigmas of Karras et al. 2022 ("EDM", eq. 5, rho = 7) from the schedule's
    sigma_max (t = T-1) to sigma_min (t = 0), whatever the spacing, and steps on those sigmas while the
    model is called at the nearest timestep (log-sigma interpolation; A1111's k-diffusion may pass the
    fractional t). The start is unit noise (x_T, diffusers' init_noise_sigma = 1) from `generator`, or
    `noise` (of `shape`). Deterministic. Returns fp32 latents.
    """
    ts, sigmas = _dpm_steps(schedule, steps, karras)
    if schedule.prediction_type == "epsilon" and schedule.alphas_cumprod[ts[0]] == 0:
        raise ValueError("an epsilon model cannot denoise from SNR 0 (x0 = (x - eps) / 0); zero-terminal-SNR "
                         "schedules need v_prediction (Lin et al. 2024 §3.2)"
                         + ("" if karras else " or 'leading' spacing"))
    cond, uncond = _records(cond, uncond)
    x = _start(shape, generator, cond.device, noise)
    x0_prev = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha, alpha_next = 1 / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma_next**2 + 1)
        out = _guided(model_fn, x, t, cond, uncond, guidance_scale)
        x0, _ = _split(out, x, alpha**2, schedule.prediction_type)
        if x0_prev is None or sigma_next == 0:
            d = x0
        else:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            d = x0 + (x0 - x0_prev) / (2 * r)
        q = sigma_next / sigma                      # e^-h; q alpha_next / alpha = sigma_vp_next / sigma_vp
        x = (q * alpha_next / alpha) * x + (alpha_next * (1 - q)) * d       # the last step: x = x0_hat
        x0_prev = x0
    return x


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 ("EDM", eq. 5): `steps` sigmas from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho); rho = 7 (the paper's, and A1111's and diffusers')."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + k / max(steps - 1, 1) * (lo - hi)) ** rho for k in range(steps)]


def _dpm_steps(schedule: NoiseSchedule, steps: int, karras: bool) -> tuple[list[int], list[float]]:
    # (the timesteps the model is called at, their sigmas plus the final 0), as DPMSolverMultistep's
    # set_timesteps with final_sigmas_type="zero".
    T = check_steps(schedule, steps)
    a = schedule.alphas_cumprod.clamp(min=_MIN_ALPHA_CUMPROD)
    table = ((1 - a) / a).sqrt()                                                     # (T,) float64
    if karras:
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps)
        return _sigma_to_timestep(table, torch.tensor(sigmas, dtype=torch.float64)).tolist(), sigmas + [0.0]
    if schedule.timestep_spacing == "leading":
        ts = torch.arange(steps, 0, -1, dtype=torch.int64) * (T // (steps + 1)) + schedule.steps_offset
        if T // (steps + 1) == 0 or ts[0] >= T:
            raise ValueError(f"{steps} 'leading' DPM-Solver steps with steps_offset={schedule.steps_offset} "
                             f"would start at timestep {int(ts[0])}, past the last trained one ({T - 1}), or "
                             "repeat one; use fewer steps")
    else:
        ts = spaced_timesteps(schedule, steps)
    return ts.tolist(), table[ts].tolist() + [0.0]


def _sigma_to_timestep(table: Tensor, sigmas: Tensor) -> Tensor:
    # The (rounded) timestep of each sigma, linear in log sigma between the two trained timesteps around
    # it (diffusers' and k-diffusion's sigma_to_t); the table rises with t.
    log_table, log_sigma = table.log(), sigmas.clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return torch.round(low + w).to(torch.int64)


Sampler = Callable[..., Tensor]
# Our samplers by name (the command line's --sampler, the recipes' sample.sampler, train.generate),
# each called as ddim_sample is; train/infotext.py spells them as A1111 does.
SAMPLERS: dict[str, Sampler] = {
    "ddim": ddim_sample,
    "euler": euler_sample,
    "dpmpp_2m": dpmpp_2m_sample,
    "dpmpp_2m_karras": functools.partial(dpmpp_2m_sample, karras=True),
}


def _records(cond: Conditioning | Tensor, uncond: Conditioning | Tensor | None
             ) -> tuple[Conditioning, Conditioning | None]:
    return as_conditioning(cond), None if uncond is None else as_conditioning(uncond)


def _guided(model_fn: ModelFn, x: Tensor, t: int, cond: Conditioning, uncond: Conditioning | None,
            scale: float) -> Tensor:
    # Classifier-free guidance (Ho & Salimans 2022): out_u + s (out_c - out_u), on the raw prediction
    # (eps or v), as diffusers' pipelines do. One model call on [uncond; cond].
    if len(cond) != len(x):
        raise ValueError(f"cond has batch {len(cond)}, the latents {len(x)}")
    if scale == 1.0:
        return model_fn(x, torch.full((len(x),), t, dtype=torch.int64, device=x.device), cond).float()
    if uncond is None:
        raise ValueError(f"guidance_scale={scale} needs an unconditional context (uncond)")
    if uncond.shapes != cond.shapes:
        raise ValueError(f"uncond {uncond.shapes} and cond {cond.shapes} differ in shape")
    t2 = torch.full((2 * len(x),), t, dtype=torch.int64, device=x.device)
    out_u, out_c = model_fn(torch.cat([x, x]), t2, Conditioning.cat([uncond, cond])).float().chunk(2)
    return out_u + scale * (out_c - out_u)


def _split(out: Tensor, x: Tensor, a_t: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    # (x0_hat, eps_hat) from the model output at x_t = sqrt(a) x0 + sqrt(1 - a) eps.
    sa, sb = math.sqrt(a_t), math.sqrt(1 - a_t)
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    return sa * x - sb * out, sa * out + sb * x          # v = sa eps - sb x0 (Salimans & Ho 2022, §4)


def _start(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           noise: Tensor | None) -> Tensor:
    # The starting unit noise: drawn from the generator, or the caller's own.
    if noise is None:
        return _noise(shape, generator, device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, the sample {tuple(shape)}")
    return noise.to(device, torch.float32)


def _noise(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Drawn on the generator's device and moved, so a CPU generator gives the same image on any device.
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
