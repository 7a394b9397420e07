"""What AUTOMATIC1111 and ComfyUI read from a single-file checkpoint: the test oracle for whole
checkpoints, re-derived from the clients' sources (not from adapterkit's tables).

AUTOMATIC1111 (stable-diffusion-webui): modules/sd_models_config.py guess_model_config_from_state_dict
picks the LDM/SGM yaml from key names (`conditioner.embedders.1.model.ln_final.weight` -> SDXL base,
`cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight` of width 1024 -> SD2, else SD1),
builds that LatentDiffusion/DiffusionEngine module, and modules/sd_models.py load_model_weights calls
`model.load_state_dict(state_dict, strict=False)`: a key is consumed iff it is a parameter/buffer name
of that module, and a module tensor the file lacks keeps its (zero-initialised) value.

ComfyUI: comfy/supported_models_base.py BASE.vae_key_prefix = ["first_stage_model."],
text_encoder_key_prefix = ["cond_stage_model."]; comfy/supported_models.py SD15 / SD20 / SDXL
process_clip_state_dict: SD1 `cond_stage_model.transformer.text_model.*` -> clip_l, SD2
`cond_stage_model.model.*` -> clip_h, SDXL `conditioner.embedders.0.transformer.text_model.*` -> clip_l
and `conditioner.embedders.1.model.*` -> clip_g, the OpenCLIP names through comfy/utils.py
transformers_convert / clip_text_transformers_convert (ln_1, attn.in_proj_* split in three, mlp.c_fc, ...,
`text_projection` transposed); the U-Net under `model.diffusion_model.` by comfy/utils.py
unet_to_diffusers.

The module names both read (and so the keys below):
- U-Net: ComfyUI's unet_to_diffusers numbering (input_blocks n = 1 + (res+1)·stage + i, `.0` resnet /
  `.1` transformer, downsampler `input_blocks.n.0.op`, middle_block.0/1/2, output_blocks with the
  upsampler after the stage's last block at `.1.conv` or `.2.conv`), resnets in_layers/emb_layers/
  out_layers/skip_connection, label_emb.0.0/0.2 for SDXL's added embedding.
- VAE: CompVis ldm/modules/diffusionmodules/model.py Encoder/Decoder (down.i.block.j, downsample on every
  level but the last; up.i.block.j with res+1 blocks, upsample on every level but 0; mid.block_1,
  mid.attn_1 (norm, q, k, v, proj_out: Conv2d 1x1, weights (c, c, 1, 1)), mid.block_2; norm_out, conv_out;
  ResnetBlock norm1/conv1/norm2/conv2 and nin_shortcut where the width changes), quant_conv,
  post_quant_conv (ldm/models/autoencoder.py AutoencoderKL).
- CLIP ViT-L: transformers' CLIPTextModel (LDM's FrozenCLIPEmbedder.transformer): text_model.embeddings.
  {token,position}_embedding, text_model.encoder.layers.i.{self_attn.{q,k,v,out}_proj, layer_norm1,
  mlp.fc1, mlp.fc2, layer_norm2}, text_model.final_layer_norm, and the position_ids buffer.
- OpenCLIP text tower (open_clip model.py CLIP with its visual tower deleted, LDM's FrozenOpenCLIPEmbedder
  / SGM's FrozenOpenCLIPEmbedder2 `.model`): token_embedding, positional_embedding, transformer.resblocks.i.
  {ln_1, attn.in_proj_weight (3w, w), attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final,
  text_projection (w, projection), logit_scale.
"""
from __future__ import annotations

import torch
from safetensors import safe_open

WB = ("weight", "bias")


def unet_keys(cfg) -> set[str]:
    """`model.diffusion_model.*` keys of an adapterkit UNetConfig, by ComfyUI's unet_to_diffusers rule."""
    L, stages = cfg.layers_per_block, cfg.stages
    resnet = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
    block = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    keys: set[str] = set()

    def res(prefix, shortcut):
        for m in resnet + (("skip_connection",) if shortcut else ()):
            keys.update(f"{prefix}.{m}.{p}" for p in WB)

    def transformer(prefix, depth):
        for m in ("norm", "proj_in", "proj_out"):
            keys.update(f"{prefix}.{m}.{p}" for p in WB)
        for t in range(depth):
            for m in block:
                bias = not m.split(".")[-1].startswith("to_") or m.endswith("to_out.0")
                keys.update(f"{prefix}.transformer_blocks.{t}.{m}.{p}" for p in (WB if bias else ("weight",)))

    for top in ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2"):
        keys.update(f"{top}.{p}" for p in WB)
    if cfg.addition_embed == "text_time":
        keys.update(f"label_emb.0.{i}.{p}" for i in (0, 2) for p in WB)
    n, width = 1, stages[0].channels
    for s, stage in enumerate(stages):
        for _ in range(L):
            res(f"input_blocks.{n}.0", shortcut=width != stage.channels)
            width = stage.channels
            if stage.attention:
                transformer(f"input_blocks.{n}.1", stage.depth)
            n += 1
        if s < len(stages) - 1:
            keys.update(f"input_blocks.{n}.0.op.{p}" for p in WB)
            n += 1
    res("middle_block.0", False)
    transformer("middle_block.1", stages[-1].depth)
    res("middle_block.2", False)
    n = 0
    for s, stage in enumerate(reversed(stages)):
        for i in range(L + 1):
            res(f"output_blocks.{n}.0", shortcut=True)       # every decoder resnet takes a concatenated skip
            slot = 1
            if stage.attention:
                transformer(f"output_blocks.{n}.1", stage.depth)
                slot = 2
            if i == L and s < len(stages) - 1:
                keys.update(f"output_blocks.{n}.{slot}.conv.{p}" for p in WB)
            n += 1
    return {"model.diffusion_model." + k for k in keys}


