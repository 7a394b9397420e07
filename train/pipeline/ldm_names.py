"""The names a single-file checkpoint (original LDM / Stability SGM layout, formats.md §2.1) gives a
base's VAE and text encoders, as tables read in both directions: `single_file.py` reads such files into
diffusers/transformers modules, `checkpoint_file.py` writes those modules back out.

Text encoders (prefixes from the family rows, unet/families.py `TextEncoder.ldm_prefix`):
- CLIP ViT-L (SD1.x `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`): the
  file keeps transformers' own names, always under a `text_model.` level (LDM's FrozenCLIPEmbedder held
  a CLIPTextModel; A1111 loads it as such, ComfyUI's SD15.process_clip_state_dict adds the level when a
  file lacks it). transformers 5 dropped that level from CLIPTextModel's state dict, so writing adds it.
- OpenCLIP towers (SD2.x `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`): OpenCLIP's
  names, `_OPENCLIP_TOP` and `_OPENCLIP_BLOCK` below, with q/k/v fused into `attn.in_proj_*` and the
  projection stored as the matrix P of x @ P (the transpose of the Linear weight). The same facts as
  diffusers' convert_open_clip_checkpoint (loaders/single_file_utils.py) and ComfyUI's
  utils.transformers_convert / clip_text_transformers_convert.

VAE (`first_stage_model.`): the CompVis autoencoder's names (ldm/modules/diffusionmodules/model.py:
Encoder/Decoder with `down.i.block.j`, `up.i.block.j` numbered from the lowest resolution, `mid.block_1`,
`mid.attn_1`, `nin_shortcut`, `norm_out`). Its attention's q/k/v/proj_out are 1x1 Conv2d, stored
(c, c, 1, 1); diffusers' are Linear (c, c). Reading goes through diffusers' convert_ldm_vae_checkpoint
(single_file._vae_from_ldm); `vae_to_ldm` is its inverse, and a test checks that the two compose to
the identity.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from adapterkit.unet.families import TextEncoder

# The level of names under a CLIP ViT-L's prefix in a single file.
CLIP_LEVEL = "text_model."

# OpenCLIP text-tower names -> transformers' CLIPTextModel(WithProjection) names.
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# The contrastive loss's temperature: saved with the text tower, no part of it.
OPENCLIP_UNUSED = ("logit_scale",)
_QKV = ("q_proj", "k_proj", "v_proj")


# --- reading: file names -> transformers names -------------------------------------------------------

def openclip_names(state: dict[str, Tensor], width: int) -> tuple[dict[str, Tensor], list[str]]:
    """An OpenCLIP text tower's tensors (names without the file's prefix) in transformers' names, and
    the names that have no place there.

    The fused attention input `attn.in_proj_weight` (3 width, width) / `in_proj_bias` (3 width) is split
    in order into q_proj, k_proj, v_proj; `text_projection` is stored (width, projection), applied as
    x @ P, and becomes the Linear weight P^T; `logit_scale` is not part of the tower and is skipped.
    (diffusers splits by the projection's width, which equals the tower's for every released model.)
    """
    out, unplaced = {}, []
    for name, v in state.items():
        block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
        if name in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[name]] = v
        elif name == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()
        elif name in OPENCLIP_UNUSED:
            continue
        elif block is None:
            unplaced.append(name)
        elif block[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            layer, kind = f"text_model.encoder.layers.{block[1]}.self_attn.", block[2].rsplit("_", 1)[1]
            chunks = v.split(width) if v.shape[0] == 3 * width else (v, v[:0], v[:0])  # wrong shape: reported
            for proj, chunk in zip(_QKV, chunks):
                out[f"{layer}{proj}.{kind}"] = chunk.clone()
        else:
            module, _, param = block[2].rpartition(".")
            if module in _OPENCLIP_BLOCK:
                out[f"text_model.encoder.layers.{block[1]}.{_OPENCLIP_BLOCK[module]}.{param}"] = v
            else:
                unplaced.append(name)
    return out, unplaced


# --- writing: transformers / diffusers names -> file names --------------------------------------------

def text_encoder_to_ldm(state: dict[str, Tensor], te: TextEncoder) -> dict[str, Tensor]:
    """A transformers text encoder's state dict as the single file stores it, under `te.ldm_prefix`.
    Buffers (`position_ids`) are left out: the loaders recompute them."""
    state = {_with_level(k): v for k, v in state.items() if not k.endswith("position_ids")}
    tower = openclip_tower(state) if te.openclip else state
    return {te.ldm_prefix + k: v for k, v in tower.items()}


def openclip_tower(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers names (with the `text_model.` level) -> OpenCLIP's: the inverse of `openclip_names`
    (q/k/v concatenated in that order into `attn.in_proj_*`, the projection transposed)."""
    top = {ours: theirs for theirs, ours in _OPENCLIP_TOP.items()}
    block = {ours: theirs for theirs, ours in _OPENCLIP_BLOCK.items()}
    out, unplaced = {}, []
    for name, v in state.items():
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in top:
            out[top[name]] = v
        elif name == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif layer is not None and layer[2] in (f"self_attn.{p}" for p in _QKV):
            if layer[2] == "self_attn.q_proj":
                stem = f"text_model.encoder.layers.{layer[1]}.self_attn."
                out[f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}"] = \
                    torch.cat([state[f"{stem}{p}.{layer[3]}"] for p in _QKV])
        elif layer is not None and layer[2] in block:
            out[f"transformer.resblocks.{layer[1]}.{block[layer[2]]}.{layer[3]}"] = v
        else:
            unplaced.append(name)
    if unplaced:
        raise ValueError(f"no OpenCLIP name for {len(unplaced)} text-encoder tensors: {unplaced[:5]}")
    return out


def vae_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL's state dict in the CompVis autoencoder's names (without the
    `first_stage_model.` prefix): the inverse of diffusers' convert_ldm_vae_checkpoint."""
    ups = [int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for key, v in state.items():
        name = vae_ldm_key(key, n_up)
        if ".mid.attn_1." in name and v.ndim == 2:
            v = v[:, :, None, None]               # LDM's AttnBlock projections are 1x1 Conv2d
        out[name] = v
    return out


# diffusers AutoencoderKL name patterns -> CompVis names; `{up}` is the decoder level counted from the
# lowest resolution (diffusers counts up_blocks from the highest).
_VAE_RULES = (
    (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", "decoder.up.{up}.block.\\2."),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", "decoder.up.{up}.upsample."),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
)
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_key(key: str, n_up: int) -> str:
    """One diffusers VAE name -> its CompVis name; `n_up`: the decoder's number of up blocks."""
    for pattern, repl in _VAE_RULES:
        m = re.match(pattern, key)
        if m is None:
            continue
        if "{up}" in repl:
            repl = repl.replace("{up}", str(n_up - 1 - int(m[1])))
        key = m.expand(repl) + key[m.end():]
        if ".mid.attn_1." in key:
            head, _, tail = key.partition(".mid.attn_1.")
            module, _, param = tail.rpartition(".")
            key = f"{head}.mid.attn_1.{_VAE_ATTENTION.get(module, module)}.{param}"
        break
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _with_level(key: str) -> str:
    return key if key.startswith(CLIP_LEVEL) or key.startswith("text_projection") else CLIP_LEVEL + key

