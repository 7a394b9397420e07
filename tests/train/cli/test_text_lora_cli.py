"""The commands take LoRAs with a text-encoder part (issue 17 item 1): `sample` applies it and says so,
`merge --base PIPELINE` merges it into the text encoder and writes a whole pipeline folder that loads
in diffusers and in ours and equals the unmerged LoRA, and a merge that cannot hold it says what to do."""
import pytest
import torch

from adapterkit.adapters.lora import LoraSpec, add_lora, lora_layers
from adapterkit.adapters.lora_files import save_lora
from adapterkit.adapters.lora_text import TextLoraSpec, add_text_lora
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_text
from adapterkit.train.pipeline.loras import load_lora_on_base
from support.cli import out, run
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")
PROMPTS = ["a red circle", "a blue star"]


@pytest.fixture(scope="module")
def te_lora(pipeline, tmp_path_factory):
    """A kohya file with U-Net and text-encoder modules, lora_up random."""
    base = load_base(pipeline)
    add_lora(base.unet, LoraSpec(rank=4, alpha=4, targets="attn"), "s")
    add_text_lora(base.text_encoder, TextLoraSpec(rank=4, alpha=4), "s")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (base.unet, base.text_encoder):
            for layer in lora_layers(model).values():
                layer.lora_B["s"].weight.copy_(torch.randn(layer.lora_B["s"].weight.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(base.unet, path, name="s", text_encoders={"text_encoder": base.text_encoder})
    return path


def test_sample_applies_the_text_encoder_part_and_says_so(pipeline, te_lora, tmp_path, capsys):
    code, text, _ = run(["sample", "--base", pipeline, "--lora", f"{te_lora}:0.8", "--prompt", "a red shape",
                         "--steps", "1", "--seed", "0", "--compare", "--device", "cpu",
                         "-o", tmp_path / "g.png"], capsys)
    assert code == 0 and "lora0: style.safetensors x0.8:" in text
    assert "U-Net modules" in text and "text_encoder 6 modules" in text      # 1 layer: q k v out fc1 fc2


def test_merge_into_a_pipeline_folder_merges_the_text_encoder(pipeline, te_lora, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    dst = tmp_path / "merged"
    code, text, _ = run(["merge", "--base", pipeline, te_lora, "-o", dst], capsys)
    assert code == 0 and "text_encoder layers" in text and "pipeline folder" in text
    merged = load_base(dst)
    unmerged = load_base(pipeline)
    load_lora_on_base(unmerged, te_lora, "lora0")
    plain = load_base(pipeline)
    ours, want = encode_text(merged, PROMPTS).context, encode_text(unmerged, PROMPTS).context
    assert (ours - want).abs().max() < 1e-5 * want.abs().max()
    assert (encode_text(plain, PROMPTS).context - want).abs().max() > 1e-3 * want.abs().max()
    assert (out(merged.unet) - out(unmerged.unet)).abs().max() < 1e-5
    pipe = StableDiffusionPipeline.from_pretrained(dst, local_files_only=True)        # a whole pipeline
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert (theirs - want).abs().max() < 1e-5 * want.abs().max()


def test_merge_that_cannot_hold_the_text_part_says_what_to_do(pipeline, te_lora, tmp_path, capsys):
    """A U-Net-only output has no place for the text part: refused, saying what to do (a whole
    checkpoint, --layout ldm without --unet-only, holds it: tests/adapters/test_checkpoint_merge.py)."""
    code, _, err = run(["merge", "--base", pipeline, te_lora, "--layout", "ldm", "--unet-only", "-o",
                        tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "text-encoder modules" in err and "--allow-unmatched" in err
    assert not (tmp_path / "m.safetensors").exists()
    code, _, _ = run(["merge", "--base", pipeline, te_lora, "--layout", "ldm", "--unet-only",
                      "--allow-unmatched", "-o", tmp_path / "m.safetensors"], capsys)
    assert code == 0 and (tmp_path / "m.safetensors").is_file()                # the U-Net part alone
