"""LyCORIS adapters (LoHa, LoKr, DoRA) trained through peft: the ΔW our files imply equals the trained
model's for linear, 1x1 and 3x3 layers, and three independent readings of the files agree with it:
lycoris-lora 4.1.3 itself, and ComfyUI's and A1111's rules re-derived below as plain functions. Files
written by lycoris-lora import with its ΔW; merged == attached; unmerge is exact; a fresh adapter
changes nothing; bad input is refused before anything is written or changed.

The client rules, read from their sources (facts re-derived here, not copied):
  ComfyUI  comfy/weight_adapter/lora.py, loha.py, lokr.py (`calculate_weight`: alpha / rank with rank
           = lora_down / hada_w1_b rows, LoKr's = lokr_w1_b's then lokr_w2_b's rows, scale 1 when no
           half is factored or alpha is missing; Tucker einsum 'i j k l, j r, i p -> p r k l') and
           comfy/weight_adapter/base.py `weight_decompose` (DoRA: norm of W + ΔW per input column,
           + finfo.eps; its output-axis branch divides by the norm of W alone)
  A1111    extensions-builtin/Lora/network.py (`NetworkModule.calc_scale`: alpha / dim, else 1;
           `finalize_updown`: scale, then `apply_weight_decompose`: per input column, no eps, then the
           multiplier), network_lora.py, network_hada.py, network_lokr.py (`dim` from lokr_w1_b then
           lokr_w2_b), lyco_helpers.py (`make_weight_cp`, `rebuild_conventional`)

lycoris-lora 4.1.3 traps, avoided here: its modules' get_diff_weight / get_merged_weight / merge_to
multiply get_weight(), which already holds alpha / rank for LoHa and LoKr, by alpha / rank again
(asserted below); its loader takes a Tucker LoKr's rank from lokr_w2_a.size(1), which is w2's output
dim in the Tucker layout, and builds DoRA modules with wd_on_out=True, so a per-column dora_scale does
not load. Those cases use lycoris.functional with the scale given (kron_weight, locon.diff_weight,
weight_decompose(wd_on_out=False)).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapterkit.adapters.lora import LoraSpec, add_lora, lora_from_model
from adapterkit.adapters.lora_files import write_lora
from adapterkit.adapters.lora_keys import layer_paths, to_kohya
from adapterkit.adapters.lycoris import (
    PARTS,
    Lycoris,
    LycorisModule,
    LycorisSpec,
    add_lycoris,
    load_lycoris,
    lycoris_from_model,
    lycoris_spec,
    remove_lycoris,
    tuner_layers,
)
from adapterkit.adapters.lycoris_files import (
    convert_lycoris,
    is_lycoris,
    read_lycoris,
    save_lycoris,
    summarize_lycoris,
    write_lycoris,
)
from adapterkit.adapters.merge import merge_loras, unmerge
from adapterkit.unet import UNet
from support.lycoris_networks import written_by_lycoris
from support.unets import SD15ISH, TINY

SPECS = {
    "loha": (LycorisSpec("loha", rank=4, alpha=2, targets="full", conv_rank=3, conv_alpha=5), "kohya"),
    "loha-tucker": (LycorisSpec("loha", rank=4, alpha=3, targets="full", tucker=True), "kohya"),
    "lokr": (LycorisSpec("lokr", rank=4, alpha=2, targets="full"), "kohya"),      # full and factored halves
    "lokr-tucker": (LycorisSpec("lokr", rank=2, alpha=3, targets="full", tucker=True, decompose_both=True),
                    "kohya"),
    "lokr-factor": (LycorisSpec("lokr", rank=3, alpha=2, targets="full", factor=4), "kohya"),
    "lokr-full": (LycorisSpec("lokr", rank=4, alpha=2, targets="full", full_matrix=True), "kohya"),
    "dora": (LycorisSpec("dora", rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3), "kohya"),
    "dora-row": (LycorisSpec("dora", rank=4, alpha=2, targets="full", dora_axis="output"), "peft"),
}
CLIENT = [k for k, (_, fmt) in SPECS.items() if fmt == "kohya"]
PROBES = {                                                          # one layer of each geometry
    "linear": "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",
    "1x1": "down_blocks.1.attentions.0.proj_in",
    "3x3": "down_blocks.1.resnets.0.conv1",
    "3x3 stride 2": "down_blocks.0.downsamplers.0.conv",
}
TOL = 1e-5


def base_model(cfg=TINY, seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg).eval()


def inputs(cfg=TINY, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 700]),
            torch.randn(2, 7, cfg.context_dim, generator=g))


def run(model, cfg=TINY):
    with torch.no_grad():
        return model(*inputs(cfg))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def train(model, steps=3, seed=2, cfg=TINY, noise=0.05):
    """A few Adam steps on a random regression (every adapter tensor moves away from its init), then
    noise on every adapter tensor, as after a longer run: ΔW well above fp32 rounding of W."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, 4, 16, 16, generator=g)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(*inputs(cfg)), target).backward()
        opt.step()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kind -> (the trained model with adapter "a", its file); built once per kind."""
    made = {}

    def get(kind):
        if kind not in made:
            spec, fmt = SPECS[kind]
            model = base_model()
            add_lycoris(model, spec, "a")
            train(model)
            path = tmp_path_factory.mktemp(kind) / f"{kind}.safetensors"
            save_lycoris(model, path, "a", fmt=fmt)
            made[kind] = model, path
        return made[kind]
    return get


def op(layer, x, weight):
    """The layer's op with another weight (no bias)."""
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding)
    return F.linear(x, weight)


def probe_input(layer, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=g, dtype=dtype)
    return torch.randn(5, layer.in_features, generator=g, dtype=dtype)


def effect(layer):
    """What an adapted layer adds to its base's output on a probe input: peft's own forward, in
    float64 so that the difference of the two outputs is not fp32 rounding."""
    layer = copy.deepcopy(layer).double()
    x = probe_input(layer.get_base_layer(), torch.float64)
    with torch.no_grad():
        return layer(x) - layer.get_base_layer()(x)


# --- the file's ΔW is the trained model's ---------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SPECS))
def test_file_delta_is_the_trained_peft_models_delta(trained, kind):
    model, path = trained(kind)
    lyco = read_lycoris(path)
    layers = tuner_layers(model, "a")
    assert lyco.modules.keys() == layers.keys()
    for geometry, p in PROBES.items():
        layer = layers[p]
        base = layer.get_base_layer()
        delta = lyco.modules[p].delta(base.weight)
        implied = op(base, probe_input(base, torch.float64), delta.double())
        assert rel(implied, effect(layer)) < TOL, (kind, geometry)
        if kind.startswith(("loha", "lokr")):       # and peft's own ΔW
            assert rel(delta, layer.get_delta_weight("a")) < TOL, (kind, geometry)
        if kind == "dora-row":                      # peft's own merge
            w0 = base.weight.detach().clone()
            layer.merge(adapter_names=["a"])
            merged = base.weight.detach().clone()
            layer.unmerge()
            assert rel(delta, merged - w0) < TOL, geometry


@pytest.mark.parametrize("kind", CLIENT)
def test_lycoris_lora_reads_our_file_as_we_do(trained, kind):
    """lycoris-lora 4.1.3's loader and module weights (get_weight / make_weight), or its functional ops
    where the loader falls into a trap (module docstring)."""
    from lycoris.functional.general import weight_decompose
    from lycoris.functional.locon import diff_weight as locon_diff_weight
    from lycoris.functional.lokr import kron_weight
    from lycoris.modules import get_module, make_module

    _, path = trained(kind)
    sd, ours, plain = load_file(path), read_lycoris(path), layer_paths(base_model())
    for geometry, p in PROBES.items():
        stem, w = to_kohya(p), plain[p].weight
        t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == stem}
        alpha = float(t["alpha"])
        if "dora_scale" in t:
            d = locon_diff_weight(t["lora_down.weight"], t["lora_up.weight"], None,
                                  gamma=alpha / t["lora_down.weight"].shape[0]).reshape(w.shape)
            want = weight_decompose(w + d, t["dora_scale"], 1, wd_on_out=False) - w
        elif "lokr_t2" in t:
            rank = t["lokr_w2_b"].shape[0]
            want = kron_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), None, t["lokr_w2_a"],
                               t["lokr_w2_b"], t["lokr_t2"], scale=alpha / rank).reshape(w.shape)
        else:
            kind_, params = get_module(sd, stem)
            module = make_module(kind_, params, stem, plain[p])
            want = module.get_weight(module.shape)
            diff, _ = module.get_diff_weight(shape=module.shape)
            torch.testing.assert_close(diff, module.scale * want)        # the alpha/rank-twice trap
        assert rel(ours.modules[p].delta(w), want) < TOL, (kind, geometry)


