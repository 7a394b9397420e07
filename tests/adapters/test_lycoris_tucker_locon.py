"""Tucker-decomposed LoCon (LyCORIS `locon` with use_tucker: `lora_mid` on k x k convs; issue 20): read,
merged, attached, converted, checked against lycoris-lora 4.1.3.

Oracles: the file is written by lycoris-lora's own LycorisNetwork on our tiny U-Net; each module's ΔW is
its LoConModule.get_diff_weight (LoCon scales alpha/rank once, unlike its LoHa/LoKr: test_lycoris.py)
and, independently, lycoris.functional.locon.diff_weight(down, up, mid, gamma=alpha/rank).
"""
import pytest
import torch
from safetensors.torch import load_file

from adapterkit.adapters.lora_files import read_lora
from adapterkit.adapters.lora_keys import layer_paths, to_kohya
from adapterkit.adapters.lycoris import load_lycoris
from adapterkit.adapters.lycoris_files import convert_lycoris, read_adapter, read_lycoris
from adapterkit.adapters.merge import merge_loras
from adapterkit.unet import UNet
from support.cli import run
from support.lycoris_networks import written_by_lycoris
from support.unets import TINY


def host() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def tucker(lycoris_network, tmp_path):
    path = tmp_path / "tucker.safetensors"
    net = written_by_lycoris(lycoris_network, host(), path, "locon", {"use_tucker": True})
    return path, net


def test_every_module_has_lycoris_loras_delta(tucker):
    from lycoris.functional.locon import diff_weight

    path, net = tucker
    sd, lyco, plain = load_file(path), read_adapter(path), layer_paths(host())
    assert lyco.kinds() == {"lora": len(net.loras)} and not lyco.unplaced
    mids = [m for m in net.loras if f"{m.lora_name}.lora_mid.weight" in sd]
    assert mids                                                          # the 3x3 convs are Tucker
    for module in net.loras:
        p = next(q for q in plain if to_kohya(q) == module.lora_name)
        w = plain[p].weight.detach()
        want = module.get_diff_weight(shape=module.shape)[0].reshape(w.shape)
        assert rel(lyco.modules[p].delta(w), want) < 1e-5, module.lora_name
        if module in mids:
            t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == module.lora_name}
            functional = diff_weight(t["lora_down.weight"], t["lora_up.weight"], t["lora_mid.weight"],
                                     gamma=float(t["alpha"]) / t["lora_down.weight"].shape[0])
            assert rel(lyco.modules[p].delta(w), functional.reshape(w.shape)) < 1e-5, module.lora_name


def test_merged_equals_attached(tucker):
    path, _ = tucker
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 700])
    ctx = torch.randn(2, 7, TINY.context_dim, generator=g)
    attached, merged = host(), host()
    load_lycoris(attached, read_lycoris(path), "a")
    merge_loras(merged, [(read_lycoris(path), 1.0)])
    with torch.no_grad():
        a, m, base = attached(x, t, ctx), merged(x, t, ctx), host()(x, t, ctx)
    assert rel(m, a) < 1e-5 and rel(a, base) > 1e-3


def test_kohya_rewrite_keeps_the_mid_and_convert_rank_gives_the_exact_locon(tucker, tmp_path, capsys):
    path, _ = tucker
    same = tmp_path / "same.safetensors"
    convert_lycoris(path, same, "kohya")
    assert any(k.endswith("lora_mid.weight") for k in load_file(same))
    with pytest.raises(ValueError, match="lora_mid"):
        convert_lycoris(path, tmp_path / "peft.safetensors", "peft")
    assert not (tmp_path / "peft.safetensors").exists()
    out = tmp_path / "locon.safetensors"
    code, _, err = run(["convert", path, out, "--rank", "4", "--conv-rank", "3", "--base", "tiny",
                        "--max-error", "1e-5"], capsys)                  # the file's ranks: exact
    assert code == 0, err
    lyco, lora, plain = read_lycoris(path), read_lora(out), layer_paths(host())
    for p, m in lyco.modules.items():
        w = plain[p].weight
        assert rel(lora.modules[p].delta().reshape(w.shape), m.delta(w)) < 1e-5, p
