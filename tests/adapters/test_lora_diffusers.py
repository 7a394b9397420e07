"""Our LoRA files in diffusers (`StableDiffusionPipeline.load_lora_weights`) and diffusers' in ours: the
U-Net outputs agree with our runtime adapter to fp32 rounding. The pipeline is a tiny random one
built offline (tests/support/pipelines.py)."""
import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from adapterkit.adapters.lora import (
    LoraModule,
    LoraSpec,
    add_lora,
    load_lora,
    lora_from_model,
    lora_layers,
    set_lora_weights,
)
from adapterkit.adapters.lora_files import read_lora, save_lora, write_lora
from adapterkit.adapters.lora_keys import to_kohya
from adapterkit.unet import PRESETS, UNet, UNetConfig
from support.pipelines import build_tiny_pipeline

CFG = PRESETS["tiny"]
TOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    path = build_tiny_pipeline(tmp_path_factory.mktemp("sd"), CFG)
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def clean(pipe):
    yield pipe
    pipe.unload_lora_weights()


def ours_from(pipe) -> UNet:
    """Our U-Net with the pipeline U-Net's base weights (any LoRA layers on it looked through)."""
    state = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items()
             if ".lora_" not in k}
    model = UNet(UNetConfig.from_diffusers(dict(pipe.unet.config))).eval()
    model.load_state_dict(state, strict=True)
    return model


def inputs():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 600]),
            torch.randn(2, 9, CFG.context_dim, generator=g))


def out(model):
    with torch.no_grad():
        y = model(*inputs())
    return y.sample if hasattr(y, "sample") else y


def trained(model, name, spec, seed):
    add_lora(model, spec, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)


SPEC = LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_our_file_in_diffusers_matches_our_runtime_adapter(clean, tmp_path, fmt):
    pipe = clean
    base = out(pipe.unet)
    model = ours_from(pipe)
    trained(model, "style", SPEC, seed=1)
    expected = out(model)
    path = tmp_path / f"style_{fmt}.safetensors"
    save_lora(model, path, "style", fmt=fmt)
    pipe.load_lora_weights(str(path), adapter_name="style")
    got = out(pipe.unet)
    assert (got - base).abs().max() > 100 * TOL                 # the LoRA does something ...
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)  # ... and the same thing in both
    scaling = {n: layer.scaling["style"] for n, layer in lora_layers(pipe.unet).items()}
    assert scaling.keys() == lora_layers(model).keys()                     # every layer we wrote was placed
    assert scaling["down_blocks.0.resnets.0.conv1"] == 1.5                  # conv_alpha / conv_rank
    assert scaling["down_blocks.1.attentions.0.proj_in"] == 0.5             # alpha / rank


def test_odd_attention_alpha_survives_diffusers(clean, tmp_path):
    # formats.md P2: diffusers would give to_q the majority alpha; our writer folds it into lora_up.
    pipe = clean
    model = ours_from(pipe)
    trained(model, "a", LoraSpec(rank=4, alpha=4, targets="attn-ff"), seed=2)
    lora = lora_from_model(model, "a")
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lora.modules[q] = LoraModule(lora.modules[q].down, lora.modules[q].up, 1.0)
    fresh = ours_from(pipe)
    load_lora(fresh, lora)
    write_lora(tmp_path / "odd.safetensors", lora)
    pipe.load_lora_weights(str(tmp_path / "odd.safetensors"))
    torch.testing.assert_close(out(pipe.unet), out(fresh), atol=TOL, rtol=0)


def test_several_adapters_with_weights_match_diffusers_set_adapters(clean, tmp_path):
    pipe = clean
    model = ours_from(pipe)
    trained(model, "a", LoraSpec(rank=4, alpha=4, targets="attn"), seed=3)
    trained(model, "b", LoraSpec(rank=2, alpha=1, targets="full"), seed=4)
    for name in ("a", "b"):
        save_lora(model, tmp_path / f"{name}.safetensors", name)
        pipe.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name=name)
    set_lora_weights(model, {"a": 0.7, "b": -0.4})
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    torch.testing.assert_close(out(pipe.unet), out(model), atol=TOL, rtol=0)


def test_kohya_file_by_another_tool_loads_the_same_in_both(clean, tmp_path):
    # sd-scripts conventions (formats.md §3.2): fp16 tensors, 0-dim fp16 alpha, alpha != rank,
    # conv_dim/conv_alpha for the 3x3 convs, 4-D tensors for 1x1 convs, ss_* metadata.
    pipe = clean
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for path, layer in lora_layers(_full_targets()).items():
        w = layer.get_base_layer().weight
        conv3 = w.ndim == 4 and w.shape[-1] == 3
        r, alpha = (4, 2.0) if conv3 else (8, 4.0)
        k = to_kohya(path)
        tensors[f"{k}.lora_down.weight"] = (torch.randn(r, *w.shape[1:], generator=g) * 0.1).half()
        tensors[f"{k}.lora_up.weight"] = (torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []),
                                                      generator=g) * 0.1).half()
        tensors[f"{k}.alpha"] = torch.tensor(alpha).half()
    file = tmp_path / "tool.safetensors"
    save_file(tensors, str(file), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "8",
                                            "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1"})
    pipe.load_lora_weights(str(file))
    model = ours_from(pipe)
    load_lora(model, read_lora(file))
    torch.testing.assert_close(out(pipe.unet), out(model), atol=TOL, rtol=0)


def test_diffusers_saved_lora_loads_in_ours(clean, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    pipe = clean
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                        init_lora_weights="gaussian")
    pipe.unet.add_adapter(config, adapter_name="theirs")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in lora_layers(pipe.unet).values():
            w = layer.lora_B["theirs"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    expected = out(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="theirs"),
        unet_lora_adapter_metadata=config.to_dict())
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "peft" and {m.scale for m in lora.modules.values()} == {2.0}
    assert json.loads(lora.metadata["lora_adapter_metadata"])["unet.r"] == 4
    pipe.unet.delete_adapters("theirs")
    model = ours_from(pipe)
    load_lora(model, lora)
    torch.testing.assert_close(out(model), expected, atol=TOL, rtol=0)


def _full_targets():
    with torch.device("meta"):
        model = UNet(CFG)
    add_lora(model, LoraSpec(rank=1, alpha=1, targets="full"))
    return model


def test_sd2_style_linear_projection_file_in_diffusers(tmp_path):
    # SD2.x-shaped U-Net: proj_in/proj_out are Linear, so their LoRA tensors are 2-D (formats.md P7).
    from diffusers import StableDiffusionPipeline
    cfg = CFG.replace(linear_projection=True)
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_pipeline(tmp_path, cfg), local_files_only=True)
    model = ours_from(pipe)
    assert model.config.linear_projection
    trained(model, "s", SPEC, seed=9)
    save_lora(model, tmp_path / "s.safetensors", "s")
    assert read_lora(tmp_path / "s.safetensors").modules["mid_block.attentions.0.proj_in"].down.ndim == 2
    pipe.load_lora_weights(str(tmp_path / "s.safetensors"))
    torch.testing.assert_close(out(pipe.unet), out(model), atol=TOL, rtol=0)
