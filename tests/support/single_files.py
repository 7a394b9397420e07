"""Single-file (original LDM) checkpoints built from a tiny diffusers pipeline folder."""
import shutil

import torch

from adapterkit.train.pipeline.ldm_names import openclip_tower
from adapterkit.train.pipeline.ldm_names import vae_to_ldm as ldm_vae_names
from adapterkit.unet import read_weights, save_unet
from adapterkit.unet.weights import write_safetensors


def vae_to_ldm(state: dict) -> dict:
    """diffusers AutoencoderKL names -> CompVis `first_stage_model.` names: the writer's own table
    (train/pipeline/ldm_names.py), whose output diffusers' from_single_file reads back exactly
    (tests/train/pipeline/test_checkpoint_file.py)."""
    return {"first_stage_model." + k: v.clone() for k, v in ldm_vae_names(state).items()}


def single_file(pipe_dir, pipe, out, *, vae=True, clip=True, extra=None):
    from adapterkit.unet import load_unet
    save_unet(load_unet(pipe_dir), out.with_name("unet_only.safetensors"), layout="ldm")
    tensors, meta = read_weights(out.with_name("unet_only.safetensors"))
    if vae:
        tensors |= vae_to_ldm(pipe.vae.state_dict())
    if clip:
        prefix = "cond_stage_model.transformer.text_model."
        tensors |= {prefix + k.removeprefix("text_model."): v.clone()
                    for k, v in pipe.text_encoder.state_dict().items()}
        tensors[prefix + "embeddings.position_ids"] = torch.arange(77)[None]   # old files carry it
    tensors |= extra or {}
    write_safetensors(tensors, out, {k: v for k, v in meta.items() if k != "format"})
    return out


def openclip_from_transformers(state: dict) -> dict:
    """transformers CLIPTextModelWithProjection names -> an OpenCLIP text tower's (what SGM checkpoints
    store under conditioner.embedders.1.model.), by the writer's table (ldm_names.openclip_tower), plus a
    `logit_scale` as real files have."""
    state = {k: v.clone() for k, v in state.items() if not k.endswith("position_ids")}
    return {"logit_scale": torch.tensor(4.6052)} | openclip_tower(state)


def sdxl_single_file(pipe_dir, pipe, out, *, te1=True, te2=True, extra=None):
    """An SGM-layout SDXL checkpoint of a StableDiffusionXLPipeline: U-Net (LDM names), VAE
    (first_stage_model.), CLIP ViT-L under conditioner.embedders.0.transformer. (transformers' names)
    and the second encoder under conditioner.embedders.1.model. in OpenCLIP's names."""
    from adapterkit.unet import load_unet
    save_unet(load_unet(pipe_dir / "unet"), out.with_name("unet_only.safetensors"), layout="ldm")
    tensors, meta = read_weights(out.with_name("unet_only.safetensors"))
    tensors |= vae_to_ldm(pipe.vae.state_dict())
    if te1:
        prefix = "conditioner.embedders.0.transformer.text_model."
        tensors |= {prefix + k.removeprefix("text_model."): v.clone()
                    for k, v in pipe.text_encoder.state_dict().items()}
    if te2:
        tensors |= {"conditioner.embedders.1.model." + k: v
                    for k, v in openclip_from_transformers(pipe.text_encoder_2.state_dict()).items()}
    tensors |= extra or {}
    write_safetensors(tensors, out, {k: v for k, v in meta.items() if k != "format"})
    return out


def configs_only(pipe_dir, dest):
    """The pipeline folder without any weights: what config_dir= needs."""
    shutil.copytree(pipe_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest
