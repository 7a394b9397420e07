"""SDXL LoRA files (issue 15, item 4): the kohya SDXL layout (LDM block names, lora_te1_/lora_te2_) as
the default, the diffusers/peft layout (unet. / text_encoder. / text_encoder_2.), the layouts found in
the wild, inspect / convert / merge / extract / resize, and wrong-family refusals.

Oracles: diffusers' own SDXL LoRA loader (StableDiffusionXLPipeline.lora_state_dict, which runs its
kohya conversion `_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`, then
load_lora_into_unet / load_lora_into_text_encoder through peft) on a reduced SDXL geometry
(support.unets.SDXL_TINY: SDXL's block structure at small widths) with two tiny transformers text
encoders; diffusers' own writers (save_lora_weights, convert_state_dict_to_kohya); and key names of real
kohya SDXL files, written here as facts. Offline: every model is built here.
"""
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import adapterkit.train.cli.main as cli
from adapterkit.adapters.lora import (
    Lora,
    LoraModule,
    LoraSpec,
    add_lora,
    fit,
    load_lora,
    lora_from_model,
    lora_layers,
)
from adapterkit.adapters.lora_files import (
    base_fingerprint,
    base_metadata,
    convert_lora,
    delta_error,
    load_lora_file,
    read_lora,
    summarize,
    write_lora,
)
from adapterkit.adapters.lora_keys import (
    is_text_path,
    kohya_text_stem,
    kohya_unet_stems,
    layer_paths,
    parse_kohya_text,
    text_layer_paths,
    text_path,
)
from adapterkit.adapters.merge import extract_lora, merge_loras, resize_lora, unmerge
from adapterkit.unet import PRESETS, Conditioning, UNet, family_named, load_unet, save_unet
from adapterkit.unet.families import family_like, family_of_modelspec
from support.unets import SDXL_TINY, random_unet

CFG = SDXL_TINY
TOL = 1e-5
SDXL = family_named("sdxl")
SPEC = LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3)


# --- builders ----------------------------------------------------------------------------------------