def vae_keys(config: dict) -> dict[str, tuple[int, ...] | None]:
    """`first_stage_model.*` keys of a diffusers AutoencoderKL config -> the shape the LDM module has
    where the rule fixes it (the attention's 1x1 convs), else None."""
    widths, res = list(config["block_out_channels"]), config["layers_per_block"]
    out: dict[str, tuple[int, ...] | None] = {}

    def put(name, shape=None):
        for p in WB:
            out[f"first_stage_model.{name}.{p}"] = shape if p == "weight" else None

    def resnet(prefix, cin, cout):
        for m in ("norm1", "conv1", "norm2", "conv2"):
            put(f"{prefix}.{m}")
        if cin != cout:
            put(f"{prefix}.nin_shortcut")

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c)
        put(f"{side}.mid.attn_1.norm")
        for m in ("q", "k", "v", "proj_out"):
            put(f"{side}.mid.attn_1.{m}", (c, c, 1, 1))
        resnet(f"{side}.mid.block_2", c, c)

    put("encoder.conv_in")
    cin = widths[0]
    for i, c in enumerate(widths):
        for j in range(res):
            resnet(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < len(widths) - 1:
            put(f"encoder.down.{i}.downsample.conv")
    mid("encoder", widths[-1])
    put("encoder.norm_out")
    put("encoder.conv_out")
    put("decoder.conv_in")
    mid("decoder", widths[-1])
    cin = widths[-1]
    for i in reversed(range(len(widths))):
        for j in range(res + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i > 0:
            put(f"decoder.up.{i}.upsample.conv")
    put("decoder.norm_out")
    put("decoder.conv_out")
    put("quant_conv")
    put("post_quant_conv")
    return out


def clip_l_keys(prefix: str, layers: int) -> set[str]:
    """A CLIP ViT-L under `prefix` (SD1 `cond_stage_model.transformer.`, SDXL
    `conditioner.embedders.0.transformer.`)."""
    t = prefix + "text_model."
    keys = {f"{t}embeddings.token_embedding.weight", f"{t}embeddings.position_embedding.weight",
            f"{t}embeddings.position_ids", *(f"{t}final_layer_norm.{p}" for p in WB)}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            keys.update(f"{t}encoder.layers.{i}.{m}.{p}" for p in WB)
    return keys


def openclip_keys(prefix: str, layers: int, width: int, projection: int | None
                  ) -> dict[str, tuple[int, ...] | None]:
    """An OpenCLIP text tower under `prefix` -> the shapes its rules fix (fused in_proj, the projection
    as the (width, projection) matrix of x @ P)."""
    out: dict[str, tuple[int, ...] | None] = {
        f"{prefix}token_embedding.weight": None, f"{prefix}positional_embedding": None,
        f"{prefix}ln_final.weight": None, f"{prefix}ln_final.bias": None, f"{prefix}logit_scale": None,
        f"{prefix}text_projection": (width, projection) if projection else None}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        out[b + "attn.in_proj_weight"] = (3 * width, width)
        out[b + "attn.in_proj_bias"] = (3 * width,)
        for m in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            out.update({f"{b}{m}.{p}": None for p in WB})
    return out


def family_of_keys(keys) -> str:
    """Which yaml A1111's guess_model_config_from_state_dict would pick (the base families only)."""
    keys = set(keys)
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return "sdxl"
    if "conditioner.embedders.0.model.ln_final.weight" in keys:
        return "sdxl-refiner"
    if "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return "sd2"
    return "sd1"


# --- checking a written file against the rules ----------------------------------------------------

def parts_of(base):
    return base.unet, base.vae, [(p.spec, p.model) for p in base.text]


def file_shapes(path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def expected_keys(base) -> tuple[dict, set[str]]:
    """(shape rules, keys the clients need) for a base's parts, from support.checkpoint_"""
    shaped = vae_keys(dict(base.vae.config))
    optional = {"embeddings.position_ids", "logit_scale", "text_projection"}
    for part in base.text:
        cfg = part.model.config
        if part.spec.openclip:
            projection = cfg.projection_dim if hasattr(part.model, "text_projection") else None
            shaped |= openclip_keys(part.spec.ldm_prefix, cfg.num_hidden_layers, cfg.hidden_size, projection)
        else:
            shaped |= dict.fromkeys(clip_l_keys(part.spec.ldm_prefix, cfg.num_hidden_layers))
    shaped |= dict.fromkeys(unet_keys(base.unet.config))
    needed = {k for k in shaped if not any(k.endswith(o) for o in optional)}
    return shaped, needed


def check_rules(path, base, family: str | None) -> None:
    shapes = file_shapes(path)
    shaped, needed = expected_keys(base)
    unconsumed = sorted(set(shapes) - set(shaped))
    assert not unconsumed, f"keys no client reads: {unconsumed[:8]}"
    assert not sorted(needed - set(shapes)), f"keys the clients need: {sorted(needed - set(shapes))[:8]}"
    wrong = {k: (shapes[k], s) for k, s in shaped.items() if s is not None and k in shapes and shapes[k] != s}
    assert not wrong
    if family is not None:
        assert family_of_keys(shapes) == family
    assert sum(k.startswith("first_stage_model.") for k in shapes) == len(vae_keys(dict(base.vae.config)))


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
