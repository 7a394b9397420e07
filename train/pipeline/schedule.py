"""The noise schedule of SD-style models (read from a diffusers `scheduler_config.json`) and the loss.

    schedule = NoiseSchedule.from_config(json.loads(Path(".../scheduler/scheduler_config.json").read_text()))
    t = schedule.sample_timesteps(len(x0), generator, device=x0.device)   # sampling=TimestepSampling(..)
    noise = offset_noise(x0.shape, 0.05, generator, device=x0.device)
    model_out = unet(schedule.add_noise(x0, noise, t), t, context)
    loss = diffusion_loss(model_out, x0, noise, t, schedule, min_snr_gamma=5.0)   # debiased=True: 1/sqrt(SNR)

Notation (Ho et al. 2020, "DDPM"): betas b_t for t = 0..T-1, a_t = prod_{s<=t} (1 - b_s) (`alphas_cumprod`),
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, SNR(t) = a_t / (1 - a_t) (Kingma et al. 2021, "Variational Diffusion
Models"). The model predicts eps ("epsilon": SD1.x, SD2.x-base) or v = sqrt(a_t) eps - sqrt(1 - a_t) x0
("v_prediction": Salimans & Ho 2022, "Progressive Distillation", §4; SD2.x-768).

The a_t table is built in float64 (diffusers builds it in float32; the two agree to ~1e-7) and rounded to
the caller's dtype only where it is used. The sampler options (`timestep_spacing`, `steps_offset`,
`clip_sample`, `set_alpha_to_one`) travel here because the same file carries them; train/pipeline/sampling.py
reads them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
DEBIASED_SNR_CAP = 1000.0     # kohya sd-scripts library/custom_train_functions.py apply_debiased_estimation
# The mode-weighted density is a density only while f_mode is monotone: -1 <= s <= 2 / (pi - 2).
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))


@dataclass(frozen=True)
class TimestepSampling:
    """Which training timesteps t in [min_timestep, max_timestep) a batch draws (max None: T).

    uniform       t ~ U{min, ..., max-1}, today's draw (`torch.randint`, as diffusers' and kohya's
                  scripts; kohya's `--min_timestep/--max_timestep` mean the same half-open range).
    logit_normal  u = sigmoid(m + s n), n ~ N(0, 1): the density pi_ln(u; m, s) = 1 / (s sqrt(2 pi))
                  1 / (u (1 - u)) exp(-(logit(u) - m)^2 / (2 s^2)) of Esser et al. 2024 ("Scaling
                  Rectified Flow Transformers", SD3, eq. 19), which puts the middle timesteps first.
    mode          u = f_mode(v; s) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1) (ibid. eq. 20):
                  s > 0 favours the middle, s < 0 the ends, s = 0 is uniform.
    The continuous u in [0, 1) is mapped to the discrete DDPM timesteps as diffusers' SD3 scripts do
    (train_dreambooth_lora_sd3.py: `indices = (u * num_train_timesteps).long()`), inside the range:
    t = min + floor(u (max - min)). Larger t is noisier in both the paper's convention and DDPM's.
    """
    kind: Literal["uniform", "logit_normal", "mode"] = "uniform"
    min_timestep: int = 0
    max_timestep: int | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29             # diffusers' compute_density_for_timestep_sampling default

    def __post_init__(self):
        _check_choice("timestep_sampling", self.kind, TIMESTEP_SAMPLINGS)
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        low, high = MODE_SCALE_RANGE
        if not low <= self.mode_scale <= high:
            raise ValueError(f"mode_scale must be in [{low:g}, {high:.4f}] (where f_mode is monotone), "
                             f"got {self.mode_scale}")

    def bounds(self, num_train_timesteps: int) -> tuple[int, int]:
        """The half-open range [low, high) of timesteps, checked against the schedule's T."""
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not 0 <= self.min_timestep < high <= num_train_timesteps:
            raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps} (the "
                             f"schedule's num_train_timesteps), got min_timestep={self.min_timestep}, "
                             f"max_timestep={self.max_timestep}")
        return self.min_timestep, high

    def draw(self, batch: int, num_train_timesteps: int, generator: torch.Generator | None,
             device: torch.device | str) -> Tensor:
        """`batch` int64 timesteps on `device` (the generator's)."""
        low, high = self.bounds(num_train_timesteps)
        if self.kind == "uniform":
            return torch.randint(low, high, (batch,), generator=generator, device=device)
        if self.kind == "logit_normal":
            n = torch.randn((batch,), generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * n)
        else:
            v = torch.rand((batch,), generator=generator, device=device, dtype=torch.float64)
            u = 1 - v - self.mode_scale * (torch.cos(math.pi / 2 * v) ** 2 - 1 + v)
        t = low + torch.floor(u * (high - low)).long()
        return t.clamp_(low, high - 1)        # u rounds to 1.0 in float64 for n > ~37


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM forward process plus the sampler options of its config file. Defaults are SD1.5."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    rescale_betas_zero_snr: bool = False
    # Read by the samplers only:
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"   # linspace: read, not sampled
    steps_offset: int = 1
    clip_sample: bool = False           # DDIM: clamp the predicted x0 (pixel-space models; never SD latents)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False      # DDIM: the last step lands on a=1 (True) or on a_0 (False, SD)
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)  # (T,) float64, CPU

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES,
                      " ('sample', x0-prediction, is not supported)")
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, "
                             f"beta_end={self.beta_end}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        object.__setattr__(self, "alphas_cumprod", _alphas_cumprod(self))
        object.__setattr__(self, "_tables", {})        # (name, dtype, device) -> table there (`_table`)

    # -- the diffusers file ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """From a diffusers scheduler config (any scheduler class: DDIM, PNDM, Euler, DPM-Solver, ...).

        A missing key takes diffusers' DDIMScheduler default, not ours, so a file means the same in both
        libraries (an empty config is the linear 1e-4..0.02 DDPM schedule, not SD's). Values that change
        the trained process and that we cannot honour are refused (`trained_betas`, continuous EDM
        timesteps, x0-prediction, unknown beta schedules); options of diffusers' other samplers
        (`use_karras_sigmas`, `solver_order`, `thresholding`, ...) do not change training and are ignored.
        """
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler config: explicit trained_betas are not supported; "
                             "use beta_schedule/beta_start/beta_end")
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"scheduler config: timestep_type={config['timestep_type']!r} (continuous "
                             "EDM-style timesteps) is not supported; only discrete DDPM timesteps are")
        values = {k: config.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        """The diffusers scheduler config that `from_config` (and any diffusers scheduler) reads back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # -- training ----------------------------------------------------------------------------------

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with `t` (B,) integer timesteps; x0's dtype."""
        a = self._at("sqrt_a", t, x0)
        s = self._at("sqrt_1ma", t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output: eps itself, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._at("sqrt_a", t, x0)
        s = self._at("sqrt_1ma", t, x0)
        return a * noise - s * x0

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = a_t / (1 - a_t), float32, shape of `t`; 0 at the end of a zero-terminal-SNR schedule."""
        return self._table("snr", torch.float32, t.device)[t]

    def min_snr_weights(self, t: Tensor, gamma: float) -> Tensor:
        """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556), float32.

        The paper weights the x0-loss by min(SNR, gamma) (gamma=5 recommended). An eps-loss already
        carries a factor SNR and a v-loss a factor SNR + 1 relative to the x0-loss (||v - v'||^2 =
        (SNR + 1) ||x0 - x0'||^2), so the weights on our losses are min(SNR, gamma) / SNR (eps) and
        min(SNR, gamma) / (SNR + 1) (v), as in the authors' code (`min_snr_`/`vmin_snr_` in
        TiankaiHang/Min-SNR-Diffusion-Training guided_diffusion/gaussian_diffusion.py, and diffusers'
        examples/text_to_image/train_text_to_image.py `--snr_gamma`).
        At SNR = 0 (the last step of a zero-terminal-SNR schedule) the weight is 1, as in the authors'
        code: for eps that is the limit of min(gamma/SNR, 1); for v it keeps the one step that rescale
        exists to teach (predict x0 from pure noise) from getting weight 0.
        """
        if gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
        snr = self.snr(t)
        if self.prediction_type == "epsilon":
            w = torch.clamp(gamma / snr, max=1.0)                # = min(SNR, gamma) / SNR, finite at SNR=0
        else:
            w = torch.clamp(snr, max=gamma) / (snr + 1)
        return torch.where(snr == 0, torch.ones_like(w), w)

    def debiased_weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights of debiased estimation (Yu et al. 2024, "Unmasking Bias in Diffusion
        Model Training", arXiv:2310.08442), float32: the eps-loss weighted by 1/sqrt(SNR), as kohya
        sd-scripts' `--debiased_estimation_loss` (library/custom_train_functions.py,
        apply_debiased_estimation, with SNR capped at 1000 there: SD's t=0 has SNR ~1170).

        In x0 terms that is sqrt(SNR) ||x0 - x0'||^2 (the eps-loss is SNR times the x0-loss). A v-loss is
        (SNR + 1) times the x0-loss, so the same objective weights it by sqrt(SNR) / (SNR + 1). (kohya's
        newer code weights v by 1 / (SNR + 1), which is the plain x0-loss, not this objective.) At SNR = 0
        (the last step of a zero-terminal-SNR schedule) the weight is 1, as min_snr_weights does: the
        eps weight is infinite there and the v weight 0.
        """
        snr = self.snr(t)
        capped = snr.clamp(max=DEBIASED_SNR_CAP)
        if self.prediction_type == "epsilon":
            w = 1 / capped.sqrt()
        else:
            w = capped.sqrt() / (snr + 1)
        return torch.where(snr == 0, torch.ones_like(w), w)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None,
                         sampling: TimestepSampling | None = None) -> Tensor:
        """`batch` timesteps (int64) as `sampling` says (None: uniform in 0..T-1), drawn on the
        generator's device, then moved."""
        gen_device = generator.device if generator is not None else "cpu"
        t = (sampling or TimestepSampling()).draw(batch, self.num_train_timesteps, generator, gen_device)
        return t.to(device) if device is not None else t

    def _table(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Table `name` (sqrt_a: sqrt(a_t), sqrt_1ma: sqrt(1 - a_t), snr: a_t / (1 - a_t)) from the float64
        a_t, rounded once to `dtype` and then moved to `device` (rounding first keeps float64 off devices
        without it: MPS). Kept per (name, dtype, device): a training step then gathers from a table
        already on the GPU instead of copying one there, which synchronises with the GPU every call
        (train.pipeline.transfer). Made with a blocking copy, so any stream may read it at once."""
        key = (name, dtype, torch.device(device))
        table = self._tables.get(key)
        if table is None:
            a = self.alphas_cumprod
            full = {"sqrt_a": a.sqrt, "sqrt_1ma": lambda: (1 - a).sqrt(), "snr": lambda: a / (1 - a)}[name]()
            table = self._tables[key] = full.to(dtype=dtype).to(device)
        return table

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        # Gather table `name` at `t`, in `like`'s dtype; shape (B, 1, 1, ...) to broadcast.
        if t.ndim != 1 or len(t) != len(like):
            raise ValueError(f"timesteps must have shape ({len(like)},), got {tuple(t.shape)}")
        vals = self._table(name, like.dtype, like.device)[t.to(like.device)]
        return vals.reshape(-1, *([1] * (like.ndim - 1)))


# A key missing from a diffusers file means diffusers' DDIMScheduler default (diffusers 0.42).
_DIFFUSERS_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=0,
    clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
)


def offset_noise(shape: Sequence[int], strength: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise plus `strength` x one Gaussian constant per (sample, channel).

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise", crosslabs.org): plain noise never
    moves an image's mean, so a model trained on it cannot make very dark or bright images; a shared
    per-channel offset teaches it to. The draws (noise, then offsets of shape (B, C, 1, 1)) are in
    diffusers' `--noise_offset` order. strength=0 draws only the plain noise. Drawn on the generator's
    device, then moved to `device`.
    """
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    if strength:
        noise = noise + strength * torch.randn((shape[0], shape[1], *[1] * (len(shape) - 2)),
                                               generator=generator, device=gen_device, dtype=dtype)
    return noise.to(device) if device is not None else noise


def diffusion_loss(model_out: Tensor, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule,
                   min_snr_gamma: float | None = None, debiased: bool = False,
                   weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of each sample's MSE to `schedule.target`, optionally Min-SNR weighted and/or
    debiased (`NoiseSchedule.debiased_weights`; both: the product, as kohya's scripts apply both); fp32.
    `weights` (B,): each sample's own factor (regularisation pictures' prior_loss_weight), applied
    before the mean over the batch, as kohya's `loss * loss_weights` is.

    The MSE is computed in float32 whatever the model's dtype (a bf16/fp16 square loses the small
    errors that late training is about).
    """
    if model_out.shape != x0.shape:
        raise ValueError(f"model output {tuple(model_out.shape)} does not match the latents "
                         f"{tuple(x0.shape)}")
    target = schedule.target(x0.float(), noise.float(), t)
    per_sample = F.mse_loss(model_out.float(), target, reduction="none").flatten(1).mean(1)   # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * schedule.min_snr_weights(t, min_snr_gamma).to(per_sample.device)
    if debiased:
        per_sample = per_sample * schedule.debiased_weights(t).to(per_sample.device)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()


def _alphas_cumprod(s: NoiseSchedule) -> Tensor:
    T = s.num_train_timesteps
    if s.beta_schedule == "linear":
        betas = torch.linspace(s.beta_start, s.beta_end, T, dtype=torch.float64)
    elif s.beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta) (Rombach et al. 2022, LDM configs).
        betas = torch.linspace(math.sqrt(s.beta_start), math.sqrt(s.beta_end), T, dtype=torch.float64) ** 2
    else:
        # Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), offset s=0.008, betas capped
        # at 0.999 to keep the end finite.
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    if s.rescale_betas_zero_snr:
        alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


def _rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv:2305.08891),
    # Algorithm 1: shift sqrt(a_t) so the last step is exactly 0 (SNR 0: pure noise, as at sampling time)
    # and scale it so the first step keeps its value. The paper then recovers betas and multiplies them
    # out again; we keep the product directly (the same values up to float64 rounding).
    r = alphas_cumprod.sqrt()
    first, last = r[0].item(), r[-1].item()
    r = (r - last) * (first / (first - last))
    return r**2


def _check_choice(name: str, value: Any, choices: Sequence[str], note: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}{note}")


# The released models' schedules, by train/pipeline/base.py's family names (configs/schedulers/<name>.json
# holds the same, checked by tests/test_schedule.py); also the CLI's list of choices.
PRESETS: dict[str, NoiseSchedule] = {
    "sd1": NoiseSchedule(),                                    # SD1.x (runwayml SD1.5 scheduler_config)
    "sd2": NoiseSchedule(),                                    # SD2.x 512-base, epsilon
    "sd2-v": NoiseSchedule(prediction_type="v_prediction"),    # SD2.x 768-v (stabilityai SD2.1)
    "tiny": NoiseSchedule(),                                   # the bundled tiny model: SD1's schedule
}
