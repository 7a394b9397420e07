"""Whole SDXL single-file checkpoints (issue 15 item 4): U-Net, VAE, CLIP ViT-L under
conditioner.embedders.0.transformer. and the OpenCLIP tower under conditioner.embedders.1.model. (fused
in_proj, transposed text_projection). Oracles as in test_checkpoint_file.py."""
import pytest
import torch

from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.checkpoint_file import write_checkpoint
from adapterkit.train.pipeline.ldm_names import openclip_names, openclip_tower
from support.checkpoint_rules import assert_same, check_rules, parts_of
from support.pipelines import build_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def test_sdxl_checkpoint_loads_in_diffusers_and_in_our_reader(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = load_base(sdxl)
    f = write_checkpoint(tmp_path / "xl.safetensors", *parts_of(base), prediction_type="v_prediction")
    check_rules(f, base, "sdxl")
    theirs = StableDiffusionXLPipeline.from_single_file(str(f), config=str(sdxl), local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same(getattr(theirs, part), getattr(reference, part))
    back = load_base(f, tokenizer=sdxl, config_dir=sdxl)
    for ours, loaded in zip(base.text, back.text):
        assert_same(loaded.model, ours.model)
    assert_same(back.vae, base.vae)
    assert back.prediction_type == "v_prediction"            # modelspec.prediction_type, read back


def test_openclip_tables_are_one_table_read_both_ways(sdxl):
    base = load_base(sdxl)
    state = {k: v for k, v in base.text[1].model.state_dict().items() if not k.endswith("position_ids")}
    tower = openclip_tower(state)
    assert tower["text_projection"].shape == state["text_projection.weight"].T.shape
    back, unplaced = openclip_names(tower, base.text[1].width)
    assert not unplaced and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
