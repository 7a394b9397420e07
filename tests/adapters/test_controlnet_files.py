"""ControlNet files: our diffusers layout in diffusers (ControlNetModel and a tiny ControlNet pipeline),
lllyasviel <-> diffusers bit-exact and equal to diffusers' own converter, config sources, metadata
(hint contract, base fingerprint), and clear failures for other bases and broken files."""
import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterkit.adapters.controlnet import ControlNet, HintSpec
from adapterkit.adapters.controlnet_files import (
    config_from_diffusers,
    convert_controlnet,
    diffusers_config,
    load_controlnet,
    save_controlnet,
)
from adapterkit.adapters.controlnet_keys import controlnet_key_map
from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.adapters.lora_files import save_lora
from adapterkit.unet import CheckpointError, Stage, UNet, ldm_key_map, save_unet, unet_fingerprint
from support.unets import SD15ISH, TINY, inputs
from support.unets import random_unet as base

TOL = 1e-5


def trained(unet: UNet, seed=1, **kw) -> ControlNet:
    """A ControlNet off `unet` with every weight moved (zero convs included), as after training."""
    cn = ControlNet.from_unet(unet, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return cn


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny():
    unet = base()
    return unet, trained(unet, hint=HintSpec(canny_low=100, canny_high=200))


# --- diffusers -----------------------------------------------------------------------------------------

def test_diffusers_folder_loads_in_diffusers_with_the_same_residuals(tiny, tmp_path):
    unet, cn = tiny
    weights = save_controlnet(cn, tmp_path / "cn")
    assert weights == tmp_path / "cn" / "diffusion_pytorch_model.safetensors"
    theirs = ControlNetModel.from_pretrained(tmp_path / "cn").eval()
    x, t, ctx, hint = inputs()
    with torch.no_grad():
        for scale, guess in [(0.75, False), (1.2, True)]:
            down, mid = theirs(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess, return_dict=False)
            ours = cn(x, t, ctx, hint, scale, guess)
            for a, b in zip([*ours.down, ours.mid], [*down, mid]):
                torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    back = load_controlnet(tmp_path / "cn", unet)
    assert same_weights(back, cn) and back.hint == cn.hint and back.base_fingerprint == cn.base_fingerprint


def test_config_json_is_what_diffusers_from_unet_writes():
    d_unet = UNet2DConditionModel(**{k: v for k, v in SD15ISH.to_diffusers().items() if k[0] != "_"})
    theirs = dict(ControlNetModel.from_unet(d_unet).config)
    with torch.device("meta"):
        ours = diffusers_config(ControlNet(SD15ISH))
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    assert {k: norm(theirs[k]) for k in ours if k != "_class_name"} == \
        {k: v for k, v in ours.items() if k != "_class_name"}
    cfg, channels, widths = config_from_diffusers(theirs)
    assert cfg.replace(sample_size=SD15ISH.sample_size) == SD15ISH
    assert (channels, widths) == (3, (16, 32, 96, 256))
    for bad, message in [({"global_pool_conditions": True}, "shuffle"),
                         ({"controlnet_conditioning_channel_order": "bgr"}, "RGB hints only"),
                         ({"_class_name": "ControlNetXSAdapter"}, "plain ControlNetModel"),
                         ({"addition_embed_type": "text_time"}, "SD1.x/2.x")]:
        with pytest.raises(ValueError, match=message):
            config_from_diffusers({**theirs, **bad})


def test_diffusers_single_file_and_diffusers_written_folder(tiny, tmp_path):
    unet, cn = tiny
    save_controlnet(cn, tmp_path / "cn.safetensors")
    with safe_open(tmp_path / "cn.safetensors", "pt") as f:
        assert set(f.keys()) == set(cn.state_dict())
    assert same_weights(load_controlnet(tmp_path / "cn.safetensors", unet), cn)
    # diffusers' own save_pretrained (no adapterkit metadata: config from config.json)
    theirs = ControlNetModel.from_pretrained(save_controlnet(cn, tmp_path / "ours").parent)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_controlnet(tmp_path / "theirs", unet)
    assert same_weights(back, cn) and back.base_fingerprint is None and back.config == unet.config


def test_in_a_diffusers_controlnet_pipeline_the_unet_output_is_ours(tmp_path):
    # The tiny fixture pipeline, with its VAE swapped for one of scale factor 8 (SD's): the pipeline
    # sizes the control image from the VAE factor, and the hint encoder needs 8x the latent size.
    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from support.pipelines import build_tiny_pipeline

    sd = StableDiffusionPipeline.from_pretrained(build_tiny_pipeline(tmp_path, TINY), local_files_only=True)
    unet = UNet(TINY).eval()
    unet.load_state_dict(sd.unet.state_dict(), strict=True)
    cn = trained(unet)
    save_controlnet(cn, tmp_path / "cn")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"), scheduler=sd.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    pipe.unet.register_forward_hook(lambda m, a, kw, out: seen.update(
        x=a[0], t=a[1], ctx=kw["encoder_hidden_states"], out=out[0]), with_kwargs=True)
    pipe.controlnet.register_forward_hook(lambda m, a, kw, out: seen.update(
        hint=kw["controlnet_cond"], scale=kw["conditioning_scale"]), with_kwargs=True)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pipe("a red circle", image=hint, height=128, width=128, num_inference_steps=2, guidance_scale=1.0,
         controlnet_conditioning_scale=0.8, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["hint"], hint, atol=1e-6, rtol=0)   # the [0, 1] contract, unchanged
    with torch.no_grad():
        ours = unet(seen["x"], seen["t"], seen["ctx"], *cn(seen["x"], seen["t"], seen["ctx"], seen["hint"],
                                                            seen["scale"]))
        plain = unet(seen["x"], seen["t"], seen["ctx"])
    assert (ours - plain).abs().max() > 100 * TOL
    torch.testing.assert_close(seen["out"], ours, atol=TOL, rtol=0)
    pipe.save_pretrained(tmp_path / "pipeline")          # and the pipeline folder reads back in ours
    assert same_weights(load_controlnet(tmp_path / "pipeline", unet), cn)


# --- lllyasviel ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, SD15ISH], ids=["tiny", "sd15ish"])
def test_lllyasviel_keys_and_diffusers_converter_agree(cfg, tmp_path):
    unet = base(cfg)
    cn = trained(unet)
    path = save_controlnet(cn, tmp_path / "cn.safetensors", layout="lllyasviel")
    tensors = load_file(path)
    unet_names = ldm_key_map(cfg)
    n = cfg.num_skips
    expected = {f"input_hint_block.{i}.{p}" for i in range(0, 16, 2) for p in ("weight", "bias")}
    expected |= {f"zero_convs.{i}.0.{p}" for i in range(n) for p in ("weight", "bias")}
    expected |= {"middle_block_out.0.weight", "middle_block_out.0.bias"}
    expected |= {unet_names[k] for k in cn.state_dict() if not k.startswith("controlnet_")}
    assert set(tensors) == {"control_model." + k for k in expected}
    assert any(k.startswith("control_model.time_embed.0") for k in tensors)
    # diffusers' single-file converter maps our file to exactly our diffusers names and tensors
    ours = cn.state_dict()
    for sd in (tensors, {k.removeprefix("control_model."): v for k, v in tensors.items()}):
        theirs = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": cfg.layers_per_block})
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_round_trips_between_layouts_are_bit_exact(tiny, tmp_path):
    unet, cn = tiny
    ldm = save_controlnet(cn, tmp_path / "a.safetensors", layout="lllyasviel")
    a = load_controlnet(ldm, unet)
    save_controlnet(a, tmp_path / "b")
    b = load_controlnet(tmp_path / "b", unet)
    save_controlnet(b, tmp_path / "c.safetensors", layout="lllyasviel")
    assert same_weights(a, cn) and same_weights(b, cn)
    first, last = load_file(ldm), load_file(tmp_path / "c.safetensors")
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    # without the control_model. prefix (thibaud's files), and inside a full SD checkpoint
    save_file({k.removeprefix("control_model."): v for k, v in first.items()}, tmp_path / "bare.safetensors")
    full = {**first, **{"model.diffusion_model." + k: v for k, v in list(load_file(
        save_unet(unet, tmp_path / "u.safetensors", layout="ldm")).items())[:3]},
        "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}
    save_file(full, tmp_path / "full.safetensors")
    for name in ("bare", "full"):
        assert same_weights(load_controlnet(tmp_path / f"{name}.safetensors", unet), cn)
    out = convert_controlnet(ldm, tmp_path / "conv")
    assert same_weights(load_controlnet(out.parent), cn)
    half = convert_controlnet(tmp_path / "b", tmp_path / "half.safetensors", layout="lllyasviel",
                              dtype=torch.float16)
    assert {t.dtype for t in load_file(half).values()} == {torch.float16}
    kept = convert_controlnet(half, tmp_path / "half_diffusers.safetensors")      # fp16 stays fp16
    assert {t.dtype for t in load_file(kept).values()} == {torch.float16}


def test_key_map_is_one_to_one():
    m = controlnet_key_map(SD15ISH)
    assert len(set(m.values())) == len(m)
    assert m["controlnet_cond_embedding.blocks.5.weight"] == "input_hint_block.12.weight"
    assert m["controlnet_cond_embedding.conv_out.bias"] == "input_hint_block.14.bias"
    assert m["controlnet_down_blocks.11.weight"] == "zero_convs.11.0.weight"
    assert m["controlnet_mid_block.weight"] == "middle_block_out.0.weight"
    assert m["down_blocks.1.resnets.0.conv1.weight"] == "input_blocks.4.0.in_layers.2.weight"


# --- config sources and metadata -------------------------------------------------------------------------

def test_config_from_shapes_or_from_the_unet_when_the_file_has_none(tiny, tmp_path):
    unet, cn = tiny
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, tmp_path / "raw.safetensors")
    inferred = load_controlnet(tmp_path / "raw.safetensors")
    assert inferred.config == TINY and same_weights(inferred, cn)        # shapes show the tiny preset
    odd = SD15ISH.replace(stages=tuple(Stage(s.channels, s.attention, heads=2) for s in SD15ISH.stages))
    odd_unet = base(odd)
    odd_cn = trained(odd_unet)
    save_file({k: v.contiguous() for k, v in odd_cn.state_dict().items()}, tmp_path / "odd.safetensors")
    assert load_controlnet(tmp_path / "odd.safetensors").config.stages[0].heads == 8    # the SD rule
    assert load_controlnet(tmp_path / "odd.safetensors", odd_unet).config == odd        # the U-Net's
    with pytest.raises(CheckpointError, match=r"for custom U-Net .*but the U-Net is preset tiny"):
        load_controlnet(tmp_path / "odd.safetensors", unet)


def test_metadata_records_hint_contract_and_base(tiny, tmp_path):
    unet, cn = tiny
    path = save_controlnet(cn, tmp_path / "cn.safetensors", layout="lllyasviel", title="edges",
                           metadata={"modelspec.author": "me", "modelspec.tags": ["edge", "tiny"]})
    with safe_open(path, "pt") as f:
        md = f.metadata()
    hint = json.loads(md["adapterkit.hint"])
    assert hint == {"kind": "canny", "resize": "like-target", "canny_low": 100, "canny_high": 200,
                    "range": [0.0, 1.0], "channels": "rgb"}
    assert md["adapterkit.base_fingerprint"] == unet_fingerprint(unet) == cn.base_fingerprint
    assert json.loads(md["adapterkit.base_config"]) == json.loads(json.dumps(TINY.to_dict()))
    assert md["modelspec.architecture"].endswith("/controlnet") and md["modelspec.preprocessor"] == "canny"
    assert md["modelspec.title"] == "edges" and md["modelspec.author"] == "me"
    assert json.loads(md["modelspec.tags"]) == ["edge", "tiny"]
    back = load_controlnet(path, unet)
    assert back.hint == HintSpec(canny_low=100, canny_high=200) and back.metadata["modelspec.author"] == "me"
    with pytest.raises(ValueError, match="written by adapterkit itself"):
        save_controlnet(cn, tmp_path / "x.safetensors", metadata={"adapterkit.base_fingerprint": "forged"})
    with pytest.raises(ValueError, match="both Canny thresholds"):
        HintSpec(canny_low=100)
    with pytest.raises(ValueError, match=r"range=\[-1, 1\].*\[0.0, 1.0\]"):
        HintSpec.from_dict({**HintSpec().to_dict(), "range": [-1, 1]})


