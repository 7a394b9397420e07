"""Whole single-file checkpoints (issue 15 item 4): U-Net + VAE + text encoder(s) in the names A1111 and
ComfyUI read, written by train/pipeline/checkpoint_file.py.

Oracles: diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.from_single_file, offline with the
pipeline folder as `config=`, must rebuild every part with our weights; the key rules of the two clients,
re-derived from their sources in support/checkpoint_rules.py, must consume every key written and find
every VAE and text-encoder tensor they need; our own reader (load_base on the file) must round-trip.
"""
import pytest

import adapterkit.unet.weights as weights
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.checkpoint_file import write_checkpoint
from adapterkit.unet import PRESETS, Stage, UNetConfig
from support.checkpoint_rules import assert_same, check_rules, file_shapes, parts_of
from support.pipelines import build_tiny_pipeline


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd1"), PRESETS["tiny"])


# SD2's layout (linear proj_in/out, no added embedding) at a small width.
SD2_LIKE = UNetConfig(stages=(Stage(32, attention=False, heads=1), Stage(64, heads=1)), layers_per_block=1,
                      context_dim=32, linear_projection=True, sample_size=16)


def test_sd1_checkpoint_loads_in_diffusers_and_in_our_reader(sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = load_base(sd1)
    f = write_checkpoint(tmp_path / "sd1.safetensors", *parts_of(base))
    check_rules(f, base, "sd1")
    theirs = StableDiffusionPipeline.from_single_file(str(f), config=str(sd1), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    reference = StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        assert_same(getattr(theirs, part), getattr(reference, part))
    back = load_base(f, tokenizer=sd1, config_dir=sd1)
    assert_same(back.unet, base.unet)
    assert_same(back.vae, base.vae)
    assert_same(back.text[0].model, base.text[0].model)


def test_sd2_checkpoint_holds_an_openclip_tower_diffusers_reads(tmp_path):
    """SD2.x: the text encoder as OpenCLIP (fused in_proj) under cond_stage_model.model.; diffusers'
    folder encoder has no projection, so the file has none (both clients read the tower's hidden states).
    A miniature (context 32): A1111 tells SD2 by a 1024-wide in_proj, so the family is not asserted."""
    from diffusers import StableDiffusionPipeline

    folder = build_tiny_pipeline(tmp_path, SD2_LIKE)
    base = load_base(folder, prediction_type="epsilon")
    assert base.family.name == "tiny" and base.text[0].spec.openclip        # SD2's layout and rows
    f = write_checkpoint(tmp_path / "sd2.safetensors", *parts_of(base))
    check_rules(f, base, None)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in file_shapes(f)
    theirs = StableDiffusionPipeline.from_single_file(str(f), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for part in ("unet", "vae", "text_encoder"):
        assert_same(getattr(theirs, part), getattr(reference, part))


def test_a_failed_write_leaves_the_previous_file(sd1, tmp_path, monkeypatch):
    base = load_base(sd1)
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous")

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(weights, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(target, *parts_of(base))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
