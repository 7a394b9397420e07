"""What a base makes of prompts and pictures: text conditioning, VAE posterior moments, latents,
and pictures back from latents.

    cond = encode_text(base, ["a red circle"])          # Conditioning: context (B, 77, D) [, pooled (B, P)]
    moments = encode_moments(base, pixels)                                  # what the latent cache stores
    latents = moments_to_latents(base, moments, generator)                  # what the U-Net sees
    pixels = decode(base, latents)                                          # [-1, 1]

VAE latents: `encode_moments` returns the posterior's (mean, logvar), unscaled, and the cache
stores exactly that. `moments_to_latents` then draws z = mean + exp(logvar / 2) * noise with the
training step's generator and applies (z - shift_factor) * scaling_factor. Why not cache one
sample (kohya) or the mean: a cached sample freezes one posterior draw for every epoch and the mean
drops the posterior noise altogether, so either makes cached training differ from uncached
training. Caching the moments keeps the two bit-identical for the same generator (the cache is a
pure speed-up, and "cached == fresh" is a testable identity) at twice the latent storage, which is
small next to the images.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from adapterkit.train.pipeline.base import BaseModel, TextPart
from adapterkit.unet import Conditioning


def tokenize(base: BaseModel, prompts: list[str], part: TextPart | None = None) -> Tensor:
    """Token ids (B, max_length) for one text encoder (default: the first): padded to max_length with its
    tokenizer's pad token, truncated with a warning, once per caption, that names how many tokens were
    dropped."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    part = part or base.text[0]
    tok, n = part.tokenizer, part.max_length
    lengths = [len(ids) for ids in tok(list(prompts), truncation=False, verbose=False).input_ids]
    for prompt, length in zip(prompts, lengths):
        if length > n and prompt not in base._truncation_warned:
            base._truncation_warned.add(prompt)
            warnings.warn(f"caption truncated: {length - n} of its {length - 2} tokens dropped (the text "
                          f"encoder reads {n - 2} plus start/end): {prompt[:80]!r}", stacklevel=3)
    return tok(list(prompts), padding="max_length", max_length=n, truncation=True,
               return_tensors="pt").input_ids


def encode_prompts(base: BaseModel, prompts: list[str]) -> Tensor:
    """Text embeddings (B, max_length, D): the context of `encode_text`. With one encoder read at its
    last layer (SD1.x) that is its last hidden state after the final layer norm, as
    StableDiffusionPipeline.encode_prompt computes it without clip_skip."""
    return encode_text(base, prompts).context


def encode_text(base: BaseModel, prompts: list[str]) -> Conditioning:
    """The text part of the U-Net's conditioning for `prompts`, from each text encoder as its family row
    says (`TextEncoder.layer`, `.pooled`): the context is the encoders' hidden states concatenated along
    the features, in their order, and `pooled` the projected pooled output of the pooled encoder. For
    SDXL that is StableDiffusionXLPipeline.encode_prompt without clip_skip: hidden_states[-2] of both
    (768 + 1280 = 2048 wide) and text_embeds of the second. Time ids come from each picture's geometry,
    not its caption; they are added where the pictures are (train/jobs/batches.py, generate)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    contexts, pooled = [], None
    for part in base.text:
        ids = tokenize(base, prompts, part)
        te = part.model
        penultimate = part.spec.layer == "penultimate"
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in te.parameters())
        with torch.set_grad_enabled(grad):
            out = te(ids.to(te.device), output_hidden_states=True) if penultimate else te(ids.to(te.device))
        # hidden_states[-2]: the input of the last block, before any final norm (SDXL's "penultimate")
        contexts.append(out.hidden_states[-2] if penultimate else out[0])          # (B, L, D_i)
        if part.spec.pooled:
            pooled = out.text_embeds                                               # (B, projection)
    return Conditioning(torch.cat(contexts, dim=-1) if len(contexts) > 1 else contexts[0], pooled=pooled)


def encode_moments(base: BaseModel, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
    """(mean, logvar) of the VAE posterior for pixels (B, 3, H, W) in [-1, 1]; unscaled, in the
    VAE's dtype, each (B, C, H/f, W/f). Without a VAE: (the pixels folded into channels by
    `pixel_patch`, None)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    f = base.latent_scale
    if pixels.shape[-1] % f or pixels.shape[-2] % f:
        raise ValueError(f"image size {tuple(pixels.shape[-2:])} is not a multiple of the VAE's factor {f}")
    if base.vae is None:
        return F.pixel_unshuffle(pixels, base.pixel_patch), None
    vae = base.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.logvar                      # logvar clamped to [-30, 20] by diffusers


def moments_to_latents(base: BaseModel, moments: tuple[Tensor, Tensor | None],
                       generator: torch.Generator | None = None) -> Tensor:
    """Scaled float32 latents from posterior moments: a sample drawn with `generator`, or the mean
    when it is None. The noise is drawn on the generator's device in float32 and then moved, so one
    seed gives one latent on any device (diffusers' randn_tensor does the same)."""
    mean, logvar = moments
    if logvar is None:
        return mean.float()
    z = mean.float()
    if generator is not None:
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        z = z + torch.exp(0.5 * logvar.float()) * noise.to(mean.device)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    return (z - shift) * base.vae.config.scaling_factor


def encode_images(base: BaseModel, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scaled latents for pixels (B, 3, H, W) in [-1, 1]: `moments_to_latents(encode_moments(...))`."""
    return moments_to_latents(base, encode_moments(base, pixels), generator)


def decode(base: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] (pixel-space models unfold their samples: `BaseModel.pixel_patch`)."""
    if base.vae is None:
        return torch.nn.functional.pixel_shuffle(latents, base.pixel_patch).clamp(-1, 1)
    shift = getattr(base.vae.config, "shift_factor", None) or 0.0
    z = latents / base.vae.config.scaling_factor + shift
    return base.vae.decode(z.to(base.vae.device, base.vae.dtype)).sample.float().clamp(-1, 1)
