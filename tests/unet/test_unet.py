"""The U-Net against diffusers' UNet2DConditionModel on the same random weights (the oracle), and its
own invariants: strict key equality, residual hooks, encoder clone, gradient checkpointing."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from adapterkit.unet import PRESETS, Stage, UNet, UNetConfig

TOL = 1e-5


def reduced(name: str, width: int = 32) -> UNetConfig:
    """A preset with its widths divided so that the first stage has `width` channels.

    Everything that makes the preset what it is stays: stage count, attention pattern, linear vs
    conv projection, layers per block; the head rule too (SD1.x: 8 heads, SD2.x: fixed head width).
    """
    cfg = PRESETS[name]
    scale = cfg.stages[0].channels // width
    sd2_like = cfg.linear_projection
    stages = tuple(Stage(s.channels // scale, s.attention,
                         heads=(s.channels // scale) // 8 if sd2_like else s.heads, depth=s.depth)
                   for s in cfg.stages)
    return cfg.replace(stages=stages, context_dim=48)


CONFIGS = {"tiny": PRESETS["tiny"], "sd15-reduced": reduced("sd15"), "sd21-reduced": reduced("sd21"),
           "depth2": reduced("sd21").replace(stages=(Stage(32, heads=4, depth=2), Stage(64, heads=8),
                                                     Stage(64, attention=False, heads=8)))}


def pair(cfg: UNetConfig, seed: int = 0):
    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    # Randomise every parameter: diffusers zero-initialises nothing, but a GroupNorm at weight 1
    # bias 0 would hide a swapped norm, so perturb them all.
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def inputs(cfg: UNetConfig, batch=2, h=16, w=16, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([3, 871])[:batch]
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_equal_diffusers(name):
    cfg = CONFIGS[name]
    ours = UNet(cfg).state_dict()
    theirs = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"}).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_sd15_preset_matches_the_real_parameter_count():
    # formats.md §1.1: SD1.5's U-Net has 686 tensors and 859,520,964 parameters.
    with torch.device("meta"):
        model = UNet(PRESETS["sd15"])
    sd = model.state_dict()
    assert len(sd) == 686
    assert sum(p.numel() for p in sd.values()) == 859_520_964


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", [(16, 16), (13, 22)])  # odd sizes exercise the upsampler's target size
def test_forward_matches_diffusers(name, size):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    x, t, ctx = inputs(cfg, h=size[0], w=size[1])
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["tiny", "sd15-reduced"])
def test_forward_with_residuals_matches_diffusers(name):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        skips = ours.encode(x, t, ctx).skips
        assert len(skips) == cfg.num_skips
        down = tuple(torch.randn_like(s) for s in skips)
        mid = torch.randn_like(ours.encode(x, t, ctx).mid)
        down_copy = tuple(d.clone() for d in down)
        expected = theirs(x, t, ctx, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        got = ours(x, t, ctx, down, mid)
        plain = ours(x, t, ctx)
    assert (got - expected).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-3            # the residuals did something
    assert all(torch.equal(a, b) for a, b in zip(down, down_copy))  # and were not mutated


@pytest.mark.parametrize("name", ["tiny", "sd21-reduced"])
def test_input_gradients_match_diffusers(name):
    cfg = CONFIGS[name]
    ours, theirs = pair(cfg)
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    x, t, ctx = inputs(cfg)
    grads = []
    for out in (lambda *a: theirs(*a).sample, lambda *a: ours(*a)):
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        (out(xi, t, ci) ** 2).mean().backward()
        grads.append((xi.grad, ci.grad))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


def test_scalar_and_float_timesteps():
    cfg = CONFIGS["tiny"]
    ours, theirs = pair(cfg)
    x, _, ctx = inputs(cfg)
    with torch.no_grad():
        for t in (500, 499.5, torch.tensor(500)):
            assert (ours(x, t, ctx) - theirs(x, t, ctx).sample).abs().max().item() <= TOL


def test_clone_encoder_reproduces_features_and_shares_nothing():
    cfg = CONFIGS["sd15-reduced"]
    model, _ = pair(cfg)
    clone = model.clone_encoder()
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        a, b = model.encode(x, t, ctx), clone(x, t, ctx)
    assert len(a.skips) == len(b.skips) == cfg.num_skips
    assert all(torch.equal(s, r) for s, r in zip(a.skips, b.skips))
    assert torch.equal(a.mid, b.mid) and torch.equal(a.emb, b.emb)
    ours_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ours_ptrs & {p.data_ptr() for p in clone.parameters()}
    # Names are the encoder subset of the U-Net's, so a ControlNet can be initialised by name.
    assert set(clone.state_dict()) < set(model.state_dict())
    assert not any(k.startswith(("up_blocks", "conv_out", "conv_norm_out")) for k in clone.state_dict())
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert torch.equal(model.encode(x, t, ctx).mid, a.mid)     # editing the clone leaves the base alone


@pytest.mark.parametrize("frozen_input", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(frozen_input):
    cfg = CONFIGS["sd15-reduced"]
    model, _ = pair(cfg)
    model.train()
    # The LoRA pattern: frozen base, a few trainable tensors inside the blocks, inputs without grad.
    model.requires_grad_(False)
    trainable = [m.to_q.weight for m in model.modules() if hasattr(m, "to_q")][:3]
    trainable += [model.up_blocks[1].resnets[0].conv1.weight]
    for p in trainable:
        p.requires_grad_(True)
    x, t, ctx = inputs(cfg)
    if not frozen_input:
        x.requires_grad_(True)

    def grads(ckpt: bool):
        model.set_gradient_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        model(x, t, ctx).pow(2).mean().backward()
        return [p.grad.clone() for p in trainable]

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bad_inputs_fail_clearly():
    cfg = CONFIGS["tiny"]
    model = UNet(cfg)
    x, t, ctx = inputs(cfg)
    with pytest.raises(ValueError, match="sample must be"):
        model(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, ctx[..., :5])
    with pytest.raises(ValueError, match="down residuals"):
        model(x, t, ctx, down_residuals=(x,))


def test_config_round_trips_through_diffusers_dict():
    for cfg in list(CONFIGS.values()) + list(PRESETS.values()):
        assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert UNetConfig.from_dict(PRESETS["sd21"].to_dict()) == PRESETS["sd21"]


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "unsupported down block type"),
    ({"attention_head_dim": [8, 8]}, "attention_head_dim has 2 entries"),
])
def test_unsupported_diffusers_configs_are_refused(change, message):
    cfg = PRESETS["sd15"].to_diffusers() | change
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(cfg)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        UNetConfig(stages=(Stage(48),))
    with pytest.raises(ValueError, match="not divisible by heads"):
        UNetConfig(stages=(Stage(64, heads=3),), norm_groups=32)
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({"stagez": []})


def test_adapter_wrapped_conv_projection_is_not_bypassed():
    """proj_in/proj_out run as a linear on tokens when they are plain 1x1 convs; a LoRA-wrapped one
    must still go through its wrapper (peft replaces the module)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = CONFIGS["sd15-reduced"]
    model, _ = pair(cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        base = model(x, t, ctx)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["proj_in", "proj_out"]), model)
    wrapped = [m for n, m in model.named_modules() if n.endswith(("proj_in", "proj_out"))]
    assert wrapped and all(type(m) is not torch.nn.Conv2d for m in wrapped)
    with torch.no_grad():
        assert (model(x, t, ctx) - base).abs().max() < TOL   # B = 0: still the base (conv vs linear path)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        changed = model(x, t, ctx)
    assert (changed - base).abs().max() > 1e-3