def text_encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Two tiny CLIP text encoders as an SDXL pipeline holds them (32 + 32 = the U-Net's 64-d context,
    the second with a 32-d projection = the pooled width)."""
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            projection_dim=32, vocab_size=100, max_position_embeddings=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    return {"text_encoder": CLIPTextModel(config).eval(),
            "text_encoder_2": CLIPTextModelWithProjection(config).eval()}


def trained(seed: int = 1, spec: LoraSpec = SPEC, text: bool = True, odd_alphas: bool = False) -> Lora:
    """A LoRA as after training: `spec` on SDXL_TINY with non-zero lora_up, plus (text) rank-4 modules on
    every attention and MLP projection of both text encoders (kohya's CLIPAttention/CLIPMLP targets);
    odd_alphas: every fifth module gets another alpha (diffusers' P2 case)."""
    unet = random_unet(CFG)
    add_lora(unet, spec, "style")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            w = layer.lora_B["style"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    lora = lora_from_model(unet, "style")
    if text:
        for folder, encoder in text_encoders().items():
            for path, layer in text_layer_paths(folder, encoder).items():
                if not path.endswith("text_projection"):
                    out, inp = layer.weight.shape
                    lora.modules[path] = LoraModule(torch.randn(4, inp, generator=g) * 0.1,
                                                    torch.randn(out, 4, generator=g) * 0.1, 2.0)
    if odd_alphas:
        for i, path in enumerate(sorted(lora.modules)):
            if i % 5 == 0:
                m = lora.modules[path]
                lora.modules[path] = LoraModule(m.down, m.up, 3 * m.alpha)
    lora.metadata = base_metadata(CFG, base_fingerprint(unet)) | {"modelspec.title": "test"}
    return lora


def theirs_unet(seed: int = 0) -> UNet2DConditionModel:
    """diffusers' U-Net with the weights of random_unet(CFG, seed)."""
    model = UNet2DConditionModel(**{k: v for k, v in CFG.to_diffusers().items() if not k.startswith("_")})
    model.load_state_dict(random_unet(CFG, seed).state_dict(), strict=True)
    return model.eval()


def diffusers_load(path, unet: UNet2DConditionModel, encoders: dict) -> None:
    """diffusers' SDXL loader (what StableDiffusionXLPipeline.load_lora_weights runs), pipeline-less."""
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(path), unet_config=unet.config, return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
    for folder, encoder in encoders.items():
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=encoder,
                                                              prefix=folder, metadata=metadata)


def unet_out(model):
    g = torch.Generator().manual_seed(7)
    x, ctx, pooled = (torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 64, generator=g),
                      torch.randn(2, 32, generator=g))
    ids = torch.tensor([[1024., 768., 0., 16., 1024., 1024.], [512., 640., 32., 0., 768., 832.]])
    with torch.no_grad():
        if isinstance(model, UNet):
            return model(x, torch.tensor([3, 871]), Conditioning(ctx, pooled=pooled, time_ids=ids))
        return model(x, torch.tensor([3, 871]), ctx, added_cond_kwargs={"text_embeds": pooled,
                                                                         "time_ids": ids}).sample


def text_out(encoders: dict) -> list[torch.Tensor]:
    """What SDXL conditions on: both encoders' penultimate hidden states and the projected pooled output."""
    ids = torch.randint(2, 100, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        one = encoders["text_encoder"](ids, output_hidden_states=True)
        two = encoders["text_encoder_2"](ids, output_hidden_states=True)
    return [one.hidden_states[-2], two.hidden_states[-2], two.text_embeds]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|. (ΔW stays small in these tests: saturated attention amplifies fp32 rounding.)"""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def merged(lora: Lora):
    """Our merge: random_unet(CFG) and fresh text encoders with `lora` merged in (fp32)."""
    unet, encoders = random_unet(CFG), text_encoders()
    merge_loras(unet, [(lora, 1.0)], text_encoders=encoders)
    return unet, encoders


def attached(model, folder: str | None = None) -> set[str]:
    """The layers diffusers/peft attached an adapter to, by canonical path (`folder`: a text encoder's)."""
    names = set(lora_layers(model))
    return names if folder is None else {text_path(folder, n) for n in names}


def keys_of(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def header(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --- names: what kohya's SDXL files are called -------------------------------------------------------

# Module names of real kohya SDXL LoRAs (sd-scripts networks/lora.py create_modules over
# library/sdxl_original_unet.py's LDM-named SdxlUNet2DConditionModel, whose ResnetBlock2D holds
# in_layers/emb_layers/out_layers/skip_connection, Downsample2D `op`, Upsample2D `conv`; prefixes
# LORA_PREFIX_TEXT_ENCODER1/2 = lora_te1/lora_te2 over transformers' CLIP; shared/research/formats.md §3.2).
REAL_SDXL_NAMES = [
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_output_blocks_5_1_proj_out",
]
REAL_SDXL_CONV_NAMES = [            # kohya conv_dim ("LoCon"), also LyCORIS' names for these convs
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_1_0_out_layers_3",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_6_0_op",
    "lora_unet_middle_block_2_in_layers_2",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_8_0_skip_connection",
]
REAL_TEXT_NAMES = [
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_11_mlp_fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
    "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    "lora_te2_text_model_encoder_layers_31_mlp_fc1",
]


def _targets(cfg, targets: str) -> list[str]:
    with torch.device("meta"):
        model = UNet(cfg)
    add_lora(model, LoraSpec(rank=1, alpha=1, targets=targets))
    return sorted(lora_layers(model))


def test_kohya_names_of_the_sdxl_unet_are_those_of_real_sdxl_loras():
    attn_ff = kohya_unet_stems(_targets(PRESETS["sdxl"], "attn-ff"), PRESETS["sdxl"])
    full = kohya_unet_stems(_targets(PRESETS["sdxl"], "full"), PRESETS["sdxl"])
    # kohya's module counts on SDXL: 722 by default, 788 with conv_dim (formats.md §3.2, from its
    # naming code on meta models; sd-scripts logs "create LoRA for U-Net: 722 modules",
    # bmaltais/kohya_ss#1103).
    assert (len(attn_ff), len(full)) == (722, 788)
    assert set(REAL_SDXL_NAMES) <= set(attn_ff.values())
    assert set(REAL_SDXL_CONV_NAMES) <= set(full.values()) - set(attn_ff.values())
    ldm = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
    assert all(n.startswith(ldm) for n in full.values())
    assert full["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == REAL_SDXL_NAMES[1]
    assert full["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
    # The reduced geometry has SDXL's numbering, so its files carry the same names.
    assert set(kohya_unet_stems(_targets(CFG, "full"), CFG).values()) <= set(full.values())
    # SD1.x keeps kohya's diffusers-style names.
    sd1 = kohya_unet_stems(_targets(PRESETS["sd15"], "attn-ff"), PRESETS["sd15"])
    assert len(sd1) == 192
    assert sd1["down_blocks.0.attentions.0.proj_in"] == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_kohya_names_of_the_sdxl_text_encoders_are_lora_te1_and_lora_te2():
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12)
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, projection_dim=1280)
    with torch.device("meta"):
        encoders = {"text_encoder": CLIPTextModel(clip_l),
                    "text_encoder_2": CLIPTextModelWithProjection(big_g)}
    names = {}
    for folder, encoder in encoders.items():
        for path in text_layer_paths(folder, encoder):
            if not path.endswith("text_projection"):          # kohya targets CLIPAttention and CLIPMLP
                names[path] = kohya_text_stem(path, SDXL)
    # 72 + 192 modules, as sd-scripts reports for CLIP-L and bigG (kohya-ss/sd-scripts#2236: "Text
    # Encoder 1: 72 modules", "Text Encoder 2: 192 modules"; bmaltais/kohya_ss#1103: 264 in all).
    assert sum(n.startswith("lora_te1_") for n in names.values()) == 72
    assert sum(n.startswith("lora_te2_") for n in names.values()) == 192
    assert set(REAL_TEXT_NAMES) <= set(names.values())
    assert all(parse_kohya_text(n) == p for p, n in names.items())
    # transformers >= 5 builds CLIPTextModel flat; the canonical path keeps `text_model.` as files do.
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in names
    # SD1.x spells its one encoder lora_te_; SDXL's second encoder has no SD1.x name.
    sd1 = family_named("sd1")
    assert kohya_text_stem("text_encoder.text_model.encoder.layers.0.mlp.fc1", sd1) == \
        "lora_te_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(ValueError, match="SD1.x pipelines have no text_encoder_2"):
        kohya_text_stem("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", sd1)


def test_the_family_table_decides_the_naming_and_the_metadata():
    assert family_like(PRESETS["sdxl"]) is SDXL and family_like(CFG) is SDXL       # by layout
    assert SDXL.kohya_unet_naming == "ldm" and family_like(PRESETS["sd15"]).kohya_unet_naming == "diffusers"
    assert family_of_modelspec("stable-diffusion-xl-v1-base/lora") is SDXL
    assert family_of_modelspec("stable-diffusion-v2-768-v/lora").name == "sd2"
    md = base_metadata(PRESETS["sdxl"])
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.resolution"] == "1024x1024"


# --- our kohya file in diffusers ------------------------------------------------------------------------

def test_our_kohya_sdxl_file_moves_diffusers_unet_and_text_encoders_as_our_merge_does(tmp_path):
    lora = trained(odd_alphas=True)
    path = tmp_path / "sdxl.safetensors"
    report = write_lora(path, lora)                                            # kohya is the default
    keys = keys_of(path)
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)
    assert "folded into lora_up" in report["notes"][0]                          # P2, see lora_files

    theirs, their_encoders = theirs_unet(), text_encoders()
    before = unet_out(theirs), text_out(their_encoders)
    diffusers_load(path, theirs, their_encoders)             # raises if its conversion leaves a key over
    ours, our_encoders = merged(read_lora(path))
    # Every module was attached where we merged it.
    assert attached(theirs) == {p for p in lora.modules if not is_text_path(p)}
    assert attached(their_encoders["text_encoder"], "text_encoder") | attached(
        their_encoders["text_encoder_2"], "text_encoder_2") == {p for p in lora.modules if is_text_path(p)}
    # ... and moves the U-Net and both text encoders exactly as our merge does.
    assert rel(unet_out(theirs), before[0]) > 100 * TOL
    assert rel(unet_out(ours), unet_out(theirs)) < TOL
    for got, want, old in zip(text_out(our_encoders), text_out(their_encoders), before[1], strict=True):
        assert rel(want, old) > 100 * TOL and rel(got, want) < TOL


# --- the diffusers / peft layout ----------------------------------------------------------------------

def test_our_diffusers_layout_is_what_diffusers_reads_with_its_metadata(tmp_path):
    lora = trained(odd_alphas=True)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(path, lora, "diffusers")
    tensors, md = header(path)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in tensors
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora_A.weight" in tensors
    assert all("lora" in k for k in tensors) and md["format"] == "pt"
    assert {"unet.r", "text_encoder.r", "text_encoder_2.r"} <= set(json.loads(md["lora_adapter_metadata"]))
    theirs, their_encoders = theirs_unet(), text_encoders()
    diffusers_load(path, theirs, their_encoders)
    ours, our_encoders = merged(read_lora(path))
    assert rel(unet_out(ours), unet_out(theirs)) < TOL
    for got, want in zip(text_out(our_encoders), text_out(their_encoders), strict=True):
        assert rel(got, want) < TOL


def test_a_file_diffusers_saves_for_sdxl_reads_and_round_trips(tmp_path):
    theirs, encoders = theirs_unet(), text_encoders()
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                      "conv1", "proj_in"]),
               "text_encoder": LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"]),
               "text_encoder_2": LoraConfig(r=3, lora_alpha=6, target_modules=["k_proj", "out_proj", "fc2"])}
    models = {"unet": theirs} | encoders
    g = torch.Generator().manual_seed(3)
    for name, model in models.items():       # (transformers' add_adapter wants a newer peft; same layers)
        inject_adapter_in_model(configs[name], model, adapter_name="theirs")
        with torch.no_grad():
            for layer in lora_layers(model).values():
                w = layer.lora_B["theirs"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    expected = unet_out(theirs), text_out(encoders)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, **{f"{n}_lora_layers": get_peft_model_state_dict(m, adapter_name="theirs")
                     for n, m in models.items()},
        **{f"{n}_lora_adapter_metadata": configs[n].to_dict() for n in models})
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "peft" and not lora.unplaced
    assert {m.scale for p, m in lora.modules.items() if p.startswith("text_encoder_2.")} == {2.0}
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in lora.modules     # flat CLIP read
    ours, our_encoders = merged(lora)
    assert rel(unet_out(ours), expected[0]) < TOL
    for got, want in zip(text_out(our_encoders), expected[1], strict=True):
        assert rel(got, want) < TOL
    write_lora(tmp_path / "again.safetensors", lora, "peft")
    assert delta_error(lora, read_lora(tmp_path / "again.safetensors")) == 0


def test_convert_kohya_to_peft_and_back_is_lossless(tmp_path):
    lora = trained()
    first, middle, back = (tmp_path / f"{n}.safetensors" for n in ("kohya", "peft", "back"))
    write_lora(first, lora)
    assert convert_lora(first, middle, "peft")["max_rel_error"] == 0
    assert convert_lora(middle, back, "kohya")["max_rel_error"] == 0
    (a, md_a), (b, md_b) = header(first), header(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("ss_base_model_version", "adapterkit.base_config", "modelspec.architecture"):
        assert md_a[k] == md_b[k], k


# --- layouts found in the wild, auto-detected ---------------------------------------------------------

def _kohya_tensors(lora: Lora, names: dict[str, str], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """As sd-scripts saves: every tensor in the save dtype, 0-dim alphas."""
    out = {}
    for path, m in lora.modules.items():
        k = names[path]
        out |= {f"{k}.lora_down.weight": m.down.to(dtype), f"{k}.lora_up.weight": m.up.to(dtype),
                f"{k}.alpha": torch.tensor(m.alpha).to(dtype)}
    return out


def _kohya_names(lora: Lora) -> dict[str, str]:
    unet = kohya_unet_stems([p for p in lora.modules if not is_text_path(p)], PRESETS["sdxl"])
    return unet | {p: kohya_text_stem(p, SDXL) for p in lora.modules if is_text_path(p)}


def wild_sd_scripts(lora):
    return _kohya_tensors(lora, _kohya_names(lora)), {
        "ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_dim": "4"}


def wild_lycoris_locon(lora):
    return _kohya_tensors(lora, _kohya_names(lora), torch.bfloat16), {
        "ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon", "conv_dim": "2"}',
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}


def wild_no_metadata(lora):       # the bigG text-encoder names alone say SDXL
    return _kohya_tensors(lora, _kohya_names(lora), torch.float32), {}


def wild_diffusers_kohya(lora):
    """diffusers' own convert_state_dict_to_kohya output: diffusers-style U-Net names, lora_te1/te2."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    peft = {}
    for path, m in lora.modules.items():
        key = path if is_text_path(path) else f"unet.{path}"
        peft |= {f"{key}.lora_A.weight": m.down, f"{key}.lora_B.weight": m.up}
    return {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft).items()}, {}


def wild_diffusers_0_20(lora):
    """diffusers <= 0.20 SDXL DreamBooth LoRAs: attention-processor and lora_linear_layer spellings."""
    out = {}
    for path, m in lora.modules.items():
        if is_text_path(path):
            key = f"{path}.lora_linear_layer"
        elif path.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            block, name = path.removesuffix(".0").rsplit(".", 1)
            key = f"unet.{block}.processor.{name}_lora"
        else:
            key = f"unet.{path}.lora"
        out |= {f"{key}.down.weight": m.down, f"{key}.up.weight": m.up}
    return out, {}


def with_embeddings(lora: Lora) -> Lora:
    """LyCORIS' `full` preset also adapts conv_in, conv_out and the time / added-embedding MLPs
    (lora_unet_input_blocks_0_0, lora_unet_out_2, lora_unet_time_embed_0, lora_unet_label_emb_0_0)."""
    g = torch.Generator().manual_seed(5)
    layers = layer_paths(UNet(CFG))
    for path in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"):
        w = layers[path].weight
        lora.modules[path] = LoraModule(torch.randn(2, *w.shape[1:], generator=g) * 0.1,
                                        torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []),
                                                    generator=g) * 0.1, 2.0)
    return lora


@pytest.mark.parametrize("make, embeddings", [(wild_sd_scripts, False), (wild_lycoris_locon, True),
                                              (wild_no_metadata, False), (wild_diffusers_kohya, False),
                                              (wild_diffusers_0_20, False)])
def test_sdxl_loras_in_the_layouts_found_in_the_wild_are_detected_and_placed(make, embeddings, tmp_path):
    alpha_is_rank = make in (wild_diffusers_kohya, wild_diffusers_0_20)     # those files carry no alpha
    spec = LoraSpec(rank=4, alpha=4, targets="full", conv_rank=2, conv_alpha=2) if alpha_is_rank else SPEC
    lora = trained(spec=spec)
    if alpha_is_rank:
        lora.modules = {p: LoraModule(m.down, m.up, float(m.rank)) for p, m in lora.modules.items()}
    if embeddings:
        lora = with_embeddings(lora)
    tensors, metadata = make(lora)
    if embeddings:
        assert {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0",
                "lora_unet_label_emb_0_2"} <= {k.split(".")[0] for k in tensors}
    path = tmp_path / "wild.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    got = read_lora(path, missing_alpha="rank")                              # no base given
    assert not got.unplaced and got.modules.keys() == lora.modules.keys()
    dtype = next(iter(tensors.values())).dtype
    assert delta_error(lora, got, tol=8 * torch.finfo(dtype).eps) < 8 * torch.finfo(dtype).eps
    unet, encoders = random_unet(CFG), text_encoders()
    assert fit(got, unet, text_encoders=encoders).keys() == lora.modules.keys()
    # Converting writes our default for SDXL: kohya LDM names.
    convert_lora(path, tmp_path / "ours.safetensors", "kohya", missing_alpha="rank")
    written = {k.split(".")[0] for k in keys_of(tmp_path / "ours.safetensors")}
    assert written == set(_kohya_names(lora).values())


def test_ldm_names_without_any_clue_to_the_base_are_kept_aside_with_the_reason(tmp_path):
    lora = trained(text=False)
    path = tmp_path / "bare.safetensors"
    save_file(_kohya_tensors(lora, _kohya_names(lora)), str(path))
    bare = read_lora(path)
    assert not bare.modules and all("pass the base" in why for why in bare.unplaced.values())
    placed = read_lora(path, base=CFG)
    assert delta_error(lora, placed, tol=1e-2) < 1e-2
    model = random_unet(CFG)
    load_lora_file(model, path, "style")                      # the model's own config places them
    assert set(lora_layers(model)) == set(lora.modules)


# --- wrong family ------------------------------------------------------------------------------------

def _sd1_file(tmp_path):
    z, r = torch.zeros, 4
    tensors = {}
    shapes = {"down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": ((r, 768), (640, r)),
              "down_blocks_0_attentions_0_proj_in": ((r, 320, 1, 1), (320, r, 1, 1)),
              "up_blocks_3_attentions_2_proj_out": ((r, 320, 1, 1), (320, r, 1, 1))}
    for name, (down, up) in shapes.items():
        tensors |= {f"lora_unet_{name}.lora_down.weight": z(down), f"lora_unet_{name}.lora_up.weight": z(up),
                    f"lora_unet_{name}.alpha": torch.tensor(1.0)}
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = z(r, 768)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = z(768, r)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sd1.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def test_an_sd1_lora_on_sdxl_is_refused_naming_both_families(tmp_path):
    with torch.device("meta"):
        sdxl = UNet(PRESETS["sdxl"])
    path = _sd1_file(tmp_path)
    for attempt in (lambda: load_lora_file(sdxl, path), lambda: merge_loras(sdxl, [(read_lora(path), 1.0)])):
        with pytest.raises(ValueError) as e:
            attempt()
        msg = str(e.value)
        assert "does not fit this U-Net (preset sdxl (SDXL: context dim 2048, linear proj_in" in msg
        assert "made for: ss_base_model_version=sd_v1; SD1.x cross-attention input dim 768" in msg
        assert "family SD1.x" in msg
        assert "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k: lora_down (4, 768)" in msg
    assert not lora_layers(sdxl)


def test_an_sdxl_lora_on_sd1_is_refused_naming_both_families(tmp_path):
    lora = trained()
    path = tmp_path / "sdxl.safetensors"
    tensors, metadata = wild_sd_scripts(lora)
    save_file(tensors, str(path), metadata=metadata)
    with torch.device("meta"):
        sd15 = UNet(PRESETS["sd15"])
    with pytest.raises(ValueError) as e:
        load_lora_file(sd15, path)
    msg = str(e.value)
    assert "does not fit this U-Net (preset sd15 (SD1.x: context dim 768" in msg
    assert "made for: ss_base_model_version=sdxl_base_v1-0" in msg and "family SDXL" in msg
    assert "text-encoder modules for text_encoder and text_encoder_2" in msg
    # Read as SD1.x, SDXL's LDM names place nowhere; written for SD1.x, its second text encoder has no name.
    with pytest.raises(ValueError, match="lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k.alpha "
                                         r"\(LDM name of no layer in this base\)"):
        convert_lora(path, tmp_path / "as_sd1.safetensors", "kohya", base=PRESETS["sd15"])
    with pytest.raises(ValueError, match="SD1.x pipelines have no text_encoder_2"):
        write_lora(tmp_path / "as_sd1.safetensors", lora, base=PRESETS["sd15"])
    assert not (tmp_path / "as_sd1.safetensors").exists()


def test_text_encoder_modules_need_the_text_encoders(tmp_path):
    write_lora(tmp_path / "sdxl.safetensors", trained())
    lora = read_lora(tmp_path / "sdxl.safetensors")
    unet_paths = [p for p in lora.modules if not is_text_path(p)]
    with pytest.raises(ValueError, match=r"24 keys could not be placed: lora_te1_text_model_encoder_layers_0_"
                                         r"\w+ \(text-encoder module; no text encoders were given"):
        fit(lora, random_unet(CFG))
    unet = random_unet(CFG)
    with pytest.warns(UserWarning, match=f"loading {len(unet_paths)} modules, skipping 24 keys"):
        load_lora(unet, lora, allow_unmatched=True)
    assert set(lora_layers(unet)) == set(unet_paths)


# --- merge, extract, resize, inspect ------------------------------------------------------------------

def test_merge_equals_the_attached_adapter_and_unmerge_restores_everything():
    lora = trained()
    runtime = random_unet(CFG)
    load_lora(runtime, Lora({p: m for p, m in lora.modules.items() if not is_text_path(p)}), "style")
    unet, encoders = random_unet(CFG), text_encoders()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    before_text = {f: {k: v.clone() for k, v in e.state_dict().items()} for f, e in encoders.items()}
    record = merge_loras(unet, [(lora, 1.0)], text_encoders=encoders)
    assert len(record.originals) == len(lora.modules)
    assert rel(unet_out(unet), unet_out(runtime)) < TOL
    unmerge(unet, record, text_encoders=encoders)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    for folder, encoder in encoders.items():
        assert all(torch.equal(v, before_text[folder][k]) for k, v in encoder.state_dict().items())


def test_extract_then_merge_reproduces_a_low_rank_difference(tmp_path):
    base, tuned = random_unet(CFG), random_unet(CFG)
    lora = trained(spec=LoraSpec(rank=3, alpha=3, targets="full", conv_rank=2, conv_alpha=2), text=False)
    merge_loras(tuned, [(lora, 1.0)])
    extracted, report = extract_lora(base, tuned, rank=3, conv_rank=2)
    assert extracted.modules.keys() == lora.modules.keys() and report.overall < 1e-5 and not report.skipped
    extracted.metadata = base_metadata(base.config, base_fingerprint(base))
    path = tmp_path / "extracted.safetensors"
    write_lora(path, extracted)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in keys_of(path))
    again = random_unet(CFG)
    merge_loras(again, [(read_lora(path), 1.0)])
    for (name, got), want in zip(layer_paths(again).items(), layer_paths(tuned).values(), strict=True):
        assert rel(got.weight, want.weight) < TOL, name
    # Resizing below the true rank reports the error it makes, and keeps SDXL's names.
    resized, small = resize_lora(read_lora(path), 1)
    assert 0.05 < small.overall < 1
    write_lora(tmp_path / "r1.safetensors", resized)
    assert set(keys_of(tmp_path / "r1.safetensors")) == set(keys_of(path))
    assert header(tmp_path / "r1.safetensors")[1]["adapterkit.base_config"] == extracted.metadata[
        "adapterkit.base_config"]


def test_inspect_summarizes_an_sdxl_file(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    write_lora(path, trained())
    s = summarize(path)
    assert s["format"] == "kohya" and not s["unplaced"] and s["modules"] == len(trained().modules)
    assert "text_time embedding" in s["base"] and "family SDXL" in s["base"]
    assert s["blocks"]["text_encoder"]["modules"] == 12 and s["blocks"]["text_encoder_2"]["modules"] == 12
    assert "down_blocks.1.attentions.0" in s["blocks"] and "mid_block.attentions.0" in s["blocks"]


# --- the commands ---------------------------------------------------------------------------------------

@pytest.fixture
def commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("adapterkit.train.cli.lora",))

    def run(*argv):
        return cli.main([str(a) for a in argv])
    return run


def test_inspect_convert_and_merge_commands_take_sdxl_files(commands, tmp_path, capsys):
    lora = trained(text=False)
    wild = tmp_path / "wild.safetensors"
    tensors, metadata = wild_sd_scripts(lora)
    save_file(tensors, str(wild), metadata=metadata)
    assert commands("inspect", wild) == 0
    text = capsys.readouterr().out
    assert "format:     kohya" in text and "family SDXL" in text and "LDM names placed by the SDXL" in text
    assert commands("convert", wild, tmp_path / "peft.safetensors") == 0
    assert "kohya -> peft" in capsys.readouterr().out
    save_unet(random_unet(CFG), tmp_path / "base")
    assert commands("merge", "--base", tmp_path / "base", wild, "-o", tmp_path / "merged") == 0
    ours, _ = merged(read_lora(wild))
    assert rel(unet_out(load_unet(tmp_path / "merged")), unet_out(ours)) < TOL
