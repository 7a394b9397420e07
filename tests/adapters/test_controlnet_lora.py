"""Control-LoRA (Stability's layout): full rank reproduces the ControlNet, the key/shape contract, the size
report, diffusers' loader on our file, and clear failures on another base or a broken file."""
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterkit.adapters.control_lora import (
    MARKER,
    control_lora_tensors,
    load_control_lora,
    save_control_lora,
)
from adapterkit.adapters.controlnet import ControlNet
from adapterkit.adapters.controlnet_files import load_controlnet
from adapterkit.adapters.controlnet_keys import controlnet_key_map
from adapterkit.unet import CheckpointError, unet_fingerprint
from support.unets import SD15ISH, TINY, inputs, lowrank_trained
from support.unets import random_unet as base

TOL = 1e-5


def residual_diff(a: ControlNet, b: ControlNet, cfg=TINY) -> float:
    x, t, ctx, hint = inputs(cfg)
    with torch.no_grad():
        ra, rb = a(x, t, ctx, hint, 0.9), b(x, t, ctx, hint, 0.9)
    return max((p - q).abs().max().item() for p, q in zip([*ra.down, ra.mid], [*rb.down, rb.mid]))


@pytest.fixture(scope="module")
def tiny():
    unet = base()
    return unet, lowrank_trained(unet, rank=3)


def test_full_rank_reproduces_the_controlnet(tiny, tmp_path):
    unet, cn = tiny
    path = tmp_path / "cl.safetensors"
    report = save_control_lora(cn, unet, path, rank=10_000, dtype=None)
    assert report.max_error < 1e-5
    for back in (load_control_lora(path, unet), load_controlnet(path, unet)):     # auto-detected too
        assert back.base_fingerprint == cn.base_fingerprint and back.hint == cn.hint
        a, b = back.state_dict(), cn.state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
        assert residual_diff(back, cn) <= TOL


def test_rank_of_the_change_is_exact_and_smaller(tiny, tmp_path):
    unet, cn = tiny
    path = tmp_path / "cl3.safetensors"
    report = save_control_lora(cn, unet, path, rank=3, dtype=None)
    assert report.max_error < 1e-5 and residual_diff(load_control_lora(path, unet), cn) <= TOL
    tensors = load_file(path)
    assert report.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report.full_bytes == sum(t.numel() * t.element_size() for t in cn.state_dict().values())
    assert report.ratio > 3           # tiny: the hint encoder (full in both) is a large share
    errors = [save_control_lora(cn, unet, tmp_path / f"r{r}.safetensors", rank=r, dtype=None).max_error
              for r in (1, 2)]
    assert 0.1 < errors[1] < errors[0] < 1        # below the change's rank: lossy, less so with rank
    assert residual_diff(load_control_lora(tmp_path / "r1.safetensors", unet), cn) > 100 * TOL


def test_layout_is_stabilitys(tiny, tmp_path):
    unet, cn = tiny
    path = tmp_path / "cl.safetensors"
    save_control_lora(cn, unet, path, rank=2)                   # fp16, as Stability's files
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert tensors[MARKER].numel() == 0
    assert {t.dtype for k, t in tensors.items() if k != MARKER} == {torch.float16}
    names = controlnet_key_map(TINY)                            # diffusers -> lllyasviel names
    state = cn.state_dict()
    expected = {MARKER}
    for key, w in state.items():
        ldm = names[key]
        if key.startswith("controlnet_") or w.ndim < 2:
            expected.add(ldm)
            assert tensors[ldm].shape == w.shape
        else:
            stem = ldm.removesuffix(".weight")
            expected |= {f"{stem}.up", f"{stem}.down"}
            up, down = tensors[f"{stem}.up"], tensors[f"{stem}.down"]
            r = min(2, w.shape[0], w[0].numel())
            assert up.shape == (w.shape[0], r, *([1, 1] if w.ndim == 4 else []))
            assert down.shape == (r, *w.shape[1:])
    assert set(tensors) == expected
    assert "input_blocks.1.0.in_layers.2.down" in tensors and "input_hint_block.14.weight" in tensors
    assert "input_blocks.1.0.in_layers.2.bias" in tensors       # biases of adapted layers in full
    assert not any(k.startswith("control_model.") for k in tensors)
    assert md["modelspec.architecture"].endswith("/control-lora")
    assert md["adapterkit.base_fingerprint"] == unet_fingerprint(unet)


def test_unchanged_weights_are_left_out():
    unet = base()
    cn = ControlNet.from_unet(unet)                              # the encoder is the base's
    tensors, report = control_lora_tensors(cn, unet, rank=4)
    assert not any(k.endswith((".up", ".down")) for k in tensors)
    assert report.low_rank == 0 and report.unchanged == sum(p.ndim >= 2 for k, p in cn.state_dict().items()
                                                            if not k.startswith("controlnet_"))


