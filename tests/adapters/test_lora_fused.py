"""The fused LoRA Linear (adapters/lora_fused.py) computes what peft's lora.Linear computes, forward and
backward, through every adapter state peft manages: several adapters with weights, disable, merge,
dropout, mixed dtypes. The reference is the same model with the fused path switched off."""

import torch
import torch.nn.functional as F

from adapterkit.adapters import lora_fused
from adapterkit.adapters.lora import (
    LoraSpec,
    add_lora,
    enable_loras,
    lora_layers,
    set_lora_weights,
)
from adapterkit.adapters.lora_fused import FusedLinear
from adapterkit.unet import PRESETS, UNet

CFG = PRESETS["tiny"]
SPEC = LoraSpec(rank=4, alpha=8, targets="attn-ff")


def fused(enabled: bool):
    return lora_fused.use_fused_lora(lora_fused.FusedLoraOptions(enabled=enabled))


def model_with_loras(dtype=torch.float32, spec=SPEC, names=("a",)):
    torch.manual_seed(0)
    model = UNet(CFG).to(dtype).requires_grad_(False)
    for i, name in enumerate(names):
        add_lora(model, spec, name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():                      # B starts at zero: give every adapter an effect
            for layer in lora_layers(model).values():
                w = layer.lora_B[name].weight
                w.copy_(0.1 * torch.randn(w.shape, generator=g).to(w.dtype))
    return model


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([5, 700]),
            torch.randn(2, 7, CFG.context_dim, generator=g).to(dtype))


def step(model, enabled: bool, dtype=torch.float32, input_grad=True):
    """Output, input gradient and every trainable gradient of one loss, fused path on or off."""
    x, t, c = inputs(dtype)
    x.requires_grad_(input_grad)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    with fused(enabled):
        out = model(x, t, c)
        F.mse_loss(out.float(), torch.ones_like(out, dtype=torch.float32)).backward()
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}   # active adapters
    return out.detach(), (x.grad if input_grad else None), grads


def assert_same_step(model, dtype=torch.float32, tol=1e-5, input_grad=True):
    out0, dx0, g0 = step(model, False, dtype, input_grad)
    out1, dx1, g1 = step(model, True, dtype, input_grad)
    torch.testing.assert_close(out1.float(), out0.float(), atol=tol, rtol=tol)
    if input_grad:
        torch.testing.assert_close(dx1.float(), dx0.float(), atol=tol, rtol=tol)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n].float(), g0[n].float(), atol=tol, rtol=tol, msg=n)


def test_linear_targets_are_fused_layers_and_convs_are_peft_layers():
    model = model_with_loras(spec=LoraSpec(rank=4, targets="full"))
    layers = lora_layers(model)
    linear = [m for m in layers.values() if isinstance(m.base_layer, torch.nn.Linear)]
    conv = [m for m in layers.values() if isinstance(m.base_layer, torch.nn.Conv2d)]
    assert linear and all(type(m) is FusedLinear for m in linear)
    assert conv and not any(type(m) is FusedLinear for m in conv)


def test_fused_step_matches_peft_fp32():
    assert_same_step(model_with_loras())


def test_fused_step_matches_peft_without_input_grad():
    assert_same_step(model_with_loras(), input_grad=False)


def test_fused_step_matches_peft_bf16():
    # bf16 throughout (bf16 base, bf16 adapters): peft rounds the update four times, the fused path once.
    model = model_with_loras(torch.bfloat16)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert_same_step(model, torch.bfloat16, tol=3e-2)


def test_several_adapters_with_weights_and_subsets():
    model = model_with_loras(names=("a", "b", "c"))
    for weights in ({"a": 1.0, "b": 0.5, "c": -2.0}, {"b": 0.7}, {"a": 0.0, "c": 1.3}):
        set_lora_weights(model, weights)
        assert_same_step(model)


def test_second_adapter_of_another_rank():
    model = model_with_loras(names=("a",))
    add_lora(model, LoraSpec(rank=2, alpha=1, targets="attn"), "b")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if "b" in layer.lora_B:
                layer.lora_B["b"].weight.normal_(0, 0.1)
    assert_same_step(model)


