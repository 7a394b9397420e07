"""LoRA injection through peft: target presets, zero-init, trainable set, several named adapters with
weights, enable/disable, and the detached `Lora` record going out of and back into a model."""
import pytest
import torch

from adapterkit.adapters.lora import (
    TARGET_PRESETS,
    LoraSpec,
    add_lora,
    enable_loras,
    load_lora,
    lora_from_model,
    lora_layers,
    lora_names,
    lora_spec,
    lora_weights,
    remove_lora,
    set_lora_weights,
)
from adapterkit.unet import PRESETS, UNet

CFG = PRESETS["tiny"]


def base_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return UNet(CFG).eval().to(dtype)


def inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([5, 700]),
            torch.randn(2, 7, CFG.context_dim, generator=g).to(dtype))


def run(model, dtype=torch.float32):
    with torch.no_grad():
        return model(*inputs(dtype=dtype))


def close(a, b, atol=1e-5):
    """Outputs equal up to fp32 rounding. (The U-Net runs a plain 1x1-conv proj_in as F.linear on tokens
    and a peft-wrapped one as a conv, so wrapped and plain models round differently, ~3e-6.)"""
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def randomize(model, name, seed=0, std=0.05):
    """Give adapter `name` a non-zero B (it starts at zero) so that it has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


def test_presets_select_kohyas_module_sets_on_sd15():
    # formats.md §3.2: kohya targets 192 modules on SD1.5 by default (every Linear/Conv of a
    # Transformer2DModel) and 278 with conv_dim. `attn-ff` and `full` are exactly those sets.
    expected = {"attn": 128, "attn-ff": 192, "full": 278}
    assert set(TARGET_PRESETS) == set(expected)
    for name, count in expected.items():
        with torch.device("meta"):
            model = UNet(PRESETS["sd15"])
        add_lora(model, LoraSpec(rank=4, alpha=4, targets=name))
        names = set(lora_layers(model))
        assert len(names) == count, name
        assert not any(n.endswith(("conv_in", "conv_out")) or "time_embedding" in n for n in names)
    assert "down_blocks.0.resnets.0.conv1" in names and "up_blocks.0.upsamplers.0.conv" in names


@pytest.mark.parametrize("targets", list(TARGET_PRESETS))
def test_fresh_adapter_changes_nothing_and_only_adapter_tensors_train(targets):
    model = base_model()
    before = run(model)
    add_lora(model, LoraSpec(rank=4, alpha=8, targets=targets, dropout=0.1))
    for layer in lora_layers(model).values():              # B zero-initialised: ΔW exactly 0 ...
        assert not layer.get_delta_weight("default").any()
    close(run(model), before)                              # ... so the output is the base's
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    model(*inputs()).square().mean().backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad <= set(trainable)
    assert any(".lora_B." in n for n in got_grad)


def test_conv_rank_and_alpha_apply_to_3x3_convs_only():
    model = base_model()
    add_lora(model, LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3))
    layers = lora_layers(model)
    assert layers["down_blocks.0.resnets.0.conv1"].r["default"] == 2
    assert layers["down_blocks.0.resnets.0.conv1"].scaling["default"] == 1.5
    assert layers["down_blocks.0.downsamplers.0.conv"].r["default"] == 2
    assert layers["down_blocks.1.resnets.0.conv_shortcut"].r["default"] == 4       # 1x1: network rank
    assert layers["down_blocks.1.attentions.0.proj_in"].scaling["default"] == 0.5
    assert lora_spec(model) == LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3)


def test_named_adapters_weights_enable_disable_remove():
    model = base_model()
    base = run(model)
    add_lora(model, LoraSpec(rank=4, alpha=4, targets="attn"), "style")
    randomize(model, "style", seed=1)
    only_style = run(model)
    add_lora(model, LoraSpec(rank=2, alpha=1, targets="full"), "detail", trainable=False)
    randomize(model, "detail", seed=2)
    assert lora_names(model) == ["detail", "style"]
    assert lora_weights(model) == {"style": 1.0, "detail": 1.0}
    both = run(model)
    assert not torch.allclose(both, only_style)
    # A frozen second adapter does not make the first one's tensors or the base trainable.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".style." in n for n in trainable)

    set_lora_weights(model, {"style": 1.0, "detail": 0.0})
    close(run(model), only_style)
    set_lora_weights(model, {"style": 1.0})                    # detail inactive
    close(run(model), only_style)
    set_lora_weights(model, {"style": 0.5, "detail": 1.0})
    assert lora_weights(model) == {"style": 0.5, "detail": 1.0}
    half = run(model)
    assert not torch.allclose(half, both)
    enable_loras(model, False)
    close(run(model), base)
    enable_loras(model, True)
    torch.testing.assert_close(run(model), half, atol=0, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    remove_lora(model, "detail")
    assert lora_names(model) == ["style"]
    set_lora_weights(model, {"style": 1.0})
    close(run(model), only_style)
    with pytest.raises(ValueError, match="no LoRA named \\['nope'\\]"):
        set_lora_weights(model, {"nope": 1.0})
    with pytest.raises(ValueError, match="already has a LoRA named 'style'"):
        add_lora(model, LoraSpec(), "style")


def test_lora_record_round_trips_through_a_fresh_model():
    model = base_model()
    add_lora(model, LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3), "a")
    randomize(model, "a")
    expected = run(model)
    lora = lora_from_model(model, "a")
    assert len(lora.modules) == len(lora_layers(model))
    m = lora.modules["down_blocks.0.resnets.0.conv1"]
    assert m.down.shape == (2, 32, 3, 3) and m.up.shape == (32, 2, 1, 1) and m.alpha == 3.0
    fresh = base_model()
    load_lora(fresh, lora, "a")
    assert torch.equal(run(fresh), expected)
    assert not any(p.requires_grad for p in fresh.parameters())          # loaded frozen by default
    load_lora(fresh, lora, "b", weight=0.0, trainable=True)
    assert torch.equal(run(fresh), expected)
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {"b"}


def test_adapters_are_fp32_on_a_bf16_base():
    model = base_model(dtype=torch.bfloat16)
    add_lora(model, LoraSpec(rank=4, alpha=4, targets="attn"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".lora_" not in n)
    assert run(model, torch.bfloat16).dtype == torch.bfloat16


def test_failed_load_leaves_the_model_untouched():
    model = base_model()
    add_lora(model, LoraSpec(rank=4, alpha=4, targets="attn"), "a")
    randomize(model, "a")
    lora = lora_from_model(model, "a")
    lora.modules["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].up[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN/inf.*attn1.to_q.lora_up"):
        load_lora(model, lora, "b")
    assert lora_names(model) == ["a"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()


@pytest.mark.parametrize("name", ["training", "a.b", ""])
def test_adapter_names_peft_cannot_hold_are_refused(name):
    model = base_model()
    with pytest.raises(ValueError, match="LoRA name"):
        add_lora(model, LoraSpec(), name)
    assert not lora_layers(model)


@pytest.mark.parametrize("bad, match", [
    (dict(targets="everything"), "unknown LoRA targets 'everything'; choose one of"),
    (dict(rank=0), "rank must be >= 1"),
    (dict(alpha=0), "alpha must be > 0"),
])
def test_spec_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraSpec(**bad)