def comfy_delta(t: dict, weight):
    """ComfyUI's calculate_weight at strength 1 for one module's tensors (module docstring)."""
    f = {k: v.float() for k, v in t.items()}
    alpha = float(f["alpha"]) if "alpha" in f else None
    if "lora_up.weight" in f:
        rank = f["lora_down.weight"].shape[0]
        diff = f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)
    elif "hada_w1_a" in f:
        rank = f["hada_w1_b"].shape[0]
        if "hada_t1" in f:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        diff = m1 * m2
    else:
        rank = None
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
        else:
            rank, w1 = f["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        else:
            rank = f["lokr_w2_b"].shape[0]
            w2 = (torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
                  if "lokr_t2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2.contiguous())   # torch 2.13's kron rejects the einsum's strided result
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    diff = scale * diff.reshape(weight.shape)
    if "dora_scale" not in f:
        return diff
    calc = weight + diff
    if f["dora_scale"].shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.ndim - 1)).transpose(0, 1)
    return calc * (f["dora_scale"] / (norm + torch.finfo(weight.dtype).eps)) - weight


def a1111_delta(t: dict, weight):
    """A1111's calc_updown + finalize_updown at multiplier 1 for one module's tensors."""
    f = {k: v.float() for k, v in t.items()}

    def make_weight_cp(core, wa, wb):
        return torch.einsum("i j k l, i r -> r j k l", torch.einsum("i j k l, j r -> i r k l", core, wb), wa)

    def rebuild_conventional(up, down, shape):
        return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)

    dim = None
    if "lora_up.weight" in f:                                      # network_lora.py
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        dim, shape = down.shape[0], [up.size(0), down.size(1), *down.shape[2:]]
        updown = rebuild_conventional(up, down, shape)
    elif "hada_w1_a" in f:                                         # network_hada.py
        w1a, w1b, w2a, w2b = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
        dim, shape = w1b.shape[0], [w1a.size(0), w1b.size(1)]
        if "hada_t1" in f:
            shape = [w1a.size(1), w1b.size(1), *f["hada_t1"].shape[2:]]
            updown = make_weight_cp(f["hada_t1"], w1a, w1b) * make_weight_cp(f["hada_t2"], w2a, w2b)
        else:
            updown = rebuild_conventional(w1a, w1b, shape) * rebuild_conventional(w2a, w2b, shape)
    else:                                                          # network_lokr.py
        dim = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
        dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else dim
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        shape = weight.shape if weight.ndim == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        updown = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2).reshape(shape)
    updown = updown.reshape(weight.shape)
    updown = updown * (f["alpha"].item() / dim if dim is not None and "alpha" in f else 1.0)
    if "dora_scale" in f:                                          # network.py apply_weight_decompose
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (weight.ndim - 1)).transpose(0, 1)
        updown = merged * (f["dora_scale"] / norm) - weight
    return updown


@pytest.mark.parametrize("kind", CLIENT)
def test_comfyui_and_a1111_rules_read_our_file_as_we_do(trained, kind):
    _, path = trained(kind)
    sd, ours, plain = load_file(path), read_lycoris(path), layer_paths(base_model())
    for p, module in ours.modules.items():
        stem, w = to_kohya(p), plain[p].weight.detach()
        t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == stem}
        mine = module.delta(w)
        assert rel(mine, comfy_delta(t, w)) < TOL, (kind, p)
        assert rel(mine, a1111_delta(t, w)) < TOL, (kind, p)


