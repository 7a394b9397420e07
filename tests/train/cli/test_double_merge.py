"""A LoRA applied to a base that already has it merged is refused (issue 22 item 5).

`adapterkit merge` writes into the merged output's U-Net weights the record of every adapter merged
(adapters/merge_record.py: file SHA-256, layout-free ΔW fingerprint, weight). `sample`, `quality`,
`merge` and a ControlNet run's control.lora refuse an adapter the base's record lists, by its bytes or
by its weights in another layout (exit 2, nothing written); `--allow-merged` lets it through. Other
LoRAs are not affected, and a chain of merges keeps every entry.
"""
import json

import pytest
import torch

from adapterkit.adapters.lora import Lora, LoraModule
from adapterkit.adapters.lora_files import base_fingerprint, base_metadata, read_lora, write_lora
from adapterkit.adapters.lora_keys import layer_paths, text_layer_paths
from adapterkit.adapters.merge_record import MERGED_KEY, AlreadyMergedError, adapter_fingerprint, merged_into
from adapterkit.train.cli.main import main as cli
from adapterkit.train.jobs.controlnet import attach_lora
from adapterkit.train.pipeline.base import load_base
from adapterkit.unet.weights import read_header
from support.cli import run


def random_lora(base, seed: int) -> Lora:
    """Rank-2 modules on the U-Net's attention projections and the text encoder's q/v projections."""
    g = torch.Generator().manual_seed(seed)
    layers = {p: m for p, m in layer_paths(base.unet).items() if p.endswith(("to_q", "to_v"))}
    layers |= {p: m for p, m in text_layer_paths("text_encoder", base.text[0].model).items()
               if p.endswith(("q_proj", "v_proj"))}
    modules = {p: LoraModule(torch.randn(2, m.weight.shape[1], generator=g) * 0.1,
                             torch.randn(m.weight.shape[0], 2, generator=g) * 0.1, 1.0)
               for p, m in layers.items()}
    return Lora(modules, base_metadata(base.unet.config, base_fingerprint(base.unet)))


@pytest.fixture(scope="module")
def loras(lora_pipeline, tmp_path_factory):
    """Two LoRAs (U-Net attention + text encoder) of the tiny pipeline, and the first's peft rewrite."""
    folder = tmp_path_factory.mktemp("loras")
    base = load_base(lora_pipeline)
    a, b = folder / "style.safetensors", folder / "other.safetensors"
    write_lora(a, random_lora(base, seed=1))
    write_lora(b, random_lora(base, seed=2))
    peft = folder / "style.peft.safetensors"
    write_lora(peft, read_lora(a), "peft")
    return a, b, peft


@pytest.fixture(scope="module")
def merged(lora_pipeline, loras, tmp_path_factory):
    """The tiny pipeline with style.safetensors merged at 0.8 (a pipeline folder: it has text modules)."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert cli(["merge", "--base", str(lora_pipeline), f"{loras[0]}:0.8", "-o", str(out)]) == 0
    return out


def test_merge_records_what_it_merged(merged, loras):
    entries = merged_into(merged)
    assert [(e.file, e.weight) for e in entries] == [("style.safetensors", 0.8)]
    header = read_header(merged / "unet" / "diffusion_pytorch_model.safetensors")[1]
    assert json.loads(header[MERGED_KEY])[0]["sha256"] == entries[0].sha256
    # the fingerprint names the weights, not the layout
    assert entries[0].fingerprint == adapter_fingerprint(read_lora(loras[2]))


def test_sample_refuses_a_lora_merged_into_the_base(merged, loras, tmp_path, capsys):
    out = tmp_path / "g.png"
    code, _, err = run(["sample", "--base", merged, "--lora", loras[0], "--prompt", "a red star",
                        "--steps", "1", "-o", out], capsys)
    assert code == 2
    assert "already merged" in err and "style.safetensors (weight 0.8" in err and "--allow-merged" in err
    assert not out.exists()


def test_the_same_weights_in_another_layout_are_caught(merged, loras, tmp_path, capsys):
    code, _, err = run(["sample", "--base", merged, "--lora", f"{loras[2]}:0.5", "--prompt", "a red star",
                        "--steps", "1", "-o", tmp_path / "g.png"], capsys)
    assert code == 2 and "already merged" in err


def test_allow_merged_and_other_loras_pass(merged, loras, tmp_path, capsys):
    code, _, err = run(["sample", "--base", merged, "--lora", loras[0], "--allow-merged", "--prompt", "a",
                        "--steps", "1", "-o", tmp_path / "a.png"], capsys)
    assert code == 0, err
    code, _, err = run(["sample", "--base", merged, "--lora", loras[1], "--prompt", "a", "--steps", "1",
                        "-o", tmp_path / "b.png"], capsys)
    assert code == 0, err


def test_merge_refuses_merging_it_again_and_chains_the_record(merged, loras, tmp_path, capsys):
    again = tmp_path / "again"
    code, _, err = run(["merge", "--base", merged, loras[0], "-o", again], capsys)
    assert code == 2 and "already merged" in err and not again.exists()
    chained = tmp_path / "chained"
    code, _, err = run(["merge", "--base", merged, loras[1], "-o", chained], capsys)
    assert code == 0, err
    assert [e.file for e in merged_into(chained)] == ["style.safetensors", "other.safetensors"]
    code, _, err = run(["merge", "--base", chained, loras[0], "-o", tmp_path / "third"], capsys)
    assert code == 2 and "already merged" in err


def test_a_single_file_merge_carries_the_record(lora_pipeline, loras, tmp_path, capsys):
    one = tmp_path / "merged.safetensors"
    code, _, err = run(["merge", "--base", lora_pipeline, loras[0], "--layout", "ldm", "-o", one], capsys)
    assert code == 0, err
    assert [e.file for e in merged_into(one)] == ["style.safetensors"]
    code, _, err = run(["merge", "--base", one, loras[0], "--layout", "ldm", "--config-dir", lora_pipeline,
                        "-o", tmp_path / "two.safetensors"], capsys)
    assert code == 2 and "already merged" in err and not (tmp_path / "two.safetensors").exists()


def test_quality_refuses_it(merged, loras, capsys):
    code, _, err = run(["quality", "--base", merged, "--lora", loras[0], "--n", "1", "--steps", "1"], capsys)
    assert code == 2 and "already merged" in err


def test_controlnet_training_lora_is_refused(merged, loras):
    base = load_base(merged)
    with pytest.raises(AlreadyMergedError, match="already merged"):
        attach_lora(base, f"{loras[0]}:1")
    assert attach_lora(base, str(loras[1])) == 1.0        # another LoRA is fine


def test_an_unmerged_base_has_no_record(lora_pipeline):
    assert merged_into(lora_pipeline) == []