def test_our_file_in_diffusers_load_lora_adapter():
    # diffusers hard-codes layers_per_block=2 (formats.md §4.5), hence SD1.5's structure; it drops the
    # biases of LoRA-adapted layers, so this ControlNet changes weights and new layers only.
    from diffusers import ControlNetModel, UNet2DConditionModel
    unet = base(SD15ISH)
    cn = lowrank_trained(unet, rank=2, biases=False)
    tensors, _ = control_lora_tensors(cn, unet, rank=2, dtype=None)
    d_unet = UNet2DConditionModel(**{k: v for k, v in SD15ISH.to_diffusers().items() if k[0] != "_"})
    d_unet.load_state_dict(unet.state_dict())
    theirs = ControlNetModel.from_unet(d_unet).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # peft: "additional target modules" (a diffusers quirk)
        theirs.load_lora_adapter(tensors, prefix=None)
    x, t, ctx, hint = inputs(SD15ISH)
    with torch.no_grad():
        down, mid = theirs(x, t, ctx, hint, conditioning_scale=0.9, return_dict=False)
        ours = cn(x, t, ctx, hint, 0.9)
    for a, b in zip([*ours.down, ours.mid], [*down, mid]):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_another_base_or_broken_file_fails_clearly(tiny, tmp_path):
    unet, cn = tiny
    path = tmp_path / "cl.safetensors"
    save_control_lora(cn, unet, path, rank=2, dtype=None)
    other = base(seed=7)
    with pytest.raises(ValueError, match=f"fingerprint {cn.base_fingerprint}.*{unet_fingerprint(other)}"):
        load_control_lora(path, other)
    with pytest.warns(UserWarning):
        load_control_lora(path, other, allow_other_base=True)
    with pytest.raises(CheckpointError, match=r"Control-LoRA for preset tiny \(.*\), but the U-Net is"):
        load_control_lora(path, base(SD15ISH))
    with pytest.raises(ValueError, match="made from the base U-Net with fingerprint"):
        save_control_lora(cn, other, tmp_path / "x.safetensors")      # deltas from the wrong base
    tensors, md = load_file(path), None
    with safe_open(path, "pt") as f:
        md = f.metadata()

    def attempt(t, message):
        save_file(t, tmp_path / "bad.safetensors", metadata=md)
        with pytest.raises(CheckpointError, match=message):
            load_control_lora(tmp_path / "bad.safetensors", unet)

    attempt({k: v for k, v in tensors.items() if k != "zero_convs.2.0.weight"},
            r"ControlNet layers missing from the file \(zero_convs.2.0.weight\)")
    attempt({**tensors, "input_blocks.9.9.up": torch.zeros(1)},
            r"name no ControlNet tensor \(input_blocks.9.9.up")
    attempt({k: v for k, v in tensors.items() if k != "input_blocks.1.0.in_layers.2.down"},
            "input_blocks.1.0.in_layers.2: has only .up")
    attempt({**tensors, "input_blocks.1.0.in_layers.2.down": torch.zeros(2, 5, 3, 3)}, "do not fit a weight")
    attempt({k: v for k, v in tensors.items() if k != MARKER}, "lacks the 'lora_controlnet' marker")


def test_low_rank_training_starts_as_the_encoder_copy_and_merges_exactly(tiny):
    """train_as_low_rank: at init the ControlNet is unchanged (up = 0) and only the factors, the 1-D
    encoder tensors and the added layers train; merged_controlnet computes W_base + up @ down into a
    plain copy (whose Control-LoRA at that rank is exact) and leaves the trained one working."""
    from adapterkit.adapters.control_lora import merged_controlnet, train_as_low_rank
    from adapterkit.adapters.controlnet import base_encoder_state
    unet, _ = tiny
    torch.manual_seed(0)
    plain, trained = ControlNet.from_unet(unet).eval(), ControlNet.from_unet(unet).eval()
    trained.load_state_dict(plain.state_dict())
    wrapped = train_as_low_rank(trained, 3)
    assert residual_diff(plain, trained) == 0.0
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert all(n.endswith((".up", ".down")) or p.ndim == 1 or n.startswith("controlnet_")
               for n, p in trained.named_parameters() if n in names)
    assert len([n for n in names if n.endswith(".up")]) == len(wrapped) > 0

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n.endswith(".up") or n.startswith("controlnet_"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    merged = merged_controlnet(trained, base_encoder_state(unet))
    assert set(merged.state_dict()) == set(plain.state_dict())
    assert residual_diff(merged, trained) <= TOL                   # the copy computes what training does
    _, report = control_lora_tensors(merged, unet, 3, dtype=None)
    assert report.low_rank == len(wrapped) and report.max_error <= 1e-5
    assert residual_diff(merged, trained) <= TOL                   # the trained one still works after