# --- other bases, broken files --------------------------------------------------------------------------

def test_another_base_fails_naming_both(tiny, tmp_path):
    unet, cn = tiny
    path = save_controlnet(cn, tmp_path / "cn")
    other_arch = base(SD15ISH)
    with pytest.raises(ValueError, match=r"made for preset tiny .*channels \[32, 64, 128\].*but the U-Net is "
                                         r"custom U-Net .*channels \[32, 64, 64, 64\]"):
        load_controlnet(path, other_arch)
    other_weights = base(TINY, seed=5)
    theirs, ours = unet_fingerprint(other_weights), cn.base_fingerprint
    with pytest.raises(ValueError, match=f"fingerprint {ours}.*fingerprint {theirs}.*allow_other_base"):
        load_controlnet(path, other_weights)
    with pytest.warns(UserWarning, match=theirs):
        assert same_weights(load_controlnet(path, other_weights, allow_other_base=True), cn)
    # the same base carrying a LoRA is the same base
    lorad = UNet(TINY).eval()
    lorad.load_state_dict(unet.state_dict())
    add_lora(lorad, LoraSpec(rank=2))
    assert same_weights(load_controlnet(path, lorad), cn)


def test_broken_and_foreign_files_fail_clearly(tiny, tmp_path):
    unet, cn = tiny
    ldm = load_file(save_controlnet(cn, tmp_path / "cn.safetensors", layout="lllyasviel"))

    def attempt(tensors, message, **kw):
        file = tmp_path / "bad.safetensors"
        save_file(tensors, file)
        with pytest.raises(CheckpointError, match=message):
            load_controlnet(file, **kw)

    missing = {k: v for k, v in ldm.items() if k != "control_model.zero_convs.3.0.weight"}
    attempt(missing, r"1 missing tensors \(control_model.zero_convs.3.0.weight\)")
    attempt({**ldm, "control_model.zero_convs.3.0.weight": torch.zeros(3, 3, 1, 1)},
            r"zero_convs.3.0.weight: expected \[64, 64, 1, 1\], found \[3, 3, 1, 1\]")
    attempt({**ldm, "control_model.extra.weight": torch.zeros(1)},
            r"1 unexpected tensors \(control_model.extra")
    nan = dict(ldm)
    nan["control_model.middle_block_out.0.bias"] = torch.full((128,), float("nan"))
    attempt(nan, "NaN or inf values in 1 tensors: control_model.middle_block_out.0.bias")
    attempt({k: v for k, v in ldm.items() if "input_hint_block" not in k}, "no hint encoder")
    bare = {k.removeprefix("control_model."): v for k, v in ldm.items()}
    attempt({"lora_controlnet": torch.tensor([]), **bare}, "Control-LoRA.*pass that U-Net as unet=")
    attempt({"difference": torch.tensor([]), "x": torch.zeros(1)}, "'diff' ControlNet")
    with pytest.raises(CheckpointError, match="U-Net or SD checkpoint"):
        load_controlnet(save_unet(unet, tmp_path / "unet.safetensors", layout="ldm"))
    lorad = UNet(TINY)
    add_lora(lorad, LoraSpec(rank=2))
    save_lora(lorad, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="looks like a LoRA"):
        load_controlnet(tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_controlnet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no ControlNet weights in"):
        load_controlnet(tmp_path / "empty")
    bad_md = tmp_path / "bad_md.safetensors"
    save_file(ldm, bad_md, metadata={"adapterkit.hint": "{not json"})
    with pytest.raises(CheckpointError, match="adapterkit.hint is not a valid hint contract"):
        load_controlnet(bad_md)
    with pytest.raises(ValueError, match="unknown ControlNet layout"):
        save_controlnet(cn, tmp_path / "x", layout="comfy")
    with pytest.raises(ValueError, match="one .safetensors file"):
        save_controlnet(cn, tmp_path / "x.ckpt", layout="lllyasviel")
