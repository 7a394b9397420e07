"""Single-file (original LDM) checkpoints built from a tiny diffusers pipeline folder."""
import re
import shutil

import torch

from adapterkit.unet import read_weights, save_unet
from adapterkit.unet.weights import write_safetensors


def vae_to_ldm(state: dict) -> dict:
    """diffusers AutoencoderKL names -> CompVis `first_stage_model.` names (see the module docstring)."""
    n_up = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in state.items():
        k2 = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k2)
        k2 = k2.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0." in k2:
            k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                k2 = k2.replace(f".{new}.", f".{old}.")
            if v.ndim == 2:
                v = v[:, :, None, None]              # LDM's attention projections are 1x1 convs
        out["first_stage_model." + k2] = v.clone()
    return out


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
    store under conditioner.embedders.1.model.): q/k/v fused into attn.in_proj_*, the projection
    transposed, the rest renamed (ln_1, attn.out_proj, mlp.c_fc, ...); a `logit_scale` as real files have."""
    renames = (("text_model.encoder.layers.", "transformer.resblocks."), (".layer_norm1.", ".ln_1."),
               (".layer_norm2.", ".ln_2."), (".self_attn.out_proj.", ".attn.out_proj."),
               (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {"logit_scale": torch.tensor(4.6052)}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[top[k]] = v.clone()
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif ".self_attn.q_proj." in k:
            kind = k.rsplit(".", 1)[1]
            stem = k.split(".self_attn.")[0]
            fused = torch.cat([state[f"{stem}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            block = stem.replace("text_model.encoder.layers.", "transformer.resblocks.")
            out[f"{block}.attn.in_proj_{kind}"] = fused
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        else:
            for old, new in renames:
                k = k.replace(old, new)
            out[k] = v.clone()
    return out


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
