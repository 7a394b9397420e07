"""The SDXL U-Net: the preset `sdxl` against diffusers' SDXL base config (parameter count, state-dict
shapes, LDM names through diffusers' own converter), and a reduced SDXL geometry (same block structure,
small widths) against diffusers' UNet2DConditionModel on the same random weights: output, added
embedding, encoder clone, gradient checkpointing, conditioning checks, diffusers folders and LDM single
files. Offline: every model is built here."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterkit.adapters.controlnet import ControlNet
from adapterkit.unet import (
    FAMILIES,
    PRESETS,
    CheckpointError,
    Conditioning,
    UNet,
    UNetConfig,
    family_of,
    infer_unet_config,
    ldm_key_map,
    load_unet,
    save_unet,
)
from adapterkit.unet.ldm_keys import LDM_PREFIX
from support.unets import SDXL_TINY

TOL = 1e-5

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the values diffusers writes there).
SDXL_BASE = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# SDXL's block structure at 1/10 width: no attention in stage 0, transformer depths 2 and 3 below (the
# mid block takes the last), head width 16, pooled text 32 + 6 ids x 8 sinusoidal features = 80.
REDUCED_DIFFUSERS = SDXL_BASE | {
    "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 64, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "sample_size": 16,
}
REDUCED = SDXL_TINY


def diffusers_unet(config: dict, seed: int = 0) -> UNet2DConditionModel:
    """diffusers' U-Net with every parameter perturbed (a norm at 1/0 would hide a swap)."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def pair(seed: int = 0) -> tuple[UNet, UNet2DConditionModel]:
    theirs = diffusers_unet(REDUCED_DIFFUSERS, seed)
    ours = UNet(REDUCED)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs


def inputs(batch=2, h=16, w=16, seed=1):
    """sample, timesteps, and the conditioning: context, pooled text and real-looking size/crop ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([3, 871])[:batch]
    ids = torch.tensor([[1024., 768., 0., 16., 1024., 1024.], [512., 640., 32., 0., 768., 832.]])[:batch]
    cond = Conditioning(torch.randn(batch, 7, 64, generator=g), pooled=torch.randn(batch, 32, generator=g),
                        time_ids=ids)
    return x, t, cond


def added(cond: Conditioning) -> dict:
    return {"text_embeds": cond.pooled, "time_ids": cond.time_ids}


# --- the preset: the real SDXL base -------------------------------------------------------------------

def test_sdxl_preset_has_the_real_parameter_count_and_diffusers_shapes():
    with torch.device("meta"):
        ours = UNet(PRESETS["sdxl"]).state_dict()
        theirs = UNet2DConditionModel(**SDXL_BASE).state_dict()
    assert sum(v.numel() for v in ours.values()) == 2_567_463_684
    assert ours.keys() == theirs.keys()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["add_embedding.linear_1.weight"].shape == (1280, 2816)


def test_sdxl_preset_is_diffusers_sdxl_config_both_ways():
    assert UNetConfig.from_diffusers(SDXL_BASE) == PRESETS["sdxl"]
    written = PRESETS["sdxl"].to_diffusers()
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "attention_head_dim", "transformer_layers_per_block", "block_out_channels",
                "down_block_types", "up_block_types", "cross_attention_dim", "use_linear_projection",
                "flip_sin_to_cos", "freq_shift", "sample_size"):
        assert written[key] == SDXL_BASE[key], key
    assert UNetConfig.from_dict(json.loads(json.dumps(PRESETS["sdxl"].to_dict()))) == PRESETS["sdxl"]


def test_sdxl_ldm_names_are_what_diffusers_converts_and_infer_the_preset():
    with torch.device("meta"):
        state = UNet(PRESETS["sdxl"]).state_dict()
        theirs = UNet2DConditionModel(**SDXL_BASE).state_dict()
    key_map = ldm_key_map(PRESETS["sdxl"])
    ldm = {LDM_PREFIX + key_map[k]: v for k, v in state.items()}
    # Names of the released single file (SGM's openaimodel numbering, 3 stages, depth-10 transformers).
    for name, shape in {"label_emb.0.0.weight": (1280, 2816), "label_emb.0.2.weight": (1280, 1280),
                        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
                        "input_blocks.4.1.proj_in.weight": (640, 640),
                        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                        "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                        "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1)}.items():
        assert tuple(ldm[LDM_PREFIX + name].shape) == shape, name
    # Stage 0 has no attention: its layers hold a ResNet alone.
    assert not any(".input_blocks.1.1." in k or ".output_blocks.6.1." in k for k in ldm)
    converted = convert_ldm_unet_checkpoint(ldm, SDXL_BASE)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(converted[k] is state[k] for k in state)       # each LDM name carries the right tensor
    assert infer_unet_config(ldm) == PRESETS["sdxl"]
    assert infer_unet_config(state) == PRESETS["sdxl"]


def test_family_table_recognises_sdxl_by_its_added_embedding():
    sdxl = FAMILIES["sdxl"]
    assert family_of(PRESETS["sdxl"]) is sdxl
    assert sdxl.unet_preset == "sdxl" and sdxl.loads
    assert (PRESETS["sdxl"].pooled_dim, PRESETS["sdxl"].time_ids) == (sdxl.pooled_dim, sdxl.time_ids)
    assert family_of(PRESETS["sdxl"].replace(addition_embed=None)).name == "tiny"
    assert family_of(PRESETS["sd21"].replace(addition_embed="text_time")).name == "tiny"
    assert [family_of(PRESETS[n]).name for n in ("sd15", "sd21", "tiny")] == ["sd1", "sd2", "tiny"]


# --- the reduced geometry against diffusers ---------------------------------------------------------

def test_reduced_config_reads_from_diffusers_and_shapes_match():
    assert UNetConfig.from_diffusers(REDUCED_DIFFUSERS) == REDUCED
    assert UNetConfig.from_diffusers(REDUCED.to_diffusers()) == REDUCED
    ours, theirs = UNet(REDUCED).state_dict(), UNet2DConditionModel(**REDUCED_DIFFUSERS).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("size", [(16, 16), (13, 22)])
def test_forward_matches_diffusers(size):
    ours, theirs = pair()
    x, t, cond = inputs(h=size[0], w=size[1])
    with torch.no_grad():
        expected = theirs(x, t, cond.context, added_cond_kwargs=added(cond)).sample
        got = ours(x, t, cond)
        other_ids = ours(x, t, Conditioning(cond.context, cond.pooled, cond.time_ids + 64))
        other_pooled = ours(x, t, Conditioning(cond.context, -cond.pooled, cond.time_ids))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    # Both added inputs are used: changing either moves the prediction well beyond the tolerance.
    assert (other_ids - got).abs().max().item() > 100 * TOL
    assert (other_pooled - got).abs().max().item() > 100 * TOL


def test_added_embedding_matches_diffusers():
    ours, theirs = pair()
    x, t, cond = inputs()
    with torch.no_grad():
        emb = theirs.time_embedding(theirs.get_time_embed(sample=x, timestep=t))
        aug = theirs.get_aug_embed(emb=emb, encoder_hidden_states=cond.context, added_cond_kwargs=added(cond))
        expected = torch.nn.functional.silu(emb + aug)
        got = ours.encode(x, t, cond).emb
        sinusoids = theirs.add_time_proj(cond.time_ids.flatten()).reshape(2, -1)
        features = ours._text_time(cond, torch.float32)
    assert (got - expected).abs().max().item() <= TOL
    assert torch.allclose(features, torch.cat([cond.pooled, sinusoids], dim=-1), atol=1e-6)


def test_gradients_wrt_inputs_match_diffusers():
    ours, theirs = pair()
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    x, t, cond = inputs()
    grads = []
    for run in (lambda x, c: theirs(x, t, c.context, added_cond_kwargs=added(c)).sample,
                lambda x, c: ours(x, t, c)):
        xi = x.clone().requires_grad_()
        ci = Conditioning(cond.context.clone().requires_grad_(), cond.pooled.clone().requires_grad_(),
                          cond.time_ids)
        (run(xi, ci) ** 2).mean().backward()
        grads.append((xi.grad, ci.context.grad, ci.pooled.grad))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


def test_encoder_clone_has_the_added_embedding_and_reproduces_features():
    model, _ = pair()
    clone = model.clone_encoder()
    x, t, cond = inputs()
    assert set(clone.state_dict()) == {k for k in model.state_dict()
                                       if not k.startswith(("up_blocks", "conv_norm_out", "conv_out"))}
    assert clone.add_embedding is not model.add_embedding
    with torch.no_grad():
        a, b = model.encode(x, t, cond), clone(x, t, cond)
        assert all(torch.equal(s, r) for s, r in zip(a.skips, b.skips))
        assert torch.equal(a.mid, b.mid) and torch.equal(a.emb, b.emb)
        clone.add_embedding.linear_2.bias.add_(1.0)
        assert torch.equal(model.encode(x, t, cond).emb, a.emb)     # the copy shares nothing
        assert not torch.equal(clone(x, t, cond).emb, a.emb)        # and its added embedding is used


def test_controlnet_copies_the_added_embedding():
    model, _ = pair()
    cn = ControlNet.from_unet(model)
    for k, v in model.add_embedding.state_dict().items():
        assert torch.equal(cn.add_embedding.state_dict()[k], v)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(cn.encode(x, t, cond).emb, model.encode(x, t, cond).emb)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _ = pair()
    model.train().requires_grad_(False)
    trainable = [model.add_embedding.linear_1.weight, model.down_blocks[2].attentions[0].transformer_blocks[2]
                 .attn2.to_k.weight, model.mid_block.attentions[0].transformer_blocks[2].ff.net[2].weight,
                 model.up_blocks[0].resnets[2].conv1.weight]
    for p in trainable:
        p.requires_grad_(True)
    x, t, cond = inputs()

    def grads(enabled: bool):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        model(x, t, cond).pow(2).mean().backward()
        return [p.grad.clone() for p in trainable]

    for a, b in zip(grads(False), grads(True)):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


# --- the conditioning contract ----------------------------------------------------------------------

def test_text_time_unet_requires_pooled_and_time_ids():
    model = UNet(REDUCED)
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"needs pooled \(2, 32\).*time_ids \(2, 6\).*lacks pooled and time"):
        model(x, t, cond.context)
    with pytest.raises(ValueError, match="lacks time_ids"):
        model(x, t, Conditioning(cond.context, pooled=cond.pooled))
    with pytest.raises(ValueError, match="lacks pooled"):
        model.clone_encoder()(x, t, Conditioning(cond.context, time_ids=cond.time_ids))
    with pytest.raises(ValueError, match=r"pooled must be \(2, 32\).*got \(2, 31\)"):
        model(x, t, Conditioning(cond.context, cond.pooled[:, :31], cond.time_ids))
    with pytest.raises(ValueError, match=r"time_ids must be \(2, 6\).*got \(2, 5\)"):
        model(x, t, Conditioning(cond.context, cond.pooled, cond.time_ids[:, :5]))


def test_unet_without_added_embedding_refuses_pooled_and_time_ids():
    model = UNet(PRESETS["tiny"])
    x, t, cond = inputs()
    ctx = cond.context
    with pytest.raises(ValueError, match="no added embedding.*carries pooled and time_ids"):
        model(x, t, Conditioning(ctx, cond.pooled, cond.time_ids))
    with pytest.raises(ValueError, match="carries time_ids"):
        model.encode(x, t, Conditioning(ctx, time_ids=cond.time_ids))
    assert model(x, t, Conditioning(ctx)).shape == x.shape


@pytest.mark.parametrize("change, message", [
    ({"projection_class_embeddings_input_dim": None}, "projection_class_embeddings_input_dim=None"),
    ({"projection_class_embeddings_input_dim": 48}, "larger than 6 ids"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ({"time_embedding_act_fn": "silu"}, "time_embedding_act_fn"),
])
def test_unsupported_added_embeddings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(REDUCED_DIFFUSERS | change)


def test_invalid_text_time_configs_are_refused():
    with pytest.raises(ValueError, match="addition_embed must be one of"):
        REDUCED.replace(addition_embed="text")
    with pytest.raises(ValueError, match="even addition_time_embed_dim"):
        REDUCED.replace(addition_time_embed_dim=7)


# --- files ------------------------------------------------------------------------------------------

def test_ldm_single_file_round_trip_and_diffusers_conversion(tmp_path):
    ours, theirs = pair()
    path = save_unet(ours, tmp_path / "sdxl.safetensors", layout="ldm")
    checkpoint = load_file(path)
    assert LDM_PREFIX + "label_emb.0.0.weight" in checkpoint
    assert LDM_PREFIX + "input_blocks.8.1.transformer_blocks.2.attn1.to_q.weight" in checkpoint
    converted = convert_ldm_unet_checkpoint(checkpoint, REDUCED_DIFFUSERS)
    assert converted.keys() == theirs.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in theirs.state_dict().items())
    loaded = load_unet(path)
    assert loaded.config == REDUCED
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), ours(x, t, cond))


def test_ldm_single_file_without_metadata_needs_the_config(tmp_path):
    ours, _ = pair()
    path = save_unet(ours, tmp_path / "sdxl.safetensors", layout="ldm")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)             # as other tools write it: no adapterkit config
    # 80 inputs cannot be SDXL's split (6 ids x 256 features + pooled): inference says so.
    with pytest.raises(CheckpointError, match="add_embedding takes 80 inputs.*pass config="):
        load_unet(bare)
    loaded = load_unet(bare, config=REDUCED)
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, cond), ours(x, t, cond))
    with pytest.raises(CheckpointError, match=r"label_emb.0.0.weight: expected \[128, 2816\], "
                                              r"found \[128, 80\]"):
        load_unet(bare, config=REDUCED.replace(pooled_dim=2816 - 48))


def test_inference_reads_the_added_embedding_and_configs_must_agree_with_it(tmp_path):
    # With SDXL's 256 features per id the split rule applies, so the added embedding is inferred.
    cfg = REDUCED.replace(addition_time_embed_dim=256)
    model = UNet(cfg)
    inferred = infer_unet_config(model.state_dict())
    got = (inferred.addition_embed, inferred.pooled_dim, inferred.time_ids, inferred.addition_time_embed_dim)
    assert got == ("text_time", 32, 6, 256)
    assert infer_unet_config(UNet(REDUCED.replace(addition_embed=None)).state_dict()).addition_embed is None
    path = save_unet(model, tmp_path / "unet.safetensors", layout="ldm")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)
    with pytest.raises(CheckpointError, match="added embedding input: config 1576, weights 1568"):
        load_unet(bare, config=cfg.replace(pooled_dim=40))
    with pytest.raises(CheckpointError, match="added embedding input: config None, weights 1568"):
        load_unet(bare, config=cfg.replace(addition_embed=None))


def test_diffusers_folders_both_ways(tmp_path):
    ours, theirs = pair()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_unet(tmp_path / "theirs")
    assert loaded.config == REDUCED
    save_unet(ours, tmp_path / "ours")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert back.config.addition_embed_type == "text_time"
    weights = tmp_path / "ours" / "diffusion_pytorch_model.safetensors"
    assert safe_open(weights, "pt").metadata() == {"format": "pt"}
    x, t, cond = inputs()
    with torch.no_grad():
        expected = theirs(x, t, cond.context, added_cond_kwargs=added(cond)).sample
        assert torch.equal(loaded(x, t, cond), ours(x, t, cond))
        assert (back(x, t, cond.context, added_cond_kwargs=added(cond)).sample - expected).abs().max() <= TOL
