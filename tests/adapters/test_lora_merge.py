"""Merge into base weights (== the runtime adapter, fp32 math, base dtype), exact unmerge, LoRA+LoRA,
extraction from two U-Nets and rank resizing by SVD, with their reported errors."""
import pytest
import torch
from torch import nn

from adapterkit.adapters.lora import (
    Lora,
    LoraModule,
    LoraSpec,
    add_lora,
    load_lora,
    lora_from_model,
    lora_layers,
    set_lora_weights,
)
from adapterkit.adapters.merge import (
    combine_loras,
    extract_lora,
    merge_loras,
    resize_lora,
    save_merged,
    unmerge,
)
from adapterkit.unet import PRESETS, UNet, load_unet

CFG = PRESETS["tiny"]
TOL = 1e-5


def base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return UNet(CFG).eval().to(dtype)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([1, 999]),
            torch.randn(2, 6, CFG.context_dim, generator=g).to(dtype))


def out(model, dtype=torch.float32):
    with torch.no_grad():
        return model(*inputs(dtype))


def random_lora(spec, seed, std=0.05) -> Lora:
    model = base()
    add_lora(model, spec, "x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B["x"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
    return lora_from_model(model, "x")


A = LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3)
B = LoraSpec(rank=3, alpha=6, targets="attn")


@pytest.fixture(scope="module")
def loras():
    return random_lora(A, 1), random_lora(B, 2)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_delta_formula_equals_kohyas_and_pefts_for_linear_1x1_and_3x3(loras):
    # formats.md §5.1 / conformance item 10: three formulas, one ΔW.
    model = base()
    load_lora(model, loras[0], "x")
    layers = lora_layers(model)
    for path in ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",   # linear
                 "down_blocks.1.attentions.0.proj_in",                            # conv 1x1
                 "down_blocks.0.resnets.0.conv1",                                 # conv 3x3
                 "down_blocks.0.downsamplers.0.conv"):                            # conv 3x3 stride 2
        m = loras[0].modules[path]
        ours = m.delta()
        peft = layers[path].get_delta_weight("x")
        if m.down.ndim == 4 and m.down.shape[-1] == 3:
            kohya = m.scale * nn.functional.conv2d(m.down.permute(1, 0, 2, 3), m.up).permute(1, 0, 2, 3)
        else:
            kohya = m.scale * (m.up.flatten(1) @ m.down.flatten(1)).reshape(ours.shape)
        torch.testing.assert_close(ours, peft, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(ours, kohya, atol=1e-7, rtol=1e-6)


def test_merged_equals_runtime_adapters_and_unmerge_is_bit_exact(loras):
    runtime = base()
    load_lora(runtime, loras[0], "a")
    load_lora(runtime, loras[1], "b")
    set_lora_weights(runtime, {"a": 0.8, "b": -0.5})
    expected = out(runtime)
    model = base()
    original = state(model)
    before = out(model)
    record = merge_loras(model, [(loras[0], 0.8), (loras[1], -0.5)])
    assert len(record.originals) == len(loras[0].modules)      # b's layers are a subset of a's
    torch.testing.assert_close(out(model), expected, atol=TOL, rtol=0)
    assert (out(model) - before).abs().max() > 100 * TOL
    unmerge(model, record)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in original.items())
    assert torch.equal(out(model), before)


def test_merge_computes_in_fp32_and_writes_the_base_dtype(loras):
    model = base(dtype=torch.bfloat16)
    original = state(model)
    record = merge_loras(model, [(loras[0], 1.0), (loras[1], 0.3)])
    for path, w in record.originals.items():
        delta = sum(r * lo.modules[path].delta() for lo, r in ((loras[0], 1.0), (loras[1], 0.3))
                    if path in lo.modules)
        got = model.state_dict()[f"{path}.weight"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, (w.float() + delta).to(torch.bfloat16)), path   # one rounding, at the end
    unmerge(model, record)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_merge_into_a_model_carrying_peft_layers_targets_the_base_layer(loras):
    model = base()
    add_lora(model, LoraSpec(rank=2, alpha=2, targets="attn"), "trainee")
    original = state(model)
    record = merge_loras(model, [(loras[1], 1.0)])
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert not torch.equal(model.state_dict()[f"{q}.base_layer.weight"], original[f"{q}.base_layer.weight"])
    unmerge(model, record)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_merge_refuses_a_lora_for_another_base_before_changing_anything(loras):
    other = CFG.replace(context_dim=32)
    model = UNet(other).eval()
    original = state(model)
    with pytest.raises(ValueError, match=r"does not fit this U-Net.*attn2.to_k: lora_down \(4, 64\)"):
        merge_loras(model, [(loras[0], 1.0)])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_merged_model_saves_and_reloads(loras, tmp_path):
    model = base()
    merge_loras(model, [(loras[0], 1.0)])
    expected = out(model)
    save_merged(model, tmp_path / "merged")
    torch.testing.assert_close(out(load_unet(tmp_path / "merged")), expected, atol=0, rtol=0)
    save_merged(model, tmp_path / "merged.safetensors", layout="ldm")
    torch.testing.assert_close(out(load_unet(tmp_path / "merged.safetensors")), expected, atol=0, rtol=0)


# --- LoRA + LoRA, extract, resize ----------------------------------------------------------------------

def test_combining_loras_exactly_concatenates_ranks(loras):
    combined, report = combine_loras([(loras[0], 0.8), (loras[1], -0.5)])
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert combined.modules[q].rank == 4 + 3 and combined.modules[q].alpha == 7
    assert report.overall == 0
    for path, m in combined.modules.items():
        want = 0.8 * loras[0].modules[path].delta()
        if path in loras[1].modules:
            want = want - 0.5 * loras[1].modules[path].delta()
        torch.testing.assert_close(m.delta(), want, atol=1e-7, rtol=1e-5)


def test_combining_to_a_rank_reports_the_svd_error(loras):
    exact, _ = combine_loras([(loras[0], 1.0), (loras[1], 1.0)])
    small, report = combine_loras([(loras[0], 1.0), (loras[1], 1.0)], rank=2)
    assert max(small.ranks()) == 2
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    true = (exact.modules[q].delta() - small.modules[q].delta()).norm() / exact.modules[q].delta().norm()
    assert report.errors[q] == pytest.approx(float(true), rel=1e-3)
    assert 0 < report.overall < 1


def test_extract_recovers_a_merged_lora_at_its_true_rank(loras):
    tuned = base()
    merge_loras(tuned, [(loras[0], 1.0)])
    lora, report = extract_lora(base(), tuned, rank=4, conv_rank=2, targets="full")
    assert lora.modules.keys() == loras[0].modules.keys()
    assert report.overall <= 1e-4 and not report.skipped
    for path, m in lora.modules.items():
        want = loras[0].modules[path].delta()
        err = (m.delta() - want).norm() / want.norm()
        assert err <= 1e-4, path
    conv = lora.modules["down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (2, 32, 3, 3) and conv.up.shape == (32, 2, 1, 1)


def test_extract_below_the_true_rank_reports_the_error_and_lists_what_it_cannot_carry(loras):
    before, tuned = base(), base()
    merge_loras(tuned, [(loras[0], 1.0)])
    with torch.no_grad():
        tuned.conv_in.weight.add_(0.01)
        tuned.down_blocks[0].resnets[0].norm1.bias.add_(0.01)
    lora, report = extract_lora(before, tuned, rank=1, targets="attn")
    assert max(lora.ranks()) == 1 and report.overall > 1e-3
    assert "conv_in.weight" in report.skipped and "down_blocks.0.resnets.0.norm1.bias" in report.skipped
    assert "not in targets 'attn'" in report.skipped["down_blocks.0.resnets.0.conv1.weight"]
    with pytest.raises(ValueError, match="identical weights in every targeted layer"):
        extract_lora(before, base(), rank=4)


def test_resize_reports_the_true_error_and_is_exact_at_full_rank(loras):
    same, report = resize_lora(loras[0], 8)
    assert report.overall < 1e-6
    assert all(same.modules[p].rank == m.rank for p, m in loras[0].modules.items())
    for p, m in loras[0].modules.items():
        torch.testing.assert_close(same.modules[p].delta(), m.delta(), atol=1e-7, rtol=1e-5)
    small, report = resize_lora(loras[0], 1)
    assert set(small.ranks()) == {1}
    num = sum(float((small.modules[p].delta() - m.delta()).norm() ** 2) for p, m in loras[0].modules.items())
    den = sum(float(m.delta().norm() ** 2) for m in loras[0].modules.values())
    assert report.overall == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_low_rank_ops_refuse_broken_loras(loras):
    bad = Lora({p: LoraModule(m.down.clone(), m.up.clone(), m.alpha) for p, m in loras[1].modules.items()})
    next(iter(bad.modules.values())).down[0, 0] = float("nan")
    for op in (lambda: resize_lora(bad, 2), lambda: combine_loras([(bad, 1.0)])):
        with pytest.raises(ValueError, match="NaN/inf"):
            op()
