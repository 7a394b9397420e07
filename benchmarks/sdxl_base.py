"""An SDXL-sized random pipeline folder for the end-to-end SDXL benchmark (benchmarks/job_e2e.py
--family sdxl): the real SDXL geometry everywhere, random weights, nothing downloaded.

    unet/            our U-Net, PRESETS["sdxl"] (2.57 B parameters), PyTorch's init + N(0, 0.02), fp16
    vae/             diffusers AutoencoderKL with configs/base/sdxl/vae/config.json (SDXL's VAE)
    text_encoder/    CLIPTextModel, configs/base/sdxl/text_encoder/config.json (CLIP ViT-L, 123 M)
    text_encoder_2/  CLIPTextModelWithProjection, configs/base/sdxl/text_encoder_2/config.json (bigG, 695 M)
    tokenizer/, tokenizer_2/  the pretrain job's character-level CLIP tokenizer (77 tokens); the second
                     pads with "!" as SDXL's does (configs/base/sdxl/tokenizer_2/tokenizer_config.json)
    scheduler/       EulerDiscreteScheduler with SDXL 1.0's scheduler_config.json values

`--preset` other than sdxl (CPU smoke): the same folder layout with the U-Net preset given and the
VAE and text encoders shrunk to match it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterkit.unet import PRESETS, UNet, save_unet

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "configs" / "base" / "sdxl"
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((BASE / name / "config.json").read_text()).items()
            if not k.startswith("_")}


def part_configs(preset: str) -> tuple[dict, dict, dict]:
    """(VAE, text encoder, text encoder 2) configs: SDXL's for `sdxl`; shrunk to the preset's context
    (split 1:3 between the encoders) and pooled widths otherwise."""
    vae, te1, te2 = _config("vae"), _config("text_encoder"), _config("text_encoder_2")
    if preset != "sdxl":
        cfg = PRESETS[preset] if preset in PRESETS else preset
        w1 = cfg.context_dim // 4
        vae |= {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8}
        for te, w, proj in ((te1, w1, w1), (te2, cfg.context_dim - w1, cfg.pooled_dim)):
            te |= {"hidden_size": w, "intermediate_size": 2 * w, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "projection_dim": proj}
    return vae, te1, te2


def build_sdxl_pipeline(folder: Path, preset="sdxl", seed: int = 0) -> Path:
    """Write the pipeline folder (loadable by train.pipeline.base.load_base and by diffusers'
    StableDiffusionXLPipeline.from_pretrained) and return it. `preset`: a PRESETS name or a UNetConfig
    with SDXL's added embedding."""
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adapterkit.train.jobs.pretrain import make_tokenizer

    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_unet(unet, folder / "unet", dtype=torch.float16)
    del unet
    vae, te1, te2 = part_configs(preset if isinstance(preset, str) else cfg)
    AutoencoderKL(**vae).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**te1)).half().save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**te2)).half().save_pretrained(folder / "text_encoder_2")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tokenizer.pad_token = "!"
    tokenizer.save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True,
             "image_encoder": [None, None], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
