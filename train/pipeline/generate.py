"""Batched generation from a base model: the one sampling path of `adapterkit sample`, the quality
report (train.quality.evaluate), the training jobs' sample grids (LoRA, ControlNet, pretrain) and,
later, the demo.

    samples = generate(base, ["a red circle on a blue background", ...], seeds=[0, 1, ...],
                       steps=30, guidance=3.0)                        # (N, 3, H, W) in [-1, 1], CPU
    images = to_images(samples)                                       # list of PIL RGB images
    samples = generate(base, prompts, seeds, steps=30, guidance=3.0,
                       controlnet=cn, hints=edge_maps)                # (3, H, W) in [0, 1] or PIL, each

Seeds. Image i starts from unit noise drawn from a CPU `torch.Generator` seeded with `seeds[i]`,
shape (1, C, h, w): what `ddim_sample(..., generator=torch.Generator().manual_seed(seeds[i]))` draws
for one image. The picture of a (prompt, seed) pair is therefore the same whatever the batch size,
its place in the batch and the device (up to the float rounding of batched kernels; tested to 1e-5),
and the same noise under every adapter setting, so rows that differ only in a LoRA or a ControlNet
compare like with like. The DDIM sampler is deterministic (eta = 0), Euler has no churn, DPM++ 2M
solves the ODE: the start is the only randomness.

Batches. `batch_size` prompts at a time; with guidance != 1 every U-Net call sees 2 x batch_size
rows, unconditional first (train.sampling's layout), and the ControlNet's hints are tiled to match.

Conditioning. The prompts' text (`encode_text`); for SDXL also the pooled text and the size/crop ids of
a generated picture (`generated_time_ids`: original = target = the picture's size, crop (0, 0)), and
guidance's unconditional half is all zeros where the base's pipeline says so (`unconditional`), so
that `generate` gives StableDiffusionXLPipeline's picture for the same seed, scheduler and conditioning.

Adapters. LoRAs are the caller's business: load them (`train.pipeline.loras.load_lora_on_base`: a
file's text-encoder part goes onto the text encoders, so `encode_text` carries it) and set their
weights (`set_base_lora_weights`) before calling. A ControlNet and one hint per prompt steer the
U-Net through the sampler's `model_fn`: `unet(x, t, ctx, *controlnet(x, t, ctx, hint, scale))`, each
module in its own dtype; `control_scale` 0 is the plain U-Net, exactly. Hints are pixel-size
pictures: the ControlNet's hint encoder must shrink them by the base's `latent_scale`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from adapterkit.adapters.controlnet import MultiControlNet, hint_widths_for
from adapterkit.train.console import bar as console_bar
from adapterkit.train.images import tensor_to_pil
from adapterkit.train.pipeline.encoding import decode, encode_text
from adapterkit.train.pipeline.graphed import GraphedCall
from adapterkit.train.pipeline.loras import set_base_lora_weights
from adapterkit.train.pipeline.sampling import SAMPLERS
from adapterkit.train.pipeline.schedule import NoiseSchedule
from adapterkit.unet import Conditioning


@torch.no_grad()
def generate(base, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
             guidance: float, sampler: str = "ddim", size: int | tuple[int, int] | None = None,
             controlnet: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
             hints: Sequence | Tensor | None = None, control_scale: float | Sequence[float] = 1.0,
             guess_mode: bool = False, batch_size: int = 16, progress: bool | tqdm = False,
             cuda_graphs: bool = True) -> Tensor:
    """One image per (prompt, seed), as a float32 CPU tensor (N, 3, H, W) in [-1, 1].

    base: a `train.base.BaseModel`; its U-Net runs in its own dtype (cast it beforehand, e.g. bf16).
    sampler: a name of `train.pipeline.sampling.SAMPLERS`: ddim, euler, dpmpp_2m, dpmpp_2m_karras.
    size: the image side in pixels (H = W), or (H, W), multiples of `base.latent_scale`; default the
        U-Net's native size (`sample_size` x `latent_scale`).
    controlnet, hints: a ControlNet for this base and one hint per prompt ((3, H, W) float tensors
        in [0, 1], an (N, 3, H, W) tensor, or PIL images of that size). Several ControlNets (a list):
        `hints` holds one such per-prompt sequence per ControlNet and `control_scale` one scale per
        ControlNet (or one for all); their residuals are summed (`adapters.controlnet.MultiControlNet`).
    guess_mode: the ControlNet's residuals grow from 0.1x at the first skip to 1x at the mid block, and
        under guidance it steers the conditional half only (diffusers' guess mode: the hint alone
        carries the picture, as with an empty prompt).
    progress: a tqdm bar on stderr counting the images as they are decoded, with the time left (the
        command line's and the training samples'; off by default, so library calls and tests print
        nothing; off under `adapterkit -q`, train/console.py), or a bar of the caller's to count them
        on (several calls, one bar: the quality runs).
    cuda_graphs: on CUDA, replay the sampler's model call (U-Net, and ControlNet) from a CUDA graph
        captured at its first call per batch shape (train/pipeline/graphed.py: at batch 2 a U-Net
        call is launch-bound); the settings above and the LoRA weights are fixed for the call, the
        latents, timesteps, conditioning and hints are the graph's inputs. Off CUDA: the plain call.
    Raises ValueError for mismatched lengths, sizes or an unknown sampler, before any sampling.
    """

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(seeds) != len(prompts) or not prompts:
        raise ValueError(f"need one seed per prompt (and at least one prompt): {len(prompts)} prompts, "
                         f"{len(seeds)} seeds")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    f = base.latent_scale
    size = size or base.unet.config.sample_size * f
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    for side in {height, width}:
        if side % f:
            raise ValueError(f"size {side} px is not a multiple of the base's latent scale {f} (pixels per "
                             f"latent pixel); use {side // f * f} or {(side // f + 1) * f}")
    if isinstance(controlnet, (list, tuple)):
        controlnet, control_scale, hint_batch = _several(base, controlnet, hints, control_scale,
                                                         len(prompts), (height, width))
    else:
        hint_batch = _hints(base, controlnet, hints, len(prompts), (height, width))

    unet = base.unet
    dtype, device = unet.conv_in.weight.dtype, unet.conv_in.weight.device
    schedule = NoiseSchedule.from_config(base.scheduler_config)
    sample = SAMPLERS[sampler]
    uncond = unconditional(base, (height, width)).to(device, dtype) if guidance != 1.0 else None
    cn_was_training = controlnet.training if controlnet is not None else False
    if controlnet is not None:
        controlnet.eval()
    # One graphed model call for the whole run: its settings are fixed; the hints are inputs.
    call = lambda x, t, c, h: _model_fn(unet, controlnet, h, control_scale, guess_mode)(x, t, c)  # noqa: E731
    graphed = GraphedCall(call, enabled=cuda_graphs)
    out = []
    own_bar = not hasattr(progress, "update")
    bar = console_bar(total=len(prompts), desc="sampling", leave=None, show=bool(progress)) if own_bar \
        else progress
    try:
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
            shape = (len(chunk), base.latent_channels, height // f, width // f)
            cond = prompt_conditioning(base, chunk, (height, width)).to(device, dtype)
            rows = slice(i, i + batch_size)
            hint = _each(hint_batch, lambda h, rows=rows: h[rows].to(device))
            model_fn = lambda x, t, c, hint=hint: graphed(x, t, c, hint)      # noqa: E731
            latents = sample(model_fn, schedule, shape, steps, cond=cond,
                             uncond=None if uncond is None else uncond.repeat(len(chunk)),
                             guidance_scale=guidance, noise=start_noise(chunk_seeds, shape[1:]))
            # one picture at a time: the VAE decoder's activations at 1024 px are GBs per picture
            for z in latents:
                out.append(decode(base, z[None]).float().cpu())                   # (1, 3, H, W)
                bar.update(1)
    finally:
        if own_bar:
            bar.close()
        if controlnet is not None:
            controlnet.train(cn_was_training)
    return torch.cat(out)


def prompt_conditioning(base, prompts: Sequence[str], size: tuple[int, int]) -> Conditioning:
    """What the U-Net is conditioned on for pictures of `size` (H, W) px of `prompts`: their text
    (`encode_text`) and, for a U-Net with size/crop ids (SDXL), the ids of a generated picture."""
    return _with_ids(base, encode_text(base, list(prompts)), size)


def unconditional(base, size: tuple[int, int]) -> Conditioning:
    """Guidance's unconditional conditioning (batch 1): the empty prompt's, or all zeros where the base
    says so (`BaseModel.empty_prompt_zeros`: diffusers' force_zeros_for_empty_prompt, on for SDXL), with
    the same size/crop ids as the conditional rows (diffusers' negative_add_time_ids default)."""
    empty = encode_text(base, [""])
    return _with_ids(base, empty.map(torch.zeros_like) if base.empty_prompt_zeros else empty, size)


def generated_time_ids(size: tuple[int, int], n: int = 1) -> Tensor:
    """SDXL's size/crop ids of a generated picture of `size` (H, W): original size = target size = its
    size, crop top-left (0, 0): StableDiffusionXLPipeline._get_add_time_ids with the pipeline's defaults
    (original_size and target_size (height, width), crops_coords_top_left (0, 0)). (n, 6) int64: exact
    whatever the U-Net's dtype (the U-Net embeds them in fp32)."""
    h, w = size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.int64).repeat(n, 1)


def _with_ids(base, cond: Conditioning, size: tuple[int, int]) -> Conditioning:
    if not base.time_ids:
        return cond
    if base.time_ids != 6:
        raise ValueError(f"the U-Net takes {base.time_ids} size/crop ids per picture; generation knows "
                         "SDXL's 6 (original size, crop top-left, target size)")
    return dataclasses.replace(cond, time_ids=generated_time_ids(size, len(cond)).to(cond.device))


def generate_columns(base, rows: Sequence[tuple[str, int]], columns: Sequence[dict[str, float]],
                     **kwargs) -> list[Tensor]:
    """The cells of a grid, row by row: rows are (prompt, seed), columns LoRA weight settings
    ({adapter name: weight}, set with `train.pipeline.loras.set_base_lora_weights` before the column is
    generated, on the U-Net and the text encoders alike; {} leaves them as they are). Every cell of a
    row starts from the same noise. The weights of the last column stay set. `kwargs` go to `generate`.
    The U-Net's LoRAs are folded into its weights for each column (adapters.lora.folded_loras: the
    plain U-Net's speed, the weights restored exactly after)."""
    from adapterkit.adapters.lora import folded_loras

    prompts, seeds = [p for p, _ in rows], [s for _, s in rows]
    samples = []                                                   # one (rows, 3, H, W) per column
    for weights in columns:
        if weights:
            set_base_lora_weights(base, weights)
        with folded_loras(base.unet):
            samples.append(generate(base, prompts, seeds, **kwargs))
    return [column[r] for r in range(len(rows)) for column in samples]


def start_noise(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """(len(seeds), *shape) float32 unit noise, row i from a CPU generator seeded with seeds[i]."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds])


def to_images(samples: Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] (what `generate` returns) -> N PIL RGB images."""
    return [tensor_to_pil(x) for x in samples]


def check_controlnet(base, controlnet: torch.nn.Module) -> None:
    """Raise ValueError unless the ControlNet's hint encoder shrinks pixel-size hints to the base's
    latent size (its strides = `base.latent_scale`: 8 for SD's VAE)."""
    g, f = controlnet.controlnet_cond_embedding.downscale, base.latent_scale
    if g != f:
        raise ValueError(f"the base's latents are {f}x smaller than its pictures but the ControlNet's hint "
                         f"encoder downsamples {g}x, so pixel-size hints cannot line up with the latents. "
                         f"Use a ControlNet made for this base (hint widths "
                         f"{list(hint_widths_for(f)) if f in (1, 2, 4, 8) else '?'}).")


def _hints(base, controlnet, hints, n: int, size: tuple[int, int]) -> Tensor | None:
    """The hints as one (n, 3, H, W) float32 tensor in [0, 1] (None without a ControlNet)."""
    if controlnet is None:
        if hints is not None:
            raise ValueError("hints were given without a ControlNet to read them")
        return None
    if hints is None:
        raise ValueError("a ControlNet needs hints: one (3, H, W) picture in [0, 1] per prompt")
    check_controlnet(base, controlnet)
    batch = hints if isinstance(hints, Tensor) else torch.stack([_hint_tensor(h) for h in hints])
    if batch.ndim != 4 or len(batch) != n or tuple(batch.shape[1:]) != (3, *size):
        raise ValueError(f"need one hint per prompt, each (3, {size[0]}, {size[1]}) at the image size: "
                         f"{n} prompts, hints {tuple(batch.shape)}")
    if not batch.is_floating_point() or batch.min() < 0 or batch.max() > 1:
        raise ValueError("hints must be float pictures in [0, 1] (uint8 / 255)")
    return batch.float()


def _several(base, controlnets, hints, scales, n: int, size: tuple[int, int]):
    """(MultiControlNet, one scale per ControlNet, one hint batch per ControlNet) for `generate`."""
    nets = list(controlnets)
    scales = [float(scales)] * len(nets) if isinstance(scales, (int, float)) else [float(s) for s in scales]
    if hints is None or isinstance(hints, Tensor) or len(hints) != len(nets) or len(scales) != len(nets):
        raise ValueError(f"{len(nets)} ControlNets need {len(nets)} hint sequences (one per ControlNet, each "
                         f"one hint per prompt) and {len(nets)} scales (or one)")
    return MultiControlNet(nets), scales, [_hints(base, cn, h, n, size) for cn, h in zip(nets, hints)]


def _each(hints, fn):
    """`fn` on a hint batch, or on each of several ControlNets' hint batches (a list); None stays."""
    if hints is None:
        return None
    return [fn(h) for h in hints] if isinstance(hints, list) else fn(hints)


def _hint_tensor(h) -> Tensor:
    if isinstance(h, Image.Image):
        from adapterkit.train.images import unit_tensor
        return unit_tensor(h)
    if not isinstance(h, Tensor):
        raise TypeError(f"a hint must be a (3, H, W) tensor or a PIL image, not {type(h).__name__}")
    return h


def controlled_prediction(unet: torch.nn.Module, controlnet: torch.nn.Module | None, x: Tensor, t: Tensor,
                          cond: Conditioning | Tensor, hint: Tensor | None, scale: float,
                          guess_mode: bool = False) -> Tensor:
    """The U-Net's prediction steered by the ControlNet's residuals (training and sampling). Each
    runs in its own dtype (an fp32 ControlNet beside a bf16 U-Net); no ControlNet or scale 0 is the
    plain U-Net, exactly."""
    dtype = unet.conv_in.weight.dtype
    if controlnet is None or scale == 0:
        return unet(x.to(dtype), t, cond.to(dtype))
    cn_dtype = next(controlnet.parameters()).dtype
    down, mid = controlnet(x.to(cn_dtype), t, cond.to(cn_dtype), hint, scale, guess_mode)
    return unet(x.to(dtype), t, cond.to(dtype), tuple(d.to(dtype) for d in down), mid.to(dtype))


def _model_fn(unet, controlnet, hint: Tensor | None, scale: float, guess_mode: bool = False):
    """The sampler's model_fn: the U-Net, steered by the ControlNet when there is one."""
    def model_fn(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        rows = None if hint is None else len(hint[0] if isinstance(hint, list) else hint)
        if guess_mode and controlnet is not None and scale != 0 and len(x) == 2 * rows:
            # Guidance's [uncond; cond] batch in guess mode: the ControlNet sees the conditional half
            # only and the unconditional half gets no residuals (what diffusers' pipelines do).
            n, dtype = rows, unet.conv_in.weight.dtype
            cn_dtype = next(controlnet.parameters()).dtype
            down, mid = controlnet(x[n:].to(cn_dtype), t[n:], c[n:].to(cn_dtype), hint, scale, True)
            pad = lambda r: torch.cat([torch.zeros_like(r), r]).to(dtype)       # noqa: E731
            return unet(x.to(dtype), t, c.to(dtype), tuple(pad(d) for d in down), pad(mid)).float()
        h = _each(hint, lambda b: b if len(b) == len(x) else b.repeat(len(x) // len(b), 1, 1, 1))
        return controlled_prediction(unet, controlnet, x, t, c, h, scale, guess_mode).float()  # CFG: [h; h]

    return model_fn
