"""A complete, tiny StableDiffusionPipeline built offline from random weights (DESIGN.md §8).

`build_tiny_pipeline(dir, unet_cfg)` writes a diffusers pipeline folder whose U-Net has the
architecture of `unet_cfg` (through `UNetConfig.to_diffusers()`), a one-layer CLIP text encoder of
width `unet_cfg.context_dim`, a small VAE and a character-level CLIP tokenizer, and returns its
path. Load it with `StableDiffusionPipeline.from_pretrained(path)` under HF_HUB_OFFLINE=1. It is the
fixture for "loads in diffusers" tests.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json of single characters (+ their </w> word-final forms) and the two specials;
    merges.txt with no merges: every word is spelled out character by character."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges.write_text("#version: 0.2\n")
    return vocab, merges


def build_tiny_pipeline(dir: str | os.PathLike, unet_cfg, seed: int = 0,
                        unet_state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a tiny random StableDiffusionPipeline under `dir`/pipeline and return that path.

    unet_state_dict: weights for the U-Net (diffusers names = ours); default random (seeded).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(dir) / "pipeline"
    torch.manual_seed(seed)
    vocab, merges = _write_tokenizer_files(Path(dir) / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    width = unet_cfg.context_dim              # the text encoder's hidden size is the U-Net's context
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=width))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=unet_cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.to_diffusers().items() if not k.startswith("_")})
    if unet_state_dict is not None:
        unet.load_state_dict(unet_state_dict, strict=True)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_pixel_base(dir: str | os.PathLike, image_size: int = 16, pixel_patch: int = 2,
                     seed: int = 0) -> Path:
    """A tiny random pixel-space base (no VAE) as `train.pretrain.export_pipeline` writes it, under
    `dir`/base: a two-stage U-Net (8, 16 channels) on `image_size` px pictures folded into
    `pixel_patch` x `pixel_patch` patches (latents (3 p^2, image_size / p, ...)), a one-layer
    16-wide text encoder and the pretrain job's character-level tokenizer. Seconds to build and
    milliseconds per U-Net call; fp32 weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterkit.train.jobs.pretrain import export_pipeline, make_tokenizer
    from adapterkit.train.pipeline.base import default_scheduler_config
    from adapterkit.unet import Stage, UNet, UNetConfig

    torch.manual_seed(seed)
    tok = make_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    c = 3 * pixel_patch**2
    unet = UNet(UNetConfig(stages=(Stage(8, False, 2, 1), Stage(16, True, 2, 1)), in_channels=c,
                           out_channels=c, layers_per_block=1, context_dim=16, norm_groups=4,
                           sample_size=image_size // pixel_patch))
    return export_pipeline(Path(dir) / "base", unet, text_encoder, tok, default_scheduler_config("tiny"),
                           dtype=torch.float32, pixel_patch=pixel_patch)


def build_tiny_pipeline_8x_vae(dir: str | os.PathLike) -> Path:
    """`build_tiny_pipeline` of the tiny preset with its 2x VAE replaced by a 4-level (8x) one: the
    ControlNet tests' base (a hint encoder downsamples 8x, like SD's)."""
    from diffusers import AutoencoderKL

    from adapterkit.unet import PRESETS
    path = build_tiny_pipeline(dir, PRESETS["tiny"])
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, sample_size=64).save_pretrained(path / "vae")
    return path


# The reduced SDXL pipeline's text encoders: widths 16 + 48 = SDXL_TINY's 64-wide context (unequal, so
# the order of the concatenation shows), the second projecting to SDXL_TINY's 32-wide pooled vector.
SDXL_TEXT_WIDTHS = (16, 48)


def sdxl_scheduler_config(prediction_type: str = "epsilon", **changes) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler,
    SD's betas, "leading" spacing; the PNDM/DDIM keys it carries included), with `changes`."""
    return {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
            "num_train_timesteps": 1000, "prediction_type": prediction_type, "sample_max_value": 1.0,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False} | changes


def build_tiny_sdxl_pipeline(dir: str | os.PathLike, unet_cfg=None, seed: int = 0,
                             scheduler: dict | None = None, vae_scale: int = 2) -> Path:
    """Save a reduced random StableDiffusionXLPipeline under `dir`/sdxl and return that path.

    U-Net: `unet_cfg` (default support.unets.SDXL_TINY: SDXL's block structure at small widths) with
    random_unet's weights; text encoders: a 2-layer CLIPTextModel (16 wide, quick_gelu) and a 2-layer
    CLIPTextModelWithProjection (48 wide, gelu, projection 32), as SDXL's ViT-L and bigG; tokenizers: the
    character-level one, the second padding with "!" as SDXL's tokenizer_2 does; a 2x VAE with SDXL's
    scaling factor (`vae_scale` 8: a 4-level VAE, SDXL's 8x, for the ControlNet tests: an SDXL
    ControlNet's hint encoder downsamples 8x); `scheduler` (a config dict, default `sdxl_scheduler_config()`).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from support.unets import SDXL_TINY, random_unet

    cfg = unet_cfg or SDXL_TINY
    out = Path(dir) / "sdxl"
    vocab, merges = _write_tokenizer_files(Path(dir) / "tokenizer_src")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    tokenizer_2 = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="!")

    def config(width, act, projection):
        return CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              hidden_act=act, projection_dim=projection, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1)

    levels = {2: 2, 8: 4}[vae_scale]
    w1, w2 = SDXL_TEXT_WIDTHS
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config(w1, "quick_gelu", w1))
    text_encoder_2 = CLIPTextModelWithProjection(config(w2, "gelu", cfg.pooled_dim))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16) if levels == 2 else (8,) * levels, layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=0.13025, force_upcast=True)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    unet.load_state_dict(random_unet(cfg, seed).state_dict(), strict=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler or sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out)
    return out
