"""The ControlNet branch against diffusers' ControlNetModel on the same random weights (the oracle),
and its invariants: zero-init identity, LoRA'd bases, guess-mode scales, several ControlNets, hint checks."""
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from adapterkit.adapters.controlnet import (
    ControlNet,
    MultiControlNet,
    Residuals,
    guess_mode_scales,
    skip_channels,
    sum_residuals,
)
from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
from adapterkit.unet import PRESETS, Stage, UNet

TOL = 1e-5
TINY = PRESETS["tiny"]
# SD1.5's structure (4 stages, 2 layers per block, no attention in the last) at width 32.
SD15ISH = PRESETS["sd15"].replace(
    stages=(Stage(32, heads=4), Stage(64, heads=4), Stage(64, heads=4), Stage(64, attention=False, heads=4)),
    context_dim=48)
SD21ISH = PRESETS["sd21"].replace(
    stages=(Stage(32, heads=1), Stage(64, heads=2), Stage(64, heads=2, depth=2)), context_dim=48)
CONFIGS = {"tiny": TINY, "sd15ish": SD15ISH, "sd21ish": SD21ISH}


def diffusers_pair(cfg, seed=0):
    """(our U-Net, diffusers U-Net, diffusers ControlNetModel.from_unet) with every parameter random,
    the zero convs and the hint encoder's conv_out included (else the oracle compares zeros)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in [*unet.parameters(), *cn.parameters()]:
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg)
    ours.load_state_dict(unet.state_dict(), strict=True)
    return ours.eval(), unet.eval(), cn.eval()


def inputs(cfg, batch=2, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, h, w, generator=g), torch.tensor([5, 900])[:batch],
            torch.randn(batch, 7, cfg.context_dim, generator=g),
            torch.rand(batch, 3, 8 * h, 8 * w, generator=g))                   # hint: pixels, RGB in [0, 1]


def max_diff(a: Residuals, down, mid) -> float:
    assert len(a.down) == len(down)
    return max((x - y).abs().max().item() for x, y in zip([*a.down, a.mid], [*down, mid]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_is_diffusers_controlnet_and_from_unet_copies_the_encoder(name):
    cfg = CONFIGS[name]
    ours_unet, _, theirs = diffusers_pair(cfg)
    cn = ControlNet.from_unet(ours_unet)
    sd, their_sd = cn.state_dict(), theirs.state_dict()
    assert sd.keys() == their_sd.keys()
    assert all(sd[k].shape == their_sd[k].shape for k in sd)
    assert len(cn.controlnet_down_blocks) == cfg.num_skips
    assert [c.in_channels for c in cn.controlnet_down_blocks] == skip_channels(cfg)
    base = ours_unet.state_dict()
    encoder = [k for k in sd if not k.startswith("controlnet_")]
    assert all(torch.equal(sd[k], base[k]) for k in encoder)
    assert all(sd[k].data_ptr() != base[k].data_ptr() for k in encoder)    # a copy, not shared


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scale,guess", [(1.0, False), (0.6, False), (0.8, True)])
def test_residuals_equal_diffusers(name, scale, guess):
    cfg = CONFIGS[name]
    _, _, theirs = diffusers_pair(cfg)
    cn = ControlNet(cfg).eval()
    cn.load_state_dict(theirs.state_dict(), strict=True)
    x, t, ctx, hint = inputs(cfg)
    with torch.no_grad():
        got = cn(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess)
        down, mid = theirs(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess, return_dict=False)
    assert max(d.abs().max().item() for d in down) > 100 * TOL        # the residuals are not trivial
    assert max_diff(got, down, mid) <= TOL


def test_guess_mode_scales_are_diffusers_logspace():
    # SD1.5 has 12 skips: 13 factors from 0.1 to 1.0, the mid block gets the last (formats.md §4.4).
    s = guess_mode_scales(12, 0.5)
    torch.testing.assert_close(s, torch.logspace(-1, 0, 13) * 0.5, atol=0, rtol=0)
    assert s[0].item() == pytest.approx(0.05) and s[-1].item() == pytest.approx(0.5)
    assert s[1].item() == pytest.approx(0.5 * 0.1212, abs=1e-4)


def test_residuals_scale_linearly_and_guess_mode_per_skip():
    ours_unet, _, theirs = diffusers_pair(TINY)
    cn = ControlNet(TINY).eval()
    cn.load_state_dict(theirs.state_dict())
    x, t, ctx, hint = inputs(TINY)
    with torch.no_grad():
        one = cn(x, t, ctx, hint)
        half = cn(x, t, ctx, hint, conditioning_scale=0.5)
        guess = cn(x, t, ctx, hint, guess_mode=True)
    factors = guess_mode_scales(len(one.down))
    for a, b, g, f in zip(one.down, half.down, guess.down, factors):
        torch.testing.assert_close(b, a * 0.5, atol=0, rtol=0)
        torch.testing.assert_close(g, a * f, atol=0, rtol=0)
    torch.testing.assert_close(guess.mid, one.mid, atol=0, rtol=0)


def test_fresh_controlnet_changes_nothing():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    cn = ControlNet.from_unet(unet)
    x, t, ctx, hint = inputs(TINY)
    with torch.no_grad():
        res = cn(x, t, ctx, hint, conditioning_scale=1.7)
        assert all(torch.count_nonzero(d) == 0 for d in res.down) and torch.count_nonzero(res.mid) == 0
        assert torch.equal(unet(x, t, ctx, *res), unet(x, t, ctx))
    zero = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    assert all(torch.count_nonzero(p) == 0 for conv in zero for p in conv.parameters())
    # ... while the rest of the hint encoder is initialised (trainable from step one)
    assert all(torch.count_nonzero(b.weight) > 0 for b in cn.controlnet_cond_embedding.blocks)


def test_from_lora_unet_copies_base_weights_and_is_trainable():
    torch.manual_seed(0)
    plain = UNet(TINY).eval()
    lorad = UNet(TINY).eval()
    lorad.load_state_dict(plain.state_dict())
    add_lora(lorad, LoraSpec(rank=4, targets="full"), "style")
    with torch.no_grad():
        for layer in lora_layers(lorad).values():
            layer.lora_B["style"].weight.normal_(0, 0.1)        # a LoRA that does something
    cn, ref = ControlNet.from_unet(lorad), ControlNet.from_unet(plain)
    assert not lora_layers(cn)
    assert cn.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in cn.state_dict().items()
               if not k.startswith("controlnet_"))
    assert cn.base_fingerprint == ref.base_fingerprint         # the base, the LoRA looked through
    assert all(p.requires_grad for p in cn.parameters())       # the base was frozen by add_lora
    assert not any(p.requires_grad for n, p in lorad.named_parameters() if ".lora_" not in n)


def test_lora_unet_plus_controlnet_equals_diffusers():
    # Our U-Net with an active LoRA + our ControlNet's residuals == diffusers' U-Net with the same LoRA
    # (peft on both sides) + diffusers' ControlNetModel with our weights.
    from peft import LoraConfig
    ours_unet, theirs_unet, theirs_cn = diffusers_pair(TINY)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    add_lora(ours_unet, LoraSpec(rank=4, alpha=8, targets="attn"), "style")
    theirs_unet.add_adapter(config, adapter_name="style")
    cn = ControlNet.from_unet(ours_unet).eval()
    cn.load_state_dict({k: v for k, v in theirs_cn.state_dict().items() if k.startswith("controlnet_")},
                       strict=False)
    g = torch.Generator().manual_seed(3)
    ours_layers, their_layers = lora_layers(ours_unet), lora_layers(theirs_unet)
    with torch.no_grad():
        for path, layer in ours_layers.items():
            w = torch.randn(layer.lora_B["style"].weight.shape, generator=g) * 0.1
            layer.lora_B["style"].weight.copy_(w)
            their_layers[path].lora_B["style"].weight.copy_(w)
            their_layers[path].lora_A["style"].weight.copy_(layer.lora_A["style"].weight)
        theirs_cn.load_state_dict(cn.state_dict(), strict=True)
        x, t, ctx, hint = inputs(TINY)
        res = cn(x, t, ctx, hint, conditioning_scale=0.9)
        got = ours_unet(x, t, ctx, *res)
        down, mid = theirs_cn(x, t, ctx, hint, conditioning_scale=0.9, return_dict=False)
        want = theirs_unet(x, t, ctx, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
        without_control = ours_unet(x, t, ctx)
    assert (got - without_control).abs().max() > 100 * TOL
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_multi_controlnet_sums_like_diffusers():
    _, _, a = diffusers_pair(TINY, seed=0)
    _, _, b = diffusers_pair(TINY, seed=1)
    ours = []
    for theirs in (a, b):
        cn = ControlNet(TINY).eval()
        cn.load_state_dict(theirs.state_dict())
        ours.append(cn)
    multi = MultiControlNet(ours)
    x, t, ctx, h1 = inputs(TINY, seed=1)
    h2 = inputs(TINY, seed=2)[3]
    with torch.no_grad():
        got = multi(x, t, ctx, [h1, h2], [0.7, 1.3])
        down, mid = MultiControlNetModel([a, b])(x, t, ctx, [h1, h2], [0.7, 1.3], return_dict=False)
        single = [cn(x, t, ctx, h, s) for cn, h, s in zip(ours, (h1, h2), (0.7, 1.3))]
    assert max_diff(got, down, mid) <= TOL
    summed = sum_residuals(single)
    assert all(torch.equal(p, q) for p, q in zip(summed.down, got.down)) and torch.equal(summed.mid, got.mid)
    with pytest.raises(ValueError, match="2 ControlNets need 2 hints"):
        multi(x, t, ctx, [h1], 1.0)
    with pytest.raises(ValueError, match="different U-Nets"):
        MultiControlNet([ours[0], ControlNet(SD15ISH)])


B, H, W = 2, 8, 8  # hints 64x64
BAD_HINTS = [
    ("wrong size", torch.rand(B, 3, 32, 32), r"must be \(B=2 or 1, 3, 64, 64\).*found \(2, 3, 32, 32\)"),
    ("latent size", torch.rand(B, 3, H, W), "that is the latent size"),
    ("one channel", torch.rand(B, 1, 64, 64), "repeat it to 3 channels"),
    ("channels last", torch.rand(B, 64, 64, 3), "channels-last"),
    ("no batch", torch.rand(3, 64, 64), r"found \(3, 64, 64\); add the batch"),
    ("other batch", torch.rand(3, 3, 64, 64), r"B=2 or 1.*found \(3, 3, 64, 64\)"),
    ("uint8", torch.randint(0, 255, (B, 3, 64, 64), dtype=torch.uint8), "floats in \\[0, 1\\].*uint8"),
    ("0..255", torch.rand(B, 3, 64, 64) * 255, r"lie in \[0, 1\]; found \[.*, 25\d.*\].*divide by 255"),
    ("-1..1", torch.rand(B, 3, 64, 64) * 2 - 1, r"found \[-.*\].*\(hint \+ 1\) / 2"),
    ("NaN", torch.full((B, 3, 64, 64), float("nan")), "NaN"),
    ("not a tensor", [[0.0]], "found a list"),
]


@pytest.mark.parametrize("case,hint,message", BAD_HINTS, ids=[c[0] for c in BAD_HINTS])
def test_bad_hints_fail_naming_expected_and_found(case, hint, message):
    cn = ControlNet(TINY)
    x, t, ctx, _ = inputs(TINY, batch=B, h=H, w=W)
    with pytest.raises(ValueError, match=message):
        cn(x, t, ctx, hint)


def test_hint_size_follows_the_hint_encoder_strides():
    cn = ControlNet(TINY, hint_widths=(16, 32))          # one stride-2 conv: pixels = 2x latents
    assert cn.controlnet_cond_embedding.downscale == 2
    x, t, ctx, _ = inputs(TINY, h=6, w=10)
    res = cn(x, t, ctx, torch.rand(2, 3, 12, 20))         # batch 1 hints broadcast too
    assert res.down[0].shape == (2, TINY.stages[0].channels, 6, 10)
    with pytest.raises(ValueError, match=r"\(B=2 or 1, 3, 12, 20\).*2x the latent size"):
        cn(x, t, ctx, torch.rand(1, 3, 48, 80))
    assert ControlNet(TINY).controlnet_cond_embedding.downscale == 8


def test_gradients_reach_every_controlnet_parameter_not_the_unet():
    torch.manual_seed(0)
    unet = UNet(TINY)
    unet.requires_grad_(False)
    cn = ControlNet.from_unet(unet)
    with torch.no_grad():                        # past step 0: zero convs no longer zero
        for conv in [*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.01)
    x, t, ctx, hint = inputs(TINY)
    grads = []
    for checkpointing in (False, True):          # the encoder blocks' activation checkpointing too
        cn.zero_grad()
        cn.set_gradient_checkpointing(checkpointing)
        unet(x, t, ctx, *cn(x, t, ctx, hint)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in cn.named_parameters() if p.grad is not None})
    assert grads[0].keys() == {n for n, _ in cn.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) for n in grads[0])
    assert all(p.grad is None for p in unet.parameters())


def test_a_peft_merged_lora_is_not_mistaken_for_the_base():
    unet = UNet(TINY)
    add_lora(unet, LoraSpec(rank=2))
    next(iter(lora_layers(unet).values())).merge()
    with pytest.raises(ValueError, match="merged by peft.*Unmerge them"):
        ControlNet.from_unet(unet)
