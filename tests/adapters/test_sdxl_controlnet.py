"""The SDXL ControlNet (issue 16, item 1) against diffusers on the reduced SDXL geometry (SDXL_TINY):
`ControlNetModel.from_unet` of the same U-Net has our state dict (encoder clone with the text_time
added embedding, 9 zero convs + mid, hint encoder) and gives our residuals with the pooled text and
size/crop ids; the U-Net with those residuals is diffusers' U-Net with them; guess mode, scales, a
LoRA'd base, zero-init identity, and an SD1.x ControlNet on an SDXL U-Net (and back) refused by name."""
import functools

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from adapterkit.adapters.controlnet import ControlNet, MultiControlNet, check_base, skip_channels
from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.unet import Conditioning, UNet
from support.unets import SD15ISH, SDXL_TINY, random_unet

TOL = 1e-5


@functools.cache
def diffusers_pair(seed=0):
    """(our U-Net, diffusers U-Net, diffusers' ControlNetModel.from_unet as made, the same perturbed):
    every parameter random, the zero convs and the hint encoder's conv_out included. Cached: no test
    changes them."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{k: v for k, v in SDXL_TINY.to_diffusers().items() if k[0] != "_"})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    fresh = ControlNetModel.from_unet(unet)
    trained = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(SDXL_TINY)
    ours.load_state_dict(unet.state_dict(), strict=True)
    return ours.eval(), unet.eval(), fresh.eval(), trained.eval()


def xl_inputs(batch=2, h=16, w=16, seed=1):
    """Latents, timesteps, SDXL conditioning (context, pooled text, per-row size/crop ids), hint."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g)
    ctx = torch.randn(batch, 7, SDXL_TINY.context_dim, generator=g)
    pooled = torch.randn(batch, SDXL_TINY.pooled_dim, generator=g)
    ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 64, 832, 1216]])[:batch]
    hint = torch.rand(batch, 3, 8 * h, 8 * w, generator=g)
    return x, torch.tensor([5, 900])[:batch], Conditioning(ctx, pooled=pooled, time_ids=ids), hint


def added(cond: Conditioning) -> dict:
    return {"text_embeds": cond.pooled, "time_ids": cond.time_ids.float()}


def test_from_unet_is_diffusers_from_unet_with_the_added_embedding_and_nine_zero_convs():
    ours_unet, _, fresh, _ = diffusers_pair()
    cn = ControlNet.from_unet(ours_unet)
    sd, theirs = cn.state_dict(), fresh.state_dict()
    assert sd.keys() == theirs.keys()
    assert any(k.startswith("add_embedding.") for k in sd)
    assert len(cn.controlnet_down_blocks) == SDXL_TINY.num_skips == 9
    assert [c.in_channels for c in cn.controlnet_down_blocks] == skip_channels(SDXL_TINY) == \
        [b.in_channels for b in fresh.controlnet_down_blocks]
    for k in sd:      # the encoder clone and the zero-initialised layers, value for value
        if not k.startswith("controlnet_cond_embedding.") or "conv_out" in k:
            assert torch.equal(sd[k], theirs[k]), k


@pytest.mark.parametrize("scale,guess", [(1.0, False), (0.5, False), (0.8, True)])
def test_residuals_equal_diffusers_with_added_cond_kwargs(scale, guess):
    _, _, _, theirs = diffusers_pair()
    cn = ControlNet(SDXL_TINY).eval()
    cn.load_state_dict(theirs.state_dict(), strict=True)
    x, t, cond, hint = xl_inputs()
    with torch.no_grad():
        got = cn(x, t, cond, hint, conditioning_scale=scale, guess_mode=guess)
        down, mid = theirs(x, t, cond.context, hint, conditioning_scale=scale, guess_mode=guess,
                           added_cond_kwargs=added(cond), return_dict=False)
    assert len(got.down) == len(down) == 9
    assert max(d.abs().max().item() for d in down) > 100 * TOL          # not trivially zero
    for a, b in zip([*got.down, got.mid], [*down, mid]):
        assert (a - b).abs().max().item() <= TOL