def test_disabled_adapters_give_the_base_output():
    model = model_with_loras()
    x, t, c = inputs()
    with torch.no_grad():
        with_lora = model(x, t, c)
        enable_loras(model, False)
        off = model(x, t, c)
        enable_loras(model, True)
        again = model(x, t, c)
    torch.manual_seed(0)
    base = UNet(CFG).eval()
    with torch.no_grad():
        expect = base(x, t, c)
    torch.testing.assert_close(off, expect, atol=1e-5, rtol=0)
    assert (with_lora - off).abs().max() > 1e-3
    assert torch.equal(again, with_lora)


def test_merge_equals_unmerged_and_unmerge_restores():
    model = model_with_loras(names=("a", "b"))
    set_lora_weights(model, {"a": 0.8, "b": -0.4})
    x, t, c = inputs()
    with torch.no_grad():
        unmerged = model(x, t, c)
        weights = {n: m.base_layer.weight.clone() for n, m in lora_layers(model).items()}
        for layer in lora_layers(model).values():
            layer.merge()
        merged = model(x, t, c)
        for layer in lora_layers(model).values():
            layer.unmerge()
        back = model(x, t, c)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, unmerged, atol=1e-5, rtol=0)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, weights[n], atol=1e-6, rtol=0)


def test_dropout_in_training_falls_back_to_peft():
    model = model_with_loras(spec=LoraSpec(rank=4, alpha=4, dropout=0.5, targets="attn")).train()
    results = []
    for enabled in (False, True):
        torch.manual_seed(3)
        results.append(step(model, enabled))
    (o0, dx0, g0), (o1, dx1, g1) = results
    assert torch.equal(o0, o1) and torch.equal(dx0, dx1)
    # Without training mode dropout is the identity, and the fused path applies.
    model.eval()
    assert_same_step(model)


def test_mixed_dtypes_fall_back_to_peft():
    # bf16 base with fp32 adapters (peft casts x up to fp32 for the LoRA branch): peft's path, bit for bit.
    model = model_with_loras(names=("a",))
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    out0, dx0, _ = step(model, False, torch.bfloat16)
    out1, dx1, _ = step(model, True, torch.bfloat16)
    assert torch.equal(out0, out1) and torch.equal(dx0, dx1)


def test_fused_layer_alone_matches_the_formula():
    # y = x Wᵀ + b + s (x Aᵀ) Bᵀ on a 3-D input, against autograd on the plain formula.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20))
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["0"])
    lora_fused.register(cfg)
    inject_adapter_in_model(cfg, model)
    layer = model[0]
    assert type(layer) is FusedLinear
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    layer.base_layer.requires_grad_(True)            # the base's gradients too
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = model(x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = [x, W, b, A, B]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    ref_y = x @ W.t() + b + 2.0 * (x @ A.t()) @ B.t()
    want = torch.autograd.grad(ref_y, params, g)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_compiled_default_uses_peft_path(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model = model_with_loras()
    layer = next(m for m in lora_layers(model).values() if type(m) is FusedLinear)
    x = torch.randn(2, 3, layer.in_features)
    assert layer._fusable_adapters(x, (), {}) is None
    with lora_fused.use_fused_lora(lora_fused.FusedLoraOptions(compiled=True)):
        assert layer._fusable_adapters(x, (), {}) == ["a"]


def test_saved_activations_do_not_grow():
    # The fused path keeps x and the (N, R) product for the backward pass, as peft does; beyond that
    # only the scaled copy s·B of each up matrix (weight-sized, not activation-sized).
    model = model_with_loras()
    x, t, c = inputs()

    def saved_bytes(enabled):
        seen = {}

        def pack(s):
            seen[s.data_ptr()] = s.numel() * s.element_size()
            return s
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s), fused(enabled):
            model(x, t, c)
        return sum(seen.values())

    scaled_B = sum(m.lora_B["a"].weight.nbytes for m in lora_layers(model).values() if type(m) is FusedLinear)
    assert saved_bytes(True) <= saved_bytes(False) + scaled_B


def test_one_graph_under_torch_compile(monkeypatch):
    # Neither the fused LoRA Linear (options.compiled) nor the in-place GEGLU may break the compiled graph.
    model = model_with_loras(spec=LoraSpec(rank=4, targets="attn"))
    for compiled in (False, True):
        with lora_fused.use_fused_lora(lora_fused.FusedLoraOptions(compiled=compiled)):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(*inputs())
        assert explained.graph_break_count == 0, explained.break_reasons
