"""`adapterkit convert LOHA_OR_LOKR out.safetensors --rank R` (issue 20): a plain LoRA whose every module
is the truncated SVD of the LyCORIS module's full ΔW, with each module's relative error reported, and a
refusal under --max-error.

Oracle: lycoris-lora 4.1.3 writes the file (its own LycorisNetwork on our tiny U-Net) and builds each
module's ΔW (`get_weight(shape)` for LoHa/LoKr, which holds alpha/rank once; not get_diff_weight, which
applies it twice: see test_lycoris.py); the truncated SVD of that ΔW is computed here with
torch.linalg.svd. The converted file is read back by our LoRA reader (itself checked against diffusers,
ComfyUI and A1111 in test_lora_files.py).
"""
import pytest
import torch

from adapterkit.adapters.lora_files import read_lora
from adapterkit.adapters.lora_keys import layer_paths, to_kohya
from adapterkit.unet import UNet
from support.cli import run
from support.lycoris_networks import written_by_lycoris
from support.unets import TINY

CASES = [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {"factor": 8}),
         ("lokr", {"use_tucker": True})]


def host() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()


def oracle(net) -> dict[str, torch.Tensor]:
    """Canonical path -> lycoris-lora's ΔW of each module, shaped as the layer's weight."""
    plain = layer_paths(host())
    out = {}
    for module in net.loras:
        path = next(q for q in plain if to_kohya(q) == module.lora_name)
        out[path] = module.get_weight(module.shape).reshape(plain[path].weight.shape).detach()
    return out


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(delta.shape)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("algo, options", CASES)
def test_the_lora_is_the_truncated_svd_of_lycoris_delta(lycoris_network, tmp_path, capsys, algo, options):
    src = tmp_path / "theirs.safetensors"
    want = oracle(written_by_lycoris(lycoris_network, host(), src, algo, options))
    out = tmp_path / "lora.safetensors"
    code, text, err = run(["convert", src, out, "--rank", "3", "--conv-rank", "2", "--base", "tiny"], capsys)
    assert code == 0, err
    lora = read_lora(out)
    assert lora.modules.keys() == want.keys()
    errors = {}
    for path, delta in want.items():
        r = 2 if delta.ndim == 4 and delta.shape[-1] > 1 else 3
        ours = lora.modules[path].delta().reshape(delta.shape)
        assert rel(ours, truncated(delta, r)) < 1e-4, path
        errors[to_kohya(path)] = rel(truncated(delta, r), delta)
    # the report: the 20 worst modules, each with the oracle's relative error, worst first
    shown = {k: float(v) for k, v in (x.strip().split(": ") for x in text.splitlines()
                                      if x.strip().split(":")[0] in errors)}
    assert len(shown) == min(20, len(errors))
    assert shown == pytest.approx({k: errors[k] for k in shown}, rel=1e-3, abs=1e-6)
    assert min(shown.values()) >= max((e for k, e in errors.items() if k not in shown), default=0) - 1e-6
    assert "overall relative error" in text


@pytest.mark.parametrize("algo, options", CASES[::3])
def test_at_full_rank_the_lora_reproduces_the_delta(lycoris_network, tmp_path, capsys, algo, options):
    src = tmp_path / "theirs.safetensors"
    want = oracle(written_by_lycoris(lycoris_network, host(), src, algo, options))
    out = tmp_path / "lora.safetensors"
    assert run(["convert", src, out, "--rank", "4096", "--base", "tiny"], capsys)[0] == 0
    lora = read_lora(out)
    for path, delta in want.items():
        assert rel(lora.modules[path].delta().reshape(delta.shape), delta) < 1e-5, path


def needed_rank(delta: torch.Tensor, tol: float) -> int:
    s2 = torch.linalg.svdvals(delta.double().flatten(1)) ** 2
    return next(r for r in range(s2.numel() + 1) if float(s2[r:].sum() / s2.sum()) ** 0.5 <= tol)


def test_max_error_refuses_naming_the_rank_each_module_needs(lycoris_network, tmp_path, capsys):
    src = tmp_path / "theirs.safetensors"
    want = oracle(written_by_lycoris(lycoris_network, host(), src, "loha", {}))
    ranks = {p: needed_rank(d, 0.05) for p, d in want.items()}
    out = tmp_path / "lora.safetensors"
    code, _, err = run(["convert", src, out, "--rank", "1", "--max-error", "0.05", "--base", "tiny"], capsys)
    err = " ".join(err.split())
    assert code != 0 and "--max-error 0.05" in err and not out.exists()
    named = [p for p in want if f"{to_kohya(p)} (" in err]
    said = {p: err.split(f"{to_kohya(p)} (", 1)[1].split(")", 1)[0] for p in named}
    assert named and all(said[p].endswith(f"needs rank {ranks[p]}") for p in named), said
    top = str(max(ranks.values()))
    code, _, err = run(["convert", src, out, "--rank", top, "--conv-rank", top, "--max-error", "0.05",
                        "--base", "tiny"], capsys)
    assert code == 0, err


def test_without_a_known_base_and_for_dora_or_plain_lora_it_says_what_to_do(lycoris_network, tmp_path,
                                                                              capsys):
    src = tmp_path / "theirs.safetensors"
    written_by_lycoris(lycoris_network, host(), src, "loha", {})
    code, _, err = run(["convert", src, tmp_path / "a.safetensors", "--rank", "2"], capsys)
    assert code != 0 and "--base" in err
    dora = tmp_path / "dora.safetensors"
    written_by_lycoris(lycoris_network, host(), dora, "lora", {"weight_decompose": True, "wd_on_out": False})
    code, _, err = run(["convert", dora, tmp_path / "b.safetensors", "--rank", "2", "--base", "tiny"], capsys)
    assert code != 0 and "DoRA" in err and "no LoRA form" in err
    plain = tmp_path / "locon.safetensors"
    written_by_lycoris(lycoris_network, host(), plain, "locon", {})
    code, _, err = run(["convert", plain, tmp_path / "c.safetensors", "--rank", "2", "--base", "tiny"],
                       capsys)
    assert code != 0 and "resize" in err
    assert not any((tmp_path / n).exists() for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