@pytest.mark.parametrize("kind", CLIENT)
def test_every_key_is_one_the_clients_consume(trained, kind):
    """ComfyUI reads `<stem>.alpha`, `.dora_scale` and its adapters' tensor names; A1111 takes a module
    when its type's set is complete (hada: all four; lokr: a w1 and a w2; lora: up and down)."""
    _, path = trained(kind)
    sd = load_file(path)
    stems = {to_kohya(p) for p in layer_paths(base_model())}
    consumed = {"alpha", "dora_scale", *(n for names in PARTS.values() for n in names)}
    modules: dict[str, set] = {}
    for key in sd:
        stem, _, part = key.partition(".")
        assert stem in stems and part in consumed, key
        modules.setdefault(stem, set()).add(part)
    for stem, parts in modules.items():
        assert "alpha" in parts, stem
        complete = ({"lora_up.weight", "lora_down.weight"} <= parts
                    or {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts
                    or (({"lokr_w1"} <= parts or {"lokr_w1_a", "lokr_w1_b"} <= parts)
                        and ({"lokr_w2"} <= parts or {"lokr_w2_a", "lokr_w2_b"} <= parts)))
        assert complete, (stem, parts)


# --- files by lycoris-lora -------------------------------------------------------------------------------

@pytest.mark.parametrize("algo, options, label", [
    ("loha", {}, "loha"), ("loha", {"use_tucker": True}, "loha"),
    ("lokr", {"factor": 8}, "lokr"), ("lokr", {"use_tucker": True}, "lokr"),
    ("locon", {}, "lora"),
    ("lora", {"weight_decompose": True, "wd_on_out": False}, "dora"),
    ("lora", {"weight_decompose": True}, "dora (row)"),           # LyCORIS's default axis
])
def test_a_file_written_by_lycoris_lora_imports_with_its_delta(lycoris_network, tmp_path, algo, options,
                                                               label):
    path = tmp_path / "theirs.safetensors"
    net = written_by_lycoris(lycoris_network, base_model(), path, algo, options)
    lyco = read_lycoris(path)
    plain = layer_paths(base_model())
    assert lyco.kinds() == {label: len(net.loras)}
    for module in net.loras:
        p = next(q for q in plain if to_kohya(q) == module.lora_name)
        w = plain[p].weight.detach()
        if module.wd:                                            # LoCon: get_diff_weight scales once
            want = module.get_merged_weight(shape=module.shape)[0] - w
        elif hasattr(module, "get_weight"):
            want = module.get_weight(module.shape)
        else:
            want = module.make_weight() * module.scale
        assert rel(lyco.modules[p].delta(w), want) < TOL, module.lora_name


# --- merge, unmerge, zero init ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SPECS))
def test_merged_equals_attached_and_unmerge_restores_exactly(trained, kind):
    model, path = trained(kind)
    lyco = read_lycoris(path)
    attached = run(model)
    base = base_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = run(base)
    record = merge_loras(base, [(lyco, 1.0)])
    merged = run(base)
    assert rel(merged - plain, attached - plain) < 1e-4           # fp32 outputs, the effect ~1e-1 of them
    torch.testing.assert_close(merged, attached, atol=1e-5, rtol=0)
    unmerge(base, record)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_several_files_with_ratios_merge_as_they_attach(trained):
    """DoRA (loaded first: peft builds its row-wise DoRA on a layer that already has a LoRA), LoHa
    and LoKr stacked on one model with weights, vs merged with the same ratios."""
    ratios = {"dora": -0.5, "loha": 0.7, "lokr": 1.3}
    stacked, merged = base_model(), base_model()
    for kind, ratio in ratios.items():
        load_lycoris(stacked, read_lycoris(trained(kind)[1]), kind, weight=ratio)
    merge_loras(merged, [(read_lycoris(trained(kind)[1]), r) for kind, r in ratios.items()])
    torch.testing.assert_close(run(merged), run(stacked), atol=1e-5, rtol=0)
    assert rel(run(merged), run(base_model())) > 1e-3             # the three did something


def test_dora_weight_scales_the_decomposed_update_as_the_clients_do(trained):
    """A1111 multiplies the update after the decomposition (network.py finalize_updown), as ComfyUI's
    strength; peft would put the weight inside the norm."""
    lyco = read_lycoris(trained("dora")[1])
    model = base_model()
    load_lycoris(model, lyco, "d", weight=0.5)
    for p in PROBES.values():
        layer = tuner_layers(model, "d")[p]
        base = layer.get_base_layer()
        want = 0.5 * op(base, probe_input(base, torch.float64), lyco.modules[p].delta(base.weight).double())
        assert rel(effect(layer), want) < TOL, p


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_fresh_adapter_changes_nothing_and_only_it_trains(kind):
    spec, _ = SPECS[kind]
    model = base_model()
    before = run(model)
    add_lycoris(model, spec, "a")
    lyco = lycoris_from_model(model, "a")
    plain = layer_paths(base_model())
    for p, m in lyco.modules.items():
        d = m.delta(plain[p].weight)
        if kind.startswith("dora"):     # m = ‖W‖ in fp32; the file's ΔW takes the norm in fp64
            assert d.abs().max() <= 1e-6 * plain[p].weight.abs().max(), p
        else:                           # LoHa's w2_b, LoKr's w1 are zero
            assert not d.any(), p
    torch.testing.assert_close(run(model), before, atol=1e-5, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = ("lora_A", "lora_B", "lora_magnitude_vector", *PARTS["loha"], *PARTS["lokr"])
    assert trainable and all(any(f".{part}." in n for part in parts) for n in trainable)
    model.train()
    target = torch.zeros(2, 4, 16, 16)
    loss = F.mse_loss(model(*inputs()), target)
    torch.testing.assert_close(loss, F.mse_loss(before, target), atol=1e-6, rtol=0)   # step 0: the base
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} <= set(trainable)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert rel(run(model.eval()), before) > 1e-6                   # and it trains from there


# --- round trips, metadata -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SPECS))
def test_record_file_record_is_exact_and_metadata_says_kind_and_convention(trained, kind):
    model, path = trained(kind)
    spec, fmt = SPECS[kind]
    assert lycoris_spec(model, "a") == spec
    src, back = lycoris_from_model(model, "a"), read_lycoris(path)
    for p, m in src.modules.items():
        b = back.modules[p]
        assert b.kind == m.kind and b.scale == pytest.approx(m.scale, rel=1e-12)
        assert all(torch.equal(v, b.all_tensors()[k].reshape(v.shape)) for k, v in m.all_tensors().items())
    md = back.metadata
    assert md["adapterkit.kind"] == spec.kind
    assert md["adapterkit.convention"] == ("lycoris" if fmt == "kohya" else "peft")
    assert json.loads(md["adapterkit.adapter"])["kind"] == spec.kind
    assert "adapterkit.base_config" in md and "adapterkit.base_fingerprint" in md
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == {"loha": "loha", "lokr": "lokr", "dora": "lora"}[spec.kind]
    if spec.kind == "dora":
        assert args["dora_wd"] == "True" and args["wd_on_output"] == str(spec.dora_axis == "output")
    assert is_lycoris(load_file(path))
    summary = summarize_lycoris(path)
    assert summary["kinds"] == dict(back.kinds()) and summary["base"].startswith("preset tiny")


def test_fresh_model_loads_each_file_to_the_same_outputs(trained):
    for kind in SPECS:
        model, path = trained(kind)
        fresh = base_model()
        load_lycoris(fresh, read_lycoris(path), "b")
        torch.testing.assert_close(run(fresh), run(model), atol=1e-6, rtol=0, msg=kind)


def test_bf16_written_file_is_the_rounded_adapter(trained, tmp_path):
    model, _ = trained("loha")
    path = tmp_path / "half.safetensors"
    save_lycoris(model, path, "a", dtype=torch.bfloat16)
    back, src = read_lycoris(path), lycoris_from_model(model, "a")
    assert {t.dtype for m in back.modules.values() for t in m.all_tensors().values()} == {torch.bfloat16}
    for p, m in src.modules.items():
        assert torch.equal(back.modules[p].tensors["hada_w1_a"], m.tensors["hada_w1_a"].to(torch.bfloat16))


# --- refusals --------------------------------------------------------------------------------------------

def rewrite(path, out, edit):
    """The file's tensors and metadata, changed by `edit(tensors)`, saved as `out`."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(out), metadata=md)
    return out


def test_a_module_mixing_kinds_is_refused_and_nothing_is_written(trained, tmp_path):
    _, path = trained("loha")
    stem = to_kohya(PROBES["linear"])

    def add_lora_factors(t):
        t[f"{stem}.lora_down.weight"] = torch.zeros(4, 64)
        t[f"{stem}.lora_up.weight"] = torch.zeros(128, 4)
    bad = rewrite(path, tmp_path / "mixed.safetensors", add_lora_factors)
    with pytest.raises(ValueError, match=f"{stem} mixes loha and lora tensors in one module"):
        read_lycoris(bad)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="mixes"):
        convert_lycoris(bad, dst)
    assert not dst.exists() and list(tmp_path.iterdir()) == [bad]


def test_a_lokr_factor_that_does_not_divide_the_dims_is_refused(trained, tmp_path):
    model = base_model()
    with pytest.raises(ValueError, match=r"LoKr factor 3 does not divide .* down_blocks"):
        add_lycoris(model, LycorisSpec("lokr", targets="full", factor=3))
    assert not tuner_layers(model, "default") and not getattr(model, "peft_config", {})
    _, path = trained("lokr")
    stem = to_kohya(PROBES["3x3"])

    def refactor(t):                           # a w1 of another split: w1 ⊗ w2 no longer fits the conv
        t[f"{stem}.lokr_w1"] = torch.ones(4, 4)
    bad = rewrite(path, tmp_path / "split.safetensors", refactor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"1 shape mismatches: {stem}: lokr factors"):
        load_lycoris(model, read_lycoris(bad), "k")
    with pytest.raises(ValueError, match="shape mismatches"):
        merge_loras(model, [(read_lycoris(bad), 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_dora_file_without_its_magnitudes_is_refused(trained, tmp_path):
    for kind, part in (("dora", ".dora_scale"), ("dora-row", ".lora_magnitude_vector")):
        _, path = trained(kind)
        bad = rewrite(path, tmp_path / f"{kind}.safetensors",
                      lambda t, part=part: [t.pop(k) for k in list(t) if k.endswith(part)])
        with pytest.raises(ValueError, match="metadata says DoRA but 129 modules have no magnitude"):
            read_lycoris(bad)


def test_a_file_for_another_family_is_refused_naming_it(tmp_path):
    other = base_model(SD15ISH)
    add_lycoris(other, LycorisSpec("loha", rank=4, targets="full"), "a")
    train(other, steps=1, cfg=SD15ISH)
    path = tmp_path / "other.safetensors"
    save_lycoris(other, path, "a")
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for attempt in (lambda lyco: load_lycoris(model, lyco, "x"),
                    lambda lyco: merge_loras(model, [(lyco, 1.0)])):
        with pytest.raises(ValueError, match=r"does not fit this U-Net \(preset tiny.*made for: custom U-Net "
                                             r"\(context dim 48.*shape mismatches"):
            attempt(read_lycoris(path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not getattr(model, "peft_config", {})


def test_layouts_refuse_the_dora_their_readers_would_misread(trained, tmp_path):
    row, column = read_lycoris(trained("dora-row")[1]), read_lycoris(trained("dora")[1])
    with pytest.raises(ValueError, match="row-wise DoRA .* ComfyUI and A1111 read dora_scale per input"):
        write_lycoris(tmp_path / "row.safetensors", row, "kohya")
    with pytest.raises(ValueError, match="diffusers would read a column-wise DoRA as row-wise"):
        write_lycoris(tmp_path / "col.safetensors", column, "peft")
    with pytest.raises(ValueError, match="peft layout holds LoRA and peft's row-wise DoRA only"):
        write_lycoris(tmp_path / "loha.safetensors", read_lycoris(trained("loha")[1]), "peft")
    assert not list(tmp_path.iterdir())


def test_non_finite_tensors_are_refused_everywhere(trained, tmp_path):
    _, path = trained("lokr")
    stem = to_kohya(PROBES["linear"])
    bad = rewrite(path, tmp_path / "nan.safetensors",
                  lambda t: t[f"{stem}.lokr_w1"].view(-1)[0].fill_(float("nan")))
    lyco = read_lycoris(bad)
    model = base_model()
    for attempt in (lambda: load_lycoris(model, lyco), lambda: merge_loras(model, [(lyco, 1.0)]),
                    lambda: write_lycoris(tmp_path / "out.safetensors", lyco)):
        with pytest.raises(ValueError, match=f"NaN/inf weights.*{stem}.lokr_w1 \\(1 non-finite\\)"):
            attempt()
    assert not (tmp_path / "out.safetensors").exists()


def test_attaching_needs_one_kind_per_adapter(trained):
    loha, dora = read_lycoris(trained("loha")[1]), read_lycoris(trained("dora")[1])
    mixed = Lycoris({**{p: m for p, m in loha.modules.items() if "attentions" in p},
                     **{p: m for p, m in dora.modules.items() if "resnets" in p}})
    model = base_model()
    with pytest.raises(ValueError, match="several kinds .* merge the file"):
        load_lycoris(model, mixed)
    merge_loras(model, [(mixed, 1.0)])                            # a merge takes any mix


def test_column_dora_on_a_layer_that_already_has_a_lora_is_refused():
    model = base_model()
    add_lora(model, LoraSpec(rank=2, targets="attn"), "plain")
    with pytest.raises(ValueError, match="already carry a LoRA adapter, where peft would build its row-wise"):
        add_lycoris(model, LycorisSpec("dora", targets="attn"), "d")
    assert sorted(model.peft_config) == ["plain"]
    assert lora_from_model(model, "plain").modules                # the LoRA is untouched


def test_remove_keeps_the_other_adapters(trained):
    model = base_model()
    load_lycoris(model, read_lycoris(trained("dora")[1]), "d")
    load_lycoris(model, read_lycoris(trained("loha")[1]), "h", trainable=True)
    remove_lycoris(model, "d")
    assert sorted(model.peft_config) == ["h"] and not tuner_layers(model, "d")
    alone = base_model()
    load_lycoris(alone, read_lycoris(trained("loha")[1]), "h")
    torch.testing.assert_close(run(model), run(alone), atol=1e-6, rtol=0)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".hada_" in n)


def test_missing_alpha_is_refused_unless_read_as_scale_one(trained, tmp_path):
    _, path = trained("loha")
    bad = rewrite(path, tmp_path / "noalpha.safetensors",
                  lambda t: [t.pop(k) for k in list(t) if k.endswith(".alpha")])
    with pytest.raises(ValueError, match="129 of 129 modules have no alpha"):
        read_lycoris(bad)
    lyco = read_lycoris(bad, missing_alpha="rank")
    assert {m.scale for m in lyco.modules.values()} == {1.0}


def test_plain_lora_files_read_as_the_lora_kind(tmp_path):
    model = base_model()
    add_lora(model, LoraSpec(rank=4, alpha=2, targets="full"), "p")
    train(model, steps=1)
    path = tmp_path / "plain.safetensors"
    write_lora(path, lora_from_model(model, "p"))
    lyco = read_lycoris(path)
    assert lyco.kinds() == {"lora": len(lyco.modules)} and not is_lycoris(load_file(path))
    plain, lora = layer_paths(base_model()), lora_from_model(model, "p")
    for p, m in lora.modules.items():
        assert rel(lyco.modules[p].delta(plain[p].weight), m.delta()) < TOL


@pytest.mark.parametrize("bad, match", [
    (dict(kind="locon"), "unknown LyCORIS kind"),
    (dict(kind="loha", targets="everything"), "unknown targets"),
    (dict(kind="loha", rank=0), "rank must be >= 1"),
    (dict(kind="lokr", alpha=0), "alpha must be > 0"),
    (dict(kind="loha", factor=4), "factor do not apply to loha"),
    (dict(kind="dora", tucker=True), "tucker do not apply to dora"),
    (dict(kind="lokr", dropout=0.1), "dropout do not apply to lokr"),
    (dict(kind="lokr", decompose_both=True, full_matrix=True), "contradict"),
    (dict(kind="dora", dora_axis="diagonal"), "dora_axis must be one of"),
    (dict(kind="lokr", factor=0), "factor must be -1"),
    (dict(kind="loha", rank_dropout=1.0), r"rank_dropout must be in \[0, 1\)"),
])
def test_spec_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        LycorisSpec(**bad)


def test_module_problems_name_the_geometry():
    m = LycorisModule("loha", {"hada_w1_a": torch.zeros(8, 2), "hada_w1_b": torch.zeros(3, 4),
                               "hada_w2_a": torch.zeros(8, 2), "hada_w2_b": torch.zeros(2, 4)})
    assert "factors do not multiply" in m.problem(torch.Size((8, 4)))
    dora = LycorisModule("lora", {"lora_down.weight": torch.zeros(2, 4), "lora_up.weight": torch.zeros(8, 2)},
                         2.0, torch.ones(4))
    assert "dora_scale (4,) fits neither axis" in dora.problem(torch.Size((8, 4)))


# --- diffusers: peft's DoRA in the peft layout ----------------------------------------------------------

def test_diffusers_reads_our_peft_dora_and_we_read_its(tmp_path):
    """diffusers' load_lora_weights builds peft's DoRA from our file and computes our outputs; a DoRA
    diffusers saves (save_lora_weights of a peft state dict) reads back into ours with its outputs."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from adapterkit.unet import UNetConfig
    from support.pipelines import build_tiny_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_pipeline(tmp_path / "sd", TINY),
                                                   local_files_only=True)

    def out(unet):
        with torch.no_grad():
            y = unet(*inputs())
        return y.sample if hasattr(y, "sample") else y

    plain = out(pipe.unet)
    model = UNet(UNetConfig.from_diffusers(dict(pipe.unet.config))).eval()
    model.load_state_dict(pipe.unet.state_dict())
    add_lycoris(model, SPECS["dora-row"][0], "s")
    train(model, steps=1)
    save_lycoris(model, tmp_path / "ours.safetensors", "s", fmt="peft")
    pipe.load_lora_weights(str(tmp_path / "ours.safetensors"), adapter_name="s")
    assert rel(out(pipe.unet), plain) > 1e-3
    torch.testing.assert_close(out(pipe.unet), out(model), atol=TOL, rtol=0)
    pipe.unload_lora_weights()

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "proj_in", "conv1"], use_dora=True,
                        init_lora_weights="gaussian")
    pipe.unet.add_adapter(config, adapter_name="theirs")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    expected = out(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="theirs"),
        unet_lora_adapter_metadata=config.to_dict())
    lyco = read_lycoris(tmp_path / "pytorch_lora_weights.safetensors")
    assert lyco.format == "peft" and set(lyco.kinds()) == {"dora (row)"}
    mine = UNet(UNetConfig.from_diffusers(dict(pipe.unet.config))).eval()
    mine.load_state_dict({k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items()
                          if ".lora_" not in k})
    load_lycoris(mine, lyco)
    torch.testing.assert_close(out(mine), expected, atol=TOL, rtol=0)


