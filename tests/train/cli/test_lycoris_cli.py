"""merge | convert | inspect | resize with LoHa, LoKr and DoRA files, through `adapterkit`'s main():
merged into a base == attached; several kinds with ratios; converts where both layouts hold the kind;
refusals that say why (a LoHa has no LoRA form; row-wise DoRA has no client layout)."""
import re

import pytest
import torch

import adapterkit.train.cli.main as cli
from adapterkit.adapters.lora import LoraSpec, add_lora
from adapterkit.adapters.lora_files import save_lora
from adapterkit.adapters.lycoris import LycorisSpec, add_lycoris, load_lycoris
from adapterkit.adapters.lycoris_files import read_lycoris, save_lycoris
from adapterkit.unet import PRESETS, UNet, load_unet, save_unet
from support.cli import out, run

CFG = PRESETS["tiny"]
SPECS = {
    "loha": (LycorisSpec("loha", rank=4, alpha=2, targets="full", tucker=True), "kohya"),
    "lokr": (LycorisSpec("lokr", rank=4, alpha=2, targets="full"), "kohya"),
    "dora": (LycorisSpec("dora", rank=4, alpha=2, targets="full"), "kohya"),
    "dora-row": (LycorisSpec("dora", rank=4, alpha=2, targets="attn", dora_axis="output"), "peft"),
}


@pytest.fixture(autouse=True)
def only_lora_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("adapterkit.train.cli.lora",))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A base U-Net folder, one file per kind made on it, and a plain LoRA."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_unet(UNet(CFG).eval(), root / "base")
    g = torch.Generator().manual_seed(1)
    for kind, (spec, fmt) in SPECS.items():
        model = load_unet(root / "base")
        add_lycoris(model, spec, "a")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        save_lycoris(model, root / f"{kind}.safetensors", "a", fmt=fmt)
    model = load_unet(root / "base")
    add_lora(model, LoraSpec(rank=2, targets="attn"), "p")
    save_lora(model, root / "plain.safetensors", "p")
    return root




def test_merge_several_kinds_with_ratios_into_the_base_equals_attaching_them(work, tmp_path, capsys):
    ratios = {"dora": 0.6, "loha": -0.4, "lokr": 1.1}
    files = [f"{work / k}.safetensors:{r}" for k, r in ratios.items()]
    code, text, _ = run(["merge", "--base", work / "base", *files, "-o", tmp_path / "merged"], capsys)
    assert code == 0 and "merged 3 adapters" in text
    attached = load_unet(work / "base")
    for kind, r in ratios.items():            # DoRA first: peft would build its own on a layer with a LoRA
        load_lycoris(attached, read_lycoris(work / f"{kind}.safetensors"), kind, weight=r)
    torch.testing.assert_close(out(load_unet(tmp_path / "merged")), out(attached), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, to, match", [
    ("loha", None, "peft layout holds LoRA and peft's row-wise DoRA only"),       # the default: the other one
    ("dora", "peft", "diffusers would read a column-wise DoRA as row-wise"),
    ("dora-row", None, "row-wise DoRA .* no exact conversion"),
])
def test_convert_refuses_a_layout_that_cannot_hold_the_kind(work, tmp_path, capsys, kind, to, match):
    dst = tmp_path / "out.safetensors"
    code, _, err = run(["convert", work / f"{kind}.safetensors", dst] + (["--to", to] if to else []), capsys)
    assert code == 2 and re.search(match, err), err
    assert not dst.exists()


def test_convert_rewrites_a_lycoris_file_exactly(work, tmp_path, capsys):
    dst = tmp_path / "half.safetensors"
    argv = ["convert", work / "lokr.safetensors", dst, "--to", "kohya", "--dtype", "bf16"]
    code, text, _ = run(argv, capsys)
    assert code == 0 and "lokr kohya -> kohya" in text and "every tensor verified" in text
    a, b = read_lycoris(work / "lokr.safetensors"), read_lycoris(dst)
    assert all(torch.equal(t.to(torch.bfloat16), b.modules[p].tensors[k])
               for p, m in a.modules.items() for k, t in m.tensors.items())


def test_inspect_shows_kinds_ranks_and_the_base(work, capsys):
    code, text, _ = run(["inspect", work / "lokr.safetensors"], capsys)
    assert code == 0
    assert "kinds:      lokr" in text and "preset tiny" in text
    assert "adapterkit.convention: lycoris" in text and "ss_network_module: lycoris.kohya" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("down_blocks.1.attentions.0"))
    assert " lokr " in line and "-" in line and "4" in line        # full halves have no rank: '-'


def test_a_loha_has_no_lora_form_to_combine_or_resize(work, tmp_path, capsys):
    for argv in (["merge", work / "loha.safetensors", work / "plain.safetensors",
                  "-o", tmp_path / "c.safetensors"],
                 ["resize", work / "loha.safetensors", "--rank", "2", "-o", tmp_path / "r.safetensors"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and re.search("loha adapter: it has no LoRA form .* --base", err), err
    assert not list(tmp_path.iterdir())


def test_a_plain_lora_still_takes_the_lora_path(work, tmp_path, capsys):
    code, text, _ = run(["convert", work / "plain.safetensors", tmp_path / "p.safetensors"], capsys)
    assert code == 0 and "ΔW verified" in text
