"""`adapterkit merge --base B LORA --layout ldm -o one.safetensors`: a whole checkpoint (issue 15 item 4).

The merged file must load in diffusers' from_single_file (offline, the pipeline folder as config=) with
U-Net and text encoder(s) equal to our own merge of the same LoRA (merge_loras with the text encoders)
and the VAE equal to the base's; a single-file base gives the same file; a U-Net-only base is refused
unless --unet-only; a failed merge writes nothing.
"""
import pytest
import torch
from safetensors import safe_open

from adapterkit.adapters.lora import Lora, LoraModule
from adapterkit.adapters.lora_files import base_fingerprint, base_metadata, write_lora
from adapterkit.adapters.lora_keys import layer_paths, text_layer_paths
from adapterkit.adapters.merge import merge_loras
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.checkpoint_file import write_checkpoint
from adapterkit.unet import save_unet
from support.checkpoint_rules import assert_same, check_rules, parts_of
from support.cli import run
from support.pipelines import build_tiny_sdxl_pipeline


def random_lora(base, seed: int = 1) -> Lora:
    """Rank-2 modules on every U-Net attention projection and every text-encoder Linear but the projection."""
    g = torch.Generator().manual_seed(seed)
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    layers = {p: m for p, m in layer_paths(base.unet).items() if p.endswith(attention)}
    for part in base.text:
        layers |= {p: m for p, m in text_layer_paths(part.spec.folder, part.model).items()
                   if not p.endswith("text_projection")}
    modules = {p: LoraModule(torch.randn(2, m.weight.shape[1], generator=g) * 0.1,
                             torch.randn(m.weight.shape[0], 2, generator=g) * 0.1, 1.0)
               for p, m in layers.items()}
    return Lora(modules, base_metadata(base.unet.config, base_fingerprint(base.unet)))


def merged_reference(folder, lora: Lora):
    base = load_base(folder)
    merge_loras(base.unet, [(lora, 0.7)], text_encoders={p.spec.folder: p.model for p in base.text})
    return base


def keys_of(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def sd1_lora(lora_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "l.safetensors"
    lora = random_lora(load_base(lora_pipeline))
    write_lora(path, lora)
    return path, lora


def test_sd1_merge_is_a_whole_checkpoint_with_the_merged_text_encoder(lora_pipeline, sd1_lora, tmp_path,
                                                                       capsys):
    from diffusers import StableDiffusionPipeline

    path, lora = sd1_lora
    out = tmp_path / "merged.safetensors"
    code, text, err = run(["merge", "--base", lora_pipeline, f"{path}:0.7", "--layout", "ldm", "-o", out],
                          capsys)
    assert code == 0, err
    assert "whole checkpoint (U-Net, VAE, text_encoder)" in text and "text encoder" in text
    want, plain = merged_reference(lora_pipeline, lora), load_base(lora_pipeline)
    check_rules(out, want, None)
    theirs = StableDiffusionPipeline.from_single_file(str(out), config=str(lora_pipeline),
                                                      local_files_only=True, safety_checker=None,
                                                      requires_safety_checker=False)
    assert_same(theirs.unet, want.unet)          # diffusers and ours share the U-Net's names
    for loaded, ours in ((theirs.text_encoder, want.text[0].model), (theirs.vae, plain.vae)):
        sa, sb = loaded.state_dict(), ours.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
    moved = plain.text[0].model.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in want.text[0].model.state_dict().items())


def test_a_single_file_base_gives_the_same_checkpoint(lora_pipeline, sd1_lora, tmp_path, capsys):
    path, _ = sd1_lora
    single = write_checkpoint(tmp_path / "base.safetensors", *parts_of(load_base(lora_pipeline)))
    a, b = tmp_path / "from_folder.safetensors", tmp_path / "from_file.safetensors"
    assert run(["merge", "--base", lora_pipeline, f"{path}:0.7", "--layout", "ldm", "-o", a], capsys)[0] == 0
    code, _, err = run(["merge", "--base", single, f"{path}:0.7", "--layout", "ldm", "-o", b,
                        "--config-dir", lora_pipeline], capsys)
    assert code == 0, err
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


def test_a_unet_only_base_is_refused_unless_unet_only(lora_pipeline, sd1_lora, tmp_path, capsys):
    path, _ = sd1_lora
    unet_folder = tmp_path / "unet"
    save_unet(load_base(lora_pipeline).unet, unet_folder)
    out = tmp_path / "m.safetensors"
    code, _, err = run(["merge", "--base", unet_folder, path, "--layout", "ldm", "-o", out], capsys)
    assert code != 0 and "U-Net folder" in err and "--unet-only" in err and not out.exists()
    with pytest.warns(UserWarning, match="no text encoders were given"):
        code, _, err = run(["merge", "--base", unet_folder, path, "--layout", "ldm", "--unet-only", "-o", out,
                            "--allow-unmatched"], capsys)
    assert code == 0, err
    assert {k.split(".")[0] for k in keys_of(out)} == {"model"}


def test_a_failed_merge_writes_nothing(lora_pipeline, tmp_path, capsys):
    sdxl = build_tiny_sdxl_pipeline(tmp_path)
    wrong = tmp_path / "xl.safetensors"
    write_lora(wrong, random_lora(load_base(sdxl)))
    out = tmp_path / "m.safetensors"
    code, _, err = run(["merge", "--base", lora_pipeline, wrong, "--layout", "ldm", "-o", out], capsys)
    assert code != 0 and "SDXL" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_sdxl_merge_writes_both_merged_text_encoders(tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl_pipeline(tmp_path)
    lora = random_lora(load_base(folder))
    write_lora(tmp_path / "l.safetensors", lora)
    out = tmp_path / "xl.safetensors"
    code, text, err = run(["merge", "--base", folder, f"{tmp_path / 'l.safetensors'}:0.7", "--layout", "ldm",
                           "-o", out], capsys)
    assert code == 0, err
    want = merged_reference(folder, lora)
    check_rules(out, want, "sdxl")
    theirs = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    assert_same(theirs.unet, want.unet)
    for loaded, ours in zip((theirs.text_encoder, theirs.text_encoder_2), (p.model for p in want.text)):
        sa, sb = loaded.state_dict(), ours.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)