def test_lora_weight_helpers_drive_every_kind_and_keep_it_trainable(trained):
    """lora.set_lora_weights / lora_weights / enable_loras (what sampling and quality use) see the
    LyCORIS layers too, and leave their tensors trainable."""
    from adapterkit.adapters.lora import enable_loras, lora_weights, set_lora_weights

    model = base_model()
    lyco = read_lycoris(trained("loha")[1])
    load_lycoris(model, lyco, "h", trainable=True)
    plain, half = run(base_model()), base_model()
    merge_loras(half, [(lyco, 0.5)])
    set_lora_weights(model, {"h": 0.5})
    assert lora_weights(model) == {"h": 0.5}
    torch.testing.assert_close(run(model), run(half), atol=1e-5, rtol=0)
    enable_loras(model, False)
    torch.testing.assert_close(run(model), plain, atol=1e-5, rtol=0)
    enable_loras(model, True)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".hada_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".hada_" not in n)


def test_load_adapter_file_takes_any_kind(trained, tmp_path):
    """What `sample` and `quality` need: one loader for LoRA and LyCORIS files, told by the keys."""
    from adapterkit.adapters.lycoris_files import load_adapter_file

    plain_model = base_model()
    add_lora(plain_model, LoraSpec(rank=2, targets="attn"), "p")
    train(plain_model, steps=1)
    write_lora(tmp_path / "plain.safetensors", lora_from_model(plain_model, "p"))
    model = base_model()
    assert isinstance(load_adapter_file(model, trained("dora")[1], "d", weight=0.5), Lycoris)
    assert not isinstance(load_adapter_file(model, tmp_path / "plain.safetensors", "p"), Lycoris)
    stacked = base_model()
    files = [(trained("dora")[1], 0.5), (tmp_path / "plain.safetensors", 1.0)]
    merge_loras(stacked, [(read_lycoris(f), r) for f, r in files])
    torch.testing.assert_close(run(model), run(stacked), atol=1e-5, rtol=0)