def test_the_size_ids_and_pooled_text_reach_the_residuals():
    _, _, _, theirs = diffusers_pair()
    cn = ControlNet(SDXL_TINY).eval()
    cn.load_state_dict(theirs.state_dict(), strict=True)
    x, t, cond, hint = xl_inputs()
    other = Conditioning(cond.context, pooled=cond.pooled, time_ids=cond.time_ids.flip(0))
    with torch.no_grad():
        a, b = cn(x, t, cond, hint), cn(x, t, other, hint)
    assert (a.mid - b.mid).abs().max() > 1e-4


def test_unet_with_our_residuals_is_diffusers_unet_with_them():
    ours_unet, d_unet, _, theirs = diffusers_pair()
    cn = ControlNet(SDXL_TINY).eval()
    cn.load_state_dict(theirs.state_dict(), strict=True)
    x, t, cond, hint = xl_inputs()
    with torch.no_grad():
        res = cn(x, t, cond, hint, conditioning_scale=0.7)
        ours = ours_unet(x, t, cond, *res)
        plain = ours_unet(x, t, cond)
        ref = d_unet(x, t, cond.context, added_cond_kwargs=added(cond),
                     down_block_additional_residuals=res.down, mid_block_additional_residual=res.mid).sample
    assert (ours - plain).abs().max() > 100 * TOL
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_fresh_controlnet_changes_nothing_and_two_sum():
    unet = random_unet(SDXL_TINY)
    cn = ControlNet.from_unet(unet).eval()
    x, t, cond, hint = xl_inputs()
    with torch.no_grad():
        res = cn(x, t, cond, hint, conditioning_scale=1.3, guess_mode=True)
        assert all(torch.count_nonzero(d) == 0 for d in [*res.down, res.mid])
        assert torch.equal(unet(x, t, cond, *res), unet(x, t, cond))
    _, _, _, theirs = diffusers_pair()
    a, b = ControlNet(SDXL_TINY).eval(), ControlNet(SDXL_TINY).eval()
    a.load_state_dict(theirs.state_dict())
    b.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for p in b.controlnet_down_blocks.parameters():
            p.mul_(-0.5)
        both = MultiControlNet([a, b])(x, t, cond, [hint, hint.flip(-1)], [1.0, 0.5])
        one, two = a(x, t, cond, hint), b(x, t, cond, hint.flip(-1), 0.5)
    for s, p, q in zip([*both.down, both.mid], [*one.down, one.mid], [*two.down, two.mid]):
        torch.testing.assert_close(s, p + q, atol=TOL, rtol=0)


def test_a_loraed_sdxl_unet_gives_the_base_encoder():
    unet = random_unet(SDXL_TINY)
    plain = ControlNet.from_unet(unet).state_dict()
    add_lora(unet, LoraSpec(rank=4, alpha=4, targets="attn-ff"))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    cn = ControlNet.from_unet(unet).state_dict()
    assert cn.keys() == plain.keys()
    assert all(torch.equal(cn[k], plain[k]) for k in cn if not k.startswith("controlnet_cond_embedding"))


def test_an_sd1_controlnet_on_an_sdxl_unet_and_back_is_refused_naming_both_families():
    xl, sd1 = random_unet(SDXL_TINY), random_unet(SD15ISH)
    with pytest.raises(ValueError, match=r"An SD1\.x ControlNet cannot steer an SDXL U-Net"):
        check_base(ControlNet.from_unet(sd1), xl)
    with pytest.raises(ValueError, match=r"An SDXL ControlNet cannot steer an SD1\.x U-Net"):
        check_base(ControlNet.from_unet(xl), sd1)


def test_a_hint_of_the_wrong_size_or_range_is_refused():
    cn = ControlNet.from_unet(random_unet(SDXL_TINY)).eval()
    x, t, cond, hint = xl_inputs()
    with pytest.raises(ValueError, match=r"the hint must be \(B=2 or 1, 3, 128, 128\).*latent size"):
        cn(x, t, cond, hint[..., ::8, ::8])
    with pytest.raises(ValueError, match="divide by 255"):
        cn(x, t, cond, hint * 255)
    with pytest.raises(ValueError, match="pooled"):                   # SDXL conditioning is required
        cn(x, t, cond.context, hint)
