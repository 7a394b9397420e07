"""The merge | convert | extract | resize | inspect subcommands, run through `adapterkit`'s main()."""
import pytest
import torch
from safetensors.torch import save_file

import adapterkit.train.cli.main as cli
from adapterkit.adapters.lora import LoraSpec, add_lora, load_lora, lora_layers, set_lora_weights
from adapterkit.adapters.lora_files import read_lora, save_lora
from adapterkit.adapters.lora_keys import to_kohya
from adapterkit.unet import PRESETS, UNet, load_unet, save_unet
from support.cli import out, run

CFG = PRESETS["tiny"]


@pytest.fixture(autouse=True)
def only_lora_commands(monkeypatch):
    # train/cli/main.py lists the command modules; the lead adds "adapterkit.train.cli.lora" there.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("adapterkit.train.cli.lora",))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A base U-Net folder and two LoRA files made on it."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    base = UNet(CFG).eval()
    save_unet(base, root / "base")
    for name, spec, seed in (("a", LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3), 1),
                             ("b", LoraSpec(rank=3, alpha=3, targets="attn"), 2)):
        model = load_unet(root / "base")
        add_lora(model, spec, name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        save_lora(model, root / f"{name}.safetensors", name)
    return root


def kohya_tensors(lora):
    out = {}
    for p, m in lora.modules.items():
        k = to_kohya(p)
        out |= {f"{k}.lora_down.weight": m.down.clone(), f"{k}.lora_up.weight": m.up.clone(),
                f"{k}.alpha": torch.tensor(m.alpha)}
    return out




def test_inspect_prints_format_base_ranks_and_metadata(work, capsys):
    code, text, _ = run(["inspect", work / "a.safetensors"], capsys)
    assert code == 0
    assert "format:     kohya" in text
    assert "base:       preset tiny (context dim 64, conv proj_in)" in text
    assert "down_blocks.0.resnets.0" in text and "2 (x2), 4 (x1)" in text         # conv rank 2 beside rank 4
    assert "down_blocks.1.attentions.0" in text
    assert "ss_network_dim: 4" in text and "adapterkit.base_fingerprint" in text
    assert "KiB" in text and "parameters" in text


def test_convert_both_ways_verifies_and_names_what_it_leaves_out(work, tmp_path, capsys):
    code, text, _ = run(["convert", work / "a.safetensors", tmp_path / "a_peft.safetensors"], capsys)
    assert code == 0 and "kohya -> peft" in text and "ΔW verified" in text
    code, text, _ = run(["convert", tmp_path / "a_peft.safetensors", tmp_path / "back.safetensors"], capsys)
    assert code == 0 and "peft -> kohya" in text
    a, back = read_lora(work / "a.safetensors"), read_lora(tmp_path / "back.safetensors")
    assert all(torch.equal(a.modules[p].up, back.modules[p].up) for p in a.modules)

    extra = tmp_path / "with_te.safetensors"
    tensors = kohya_tensors(a)
    te = "lora_te_text_model_encoder_layers_0_self_attn_qkv.lora_down.weight"        # no CLIP layer
    save_file(tensors | {te: torch.zeros(4, 8)}, str(extra))
    code, _, err = run(["convert", extra, tmp_path / "x.safetensors", "--to", "diffusers"], capsys)
    assert code == 2 and te in err and "--allow-unmatched" in err
    assert not (tmp_path / "x.safetensors").exists()
    code, text, _ = run(["convert", extra, tmp_path / "x.safetensors", "--allow-unmatched"], capsys)
    assert code == 0 and "left out 1 keys" in text and te in text


def test_missing_alpha_needs_the_flag(work, tmp_path, capsys):
    a = read_lora(work / "b.safetensors")
    f = tmp_path / "no_alpha.safetensors"
    save_file({f"{to_kohya(p)}.lora_{k}.weight": getattr(m, k).clone() for p, m in a.modules.items()
               for k in ("down", "up")}, str(f))
    code, _, err = run(["resize", f, "--rank", "2", "-o", tmp_path / "r.safetensors"], capsys)
    assert code == 2 and "have no alpha" in err and "--missing-alpha rank" in err
    code, text, _ = run(["resize", f, "--rank", "2", "-o", tmp_path / "r.safetensors",
                         "--missing-alpha", "rank"], capsys)
    assert code == 0 and "overall relative error" in text


def test_merge_into_base_equals_the_runtime_adapters(work, tmp_path, capsys):
    code, text, _ = run(["merge", "--base", work / "base", f"{work / 'a.safetensors'}:0.8",
                         f"{work / 'b.safetensors'}:-0.5", "-o", tmp_path / "merged"], capsys)
    assert code == 0 and "computed in fp32" in text
    runtime = load_unet(work / "base")
    load_lora(runtime, read_lora(work / "a.safetensors"), "a")
    load_lora(runtime, read_lora(work / "b.safetensors"), "b")
    set_lora_weights(runtime, {"a": 0.8, "b": -0.5})
    torch.testing.assert_close(out(load_unet(tmp_path / "merged")), out(runtime), atol=1e-5, rtol=0)


def test_merge_keeps_a_half_precision_base_in_half_precision(work, tmp_path, capsys):
    save_unet(load_unet(work / "base"), tmp_path / "base16", dtype=torch.float16)
    code, text, _ = run(["merge", "--base", tmp_path / "base16", work / "b.safetensors",
                         "-o", tmp_path / "m.safetensors", "--layout", "ldm", "--unet-only"], capsys)
    assert code == 0 and "torch.float16" in text
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_merge_loras_into_one_file(work, tmp_path, capsys):
    code, text, _ = run(["merge", work / "a.safetensors", f"{work / 'b.safetensors'}:0.5",
                         "-o", tmp_path / "ab.safetensors", "--format", "peft"], capsys)
    assert code == 0 and "combined 2 LoRAs" in text
    a, b = read_lora(work / "a.safetensors"), read_lora(work / "b.safetensors")
    ab = read_lora(tmp_path / "ab.safetensors")
    assert ab.format == "peft"
    for p, m in ab.modules.items():
        want = a.modules[p].delta() + (0.5 * b.modules[p].delta() if p in b.modules else 0)
        torch.testing.assert_close(m.delta(), want, atol=1e-7, rtol=1e-5)


def test_extract_and_resize_report_their_errors(work, tmp_path, capsys):
    run(["merge", "--base", work / "base", work / "a.safetensors", "-o", tmp_path / "tuned"], capsys)
    code, text, _ = run(["extract", "--base", work / "base", "--tuned", tmp_path / "tuned", "--rank", "4",
                         "--conv-rank", "2", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 0 and "overall relative error" in text
    error = float(text.split("overall relative error ")[1].split(";")[0])
    assert error <= 1e-4
    x, a = read_lora(tmp_path / "x.safetensors"), read_lora(work / "a.safetensors")
    assert x.modules.keys() == a.modules.keys()
    assert x.metadata["ss_base_model_version"] == "adapterkit_tiny"
    code, text, _ = run(["resize", work / "a.safetensors", "--rank", "1", "-o", tmp_path / "r.safetensors"],
                        capsys)
    assert code == 0 and "to 1:" in text and float(text.split("overall relative error ")[1].split(";")[0]) > 0


def test_nan_lora_fails_with_exit_code_2_and_the_key(work, tmp_path, capsys):
    a = read_lora(work / "b.safetensors")
    p = next(iter(a.modules))
    tensors = kohya_tensors(a)
    tensors[f"{to_kohya(p)}.lora_up.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    code, _, err = run(["merge", "--base", work / "base", tmp_path / "nan.safetensors", "-o", tmp_path / "m"],
                       capsys)
    assert code == 2 and f"{to_kohya(p)}.lora_up (1 non-finite)" in err
    assert not (tmp_path / "m").exists()
