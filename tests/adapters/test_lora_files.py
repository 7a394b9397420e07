"""LoRA files: key layout and metadata of both formats, round trips, other tools' conventions (kohya with
diffusers and LDM names), atomic verified writes, and every refusal naming the keys or the base."""
import json
import os

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from adapterkit.adapters.lora import (
    Lora,
    LoraModule,
    LoraSpec,
    add_lora,
    load_lora,
    lora_from_model,
    lora_layers,
)
from adapterkit.adapters.lora_files import (
    convert_lora,
    load_lora_file,
    read_lora,
    save_lora,
    summarize,
    write_lora,
)
from adapterkit.adapters.lora_keys import to_kohya
from adapterkit.unet import PRESETS, UNet, UNetConfig, unet_fingerprint

TINY = PRESETS["tiny"]
SPEC = LoraSpec(rank=4, alpha=2, targets="full", conv_rank=2, conv_alpha=3)
PROJ_IN = "down_blocks.1.attentions.0.proj_in"
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
CONV1 = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def trained():
    """A tiny U-Net with a `full` LoRA whose B is non-zero (as after training)."""
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    add_lora(model, SPEC, "style")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B["style"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return UNet(TINY).eval()


def files(tmp_path, fmt="kohya"):
    return tmp_path / f"lora_{fmt}.safetensors"


def header(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def kohya_dict(lora: Lora, names=to_kohya, dtype=torch.float16, alpha=True):
    """A kohya-layout state dict written by hand, the way sd-scripts saves (save dtype for all tensors,
    0-dim alpha): formats.md §3.2."""
    out = {}
    for path, m in lora.modules.items():
        k = names(path)
        out[f"{k}.lora_down.weight"] = m.down.to(dtype)
        out[f"{k}.lora_up.weight"] = m.up.to(dtype)
        if alpha:
            out[f"{k}.alpha"] = torch.tensor(m.alpha).to(dtype)
    return out


def expected_delta(down, up, alpha):
    """kohya's own formulas (networks/lora.py merge_to): matmul for linear/1x1, conv2d for kxk."""
    down, up = down.float(), up.float()
    scale = alpha / down.shape[0]
    if down.ndim == 2:
        return scale * up @ down
    if down.shape[-1] == 1:
        return scale * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    return scale * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


# --- layout and metadata -------------------------------------------------------------------------------

def test_kohya_export_layout_and_metadata(trained, tmp_path):
    path = files(tmp_path)
    save_lora(trained, path, "style")
    tensors, md = header(path)
    lora = lora_from_model(trained, "style")
    assert set(tensors) == {f"{to_kohya(p)}.{s}" for p in lora.modules for s in
                            ("lora_down.weight", "lora_up.weight", "alpha")}
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 64) and tensors[f"{key}.alpha"].shape == ()
    assert tensors["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].shape == (4, 64, 1, 1)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 3.0
    # kohya's minimum ss_* keys, ModelSpec, and ours.
    for k in ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
              "ss_network_args", "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title",
              "modelspec.implementation", "modelspec.resolution", "modelspec.date"):
        assert k in md, k
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert md["modelspec.title"] == "lora_kohya"
    assert LoraSpec(**json.loads(md["adapterkit.adapter"])) == SPEC
    assert UNetConfig.from_dict(json.loads(md["adapterkit.base_config"])) == TINY
    plain_state = {k.replace(".base_layer.", "."): v for k, v in trained.state_dict().items()
                   if ".lora_" not in k}
    assert md["adapterkit.base_fingerprint"] == unet_fingerprint(plain_state)
    assert (md["adapterkit.rank"], md["adapterkit.alpha"]) == ("4", "2.0")
    # Nothing personal: no absolute paths, no user or host names.
    personal = [str(tmp_path), os.getcwd(), os.path.expanduser("~"), os.environ.get("USER", "\0")]
    assert not [v for v in md.values() for p in personal if p and p in v]


def test_peft_export_layout_and_metadata(trained, tmp_path):
    path = files(tmp_path, "peft")
    save_lora(trained, path, "style", fmt="peft")
    tensors, md = header(path)
    lora = lora_from_model(trained, "style")
    assert set(tensors) == {f"unet.{p}.lora_{ab}.weight" for p in lora.modules for ab in "AB"}
    assert all("lora" in k for k in tensors)              # diffusers' only hard format check
    assert md["format"] == "pt"
    cfg = json.loads(md["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 2.0
    config = LoraConfig(**{k.removeprefix("unet."): v for k, v in cfg.items()})   # what diffusers builds
    assert config.rank_pattern[f"^{CONV1.replace('.', chr(92) + '.')}"] == 2
    assert "adapterkit.base_config" in md and "modelspec.architecture" in md


@pytest.mark.parametrize("first, second", [("kohya", "peft"), ("peft", "kohya")])
def test_convert_there_and_back_is_lossless(trained, tmp_path, first, second):
    a, b, back = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "back.safetensors"
    save_lora(trained, a, "style", fmt=first)
    r1 = convert_lora(a, b, second)
    r2 = convert_lora(b, back, first)
    assert (r1["from"], r1["to"], r1["modules"]) == (first, second, len(lora_layers(trained)))
    assert r1["max_rel_error"] == 0 and r2["max_rel_error"] == 0 and not r1["unplaced"]
    ta, ma = header(a)
    tb, mb = header(back)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert {k: v for k, v in ma.items() if k != "lora_adapter_metadata"} == \
        {k: v for k, v in mb.items() if k != "lora_adapter_metadata"}


def test_runtime_adapter_equals_reloaded_file(trained, plain, tmp_path):
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([9]), torch.randn(1, 5, TINY.context_dim)
    with torch.no_grad():
        expected = trained(x, t, ctx)
    for fmt in ("kohya", "peft"):
        save_lora(trained, files(tmp_path, fmt), "style", fmt=fmt)
        model = UNet(TINY).eval()
        model.load_state_dict(plain.state_dict())
        load_lora(model, read_lora(files(tmp_path, fmt)))
        with torch.no_grad():
            assert torch.equal(model(x, t, ctx), expected), fmt


# --- other tools' files ----------------------------------------------------------------------------------

def test_kohya_file_by_sd_scripts_conventions_gives_the_same_delta(trained, plain, tmp_path):
    # fp16 tensors and fp16 0-dim alphas, alpha != rank (8/4 linear, 4/2 conv as with --network_alpha 4
    # --network_args conv_dim=4 conv_alpha=2), training metadata with a path in it.
    g = torch.Generator().manual_seed(3)
    src = {}
    for p, m in lora_from_model(trained, "style").modules.items():
        conv = m.down.ndim == 4 and m.down.shape[-1] == 3
        r, alpha = (4, 2.0) if conv else (8, 4.0)
        down = torch.randn(r, *m.down.shape[1:], generator=g) * 0.1
        up = torch.randn(m.up.shape[0], r, *m.up.shape[2:], generator=g) * 0.1
        src[p] = LoraModule(down, up, alpha)
    path = tmp_path / "kohya_tool.safetensors"
    save_file(kohya_dict(Lora(src)), str(path), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2"}), "ss_v2": "False",
        "ss_base_model_version": "sd_v1", "ss_sd_model_name": "/home/someone/sd15.ckpt"})
    lora = read_lora(path)
    assert lora.format == "kohya" and lora.modules.keys() == src.keys()
    for p, m in src.items():
        want = expected_delta(m.down.half(), m.up.half(), m.alpha)
        assert torch.allclose(lora.modules[p].delta(), want, atol=1e-6, rtol=1e-5), p
    model = UNet(TINY).eval()
    model.load_state_dict(plain.state_dict())
    load_lora(model, lora, "tool")
    for p, layer in lora_layers(model).items():   # peft's own ΔW of the injected layers
        want = expected_delta(src[p].down.half(), src[p].up.half(), src[p].alpha)
        assert torch.allclose(layer.get_delta_weight("tool"), want, atol=1e-6, rtol=1e-5), p
    # Converting carries the source's metadata over and recomputes the layout keys.
    convert_lora(path, tmp_path / "as_peft.safetensors", "peft")
    _, md = header(tmp_path / "as_peft.safetensors")
    assert md["ss_sd_model_name"] == "/home/someone/sd15.ckpt" and "lora_adapter_metadata" in md


def test_ldm_named_kohya_file_is_placed_by_the_base_config(trained, tmp_path):
    # Hand-derived from formats.md §2.3 for the tiny config (L = 1; stage 0 has no attention).
    cases = {
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q": TO_Q,
        "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
        "output_blocks_5_0_out_layers_3": "up_blocks.2.resnets.1.conv2",
    }
    lora = lora_from_model(trained, "style")
    ldm = {p: "lora_unet_" + k for k, p in cases.items()}
    sub = Lora({p: lora.modules[p] for p in cases.values()})
    path = tmp_path / "ldm.safetensors"
    save_file(kohya_dict(sub, names=ldm.get, dtype=torch.float32), str(path))
    got = read_lora(path, base=TINY)
    assert got.modules.keys() == sub.modules.keys() and not got.unplaced
    assert all(torch.equal(got.modules[p].up, m.up) for p, m in sub.modules.items())
    model = UNet(TINY).eval()
    load_lora_file(model, path, "ldm")                     # placed by the model's own config
    assert set(lora_layers(model)) == set(cases.values())
    # Without the base the LDM keys are kept aside with the reason, never dropped.
    alone = read_lora(path)
    assert not alone.modules and all("pass the base" in why for why in alone.unplaced.values())
    # A full LDM-named file converts to diffusers names with the same ΔW everywhere.
    from adapterkit.adapters.lora_keys import ldm_kohya_table
    inverse = {p: "lora_unet_" + k for k, p in ldm_kohya_table(TINY).items()}
    save_file(kohya_dict(lora, names=inverse.get, dtype=torch.float32), str(path))
    report = convert_lora(path, tmp_path / "diffusers_names.safetensors", "kohya", base=TINY)
    assert report["modules"] == len(lora.modules) and report["max_rel_error"] == 0


# --- refusals: each names the keys or the base ---------------------------------------------------------

def write(tmp_path, tensors, metadata=None, name="bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def one(path, down, up, alpha=None):
    d = {f"{path}.lora_down.weight": down, f"{path}.lora_up.weight": up}
    if alpha is not None:
        d[f"{path}.alpha"] = torch.tensor(float(alpha))
    return d


def ok_module(trained, path=TO_Q):
    m = lora_from_model(trained, "style").modules[path]
    return m.down.clone(), m.up.clone()


def test_keys_matching_no_layer_fail_naming_them(trained, plain, tmp_path):
    d, u = ok_module(trained)
    stray = "lora_unet_down_blocks_7_attentions_0_proj_in"
    f = write(tmp_path, one(to_kohya(TO_Q), d, u, 4) | one(stray, d, u, 4))
    with pytest.raises(ValueError, match=f"1 keys match no layer: {stray}"):
        load_lora(plain, read_lora(f))
    assert not lora_layers(plain)
    with pytest.warns(UserWarning, match="skipping 1 keys: lora_unet_down_blocks_7"):
        load_lora(plain, read_lora(f), "partial", allow_unmatched=True)
    from adapterkit.adapters.lora import remove_lora
    remove_lora(plain, "partial")


def sdxl_like(rank=4):
    """Keys and shapes of a kohya SDXL LoRA (LDM names, 2048-d context, linear proj_in, depth 2)."""
    z, block = torch.zeros, "lora_unet_input_blocks_4_1"
    return (one(f"{block}_transformer_blocks_0_attn2_to_k", z(rank, 2048), z(640, rank), rank)
            | one(f"{block}_transformer_blocks_1_attn1_to_q", z(rank, 640), z(640, rank), rank)
            | one(f"{block}_proj_in", z(rank, 640), z(640, rank), rank))


def test_sdxl_lora_on_sd15_fails_naming_the_base_it_was_made_for(tmp_path):
    with torch.device("meta"):
        sd15 = UNet(PRESETS["sd15"])
    f = write(tmp_path, sdxl_like(), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ValueError) as e:
        load_lora(sd15, read_lora(f, base=PRESETS["sd15"]))
    msg = str(e.value)
    assert "this U-Net (preset sd15 (SD1.x: context dim 768" in msg
    assert "made for: ss_base_model_version=sdxl_base_v1-0; SDXL cross-attention input dim 2048" in msg
    assert "transformer depth > 1" in msg and "linear proj_in" in msg
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k: lora_down (4, 2048)" in msg
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q" in msg
    # Shapes alone tell it too (a diffusers-named file without metadata).
    z = torch.zeros
    f = write(tmp_path, one("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                            z(4, 2048), z(640, 4), 4), name="ctx.safetensors")
    with pytest.raises(ValueError, match="made for: SDXL cross-attention input dim 2048.*1 shape mismatches"):
        load_lora(sd15, read_lora(f))


def test_sd1_lora_on_a_linear_projection_unet_fails_with_both_layouts_named(trained, tmp_path):
    sd2_like = TINY.replace(linear_projection=True)
    d, u = ok_module(trained, PROJ_IN)                      # [4, 64, 1, 1] / [64, 4, 1, 1]
    f = write(tmp_path, one(to_kohya(PROJ_IN), d, u, 4))
    with pytest.raises(ValueError, match=r"1x1-conv proj_in \(SD1.x-style\).*lora_unet_down_blocks_1_"
                                         r"attentions_0_proj_in: lora_down \(4, 64, 1, 1\)"):
        load_lora(UNet(sd2_like), read_lora(f))


def test_rank_mismatch_fails_naming_the_key(tmp_path):
    f = write(tmp_path, one(to_kohya(TO_Q), torch.zeros(4, 64), torch.zeros(64, 8), 4))
    with pytest.raises(ValueError, match=r"malformed.*attn1_to_q \(rank mismatch: down \(4, 64\), "
                                         r"up \(64, 8\)\)"):
        read_lora(f)


def test_rank_that_fits_no_layer_fails_naming_the_key(plain, tmp_path):
    f = write(tmp_path, one(to_kohya(TO_Q), torch.zeros(4, 32), torch.zeros(64, 4), 4))
    with pytest.raises(ValueError, match=r"attn1_to_q: lora_down \(4, 32\) / lora_up \(64, 4\) do not fit a "
                                         r"layer of weight \(64, 64\)"):
        load_lora(plain, read_lora(f))


def test_nan_weights_are_refused_everywhere_naming_the_tensor(trained, plain, tmp_path):
    d, u = ok_module(trained)
    u[3, 1] = float("nan")
    d[0, 0] = float("inf")
    f = write(tmp_path, one(to_kohya(TO_Q), d, u, 4))
    lora = read_lora(f)                                     # readable for inspection ...
    assert summarize(f)["nonfinite_values"] == 2
    pattern = "NaN/inf.*attn1_to_q.lora_down \\(1 non-finite\\), .*attn1_to_q.lora_up \\(1 non-finite\\)"
    with pytest.raises(ValueError, match=pattern):           # ... but never applied, merged or converted
        load_lora(plain, lora)
    with pytest.raises(ValueError, match=pattern):
        convert_lora(f, tmp_path / "out.safetensors", "peft")
    from adapterkit.adapters.merge import merge_loras
    with pytest.raises(ValueError, match=pattern):
        merge_loras(plain, [(lora, 1.0)])
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_alpha_fails_unless_asked_to_read_it_as_rank(trained, tmp_path):
    d, u = ok_module(trained)
    f = write(tmp_path, one(to_kohya(TO_Q), d, u) | one(to_kohya(PROJ_IN), *ok_module(trained, PROJ_IN), 2))
    key = to_kohya(TO_Q)
    with pytest.raises(ValueError, match=rf"1 of 2 modules have no alpha .*: {key}\. .*missing_alpha='rank'"):
        read_lora(f)
    lora = read_lora(f, missing_alpha="rank")
    assert lora.modules[TO_Q].alpha == 4 and lora.modules[PROJ_IN].alpha == 2 and lora.notes
    # alpha 0: kohya reads rank, diffusers reads 0. Ambiguous, so the same rule.
    f = write(tmp_path, one(to_kohya(TO_Q), d, u, 0), name="zero.safetensors")
    with pytest.raises(ValueError, match="no alpha \\(or alpha 0\\)"):
        read_lora(f)
    # A peft file without lora_adapter_metadata has no alpha either.
    f = write(tmp_path, {f"unet.{TO_Q}.lora_A.weight": d, f"unet.{TO_Q}.lora_B.weight": u},
              name="p.safetensors")
    with pytest.raises(ValueError, match=f"have no alpha .*: unet.{TO_Q}"):
        read_lora(f)


def test_non_scalar_alpha_fails(trained, tmp_path):
    d, u = ok_module(trained)
    t = one(to_kohya(TO_Q), d, u) | {f"{to_kohya(TO_Q)}.alpha": torch.ones(4)}
    with pytest.raises(ValueError, match=r"attn1_to_q.alpha \(not a scalar: shape \(4,\)\)"):
        read_lora(write(tmp_path, t))


@pytest.mark.parametrize("extra, reason", [
    ("lora_te_text_model_encoder_layers_0_self_attn_qkv.lora_down.weight", "no CLIP text-encoder layer"),
    (f"{to_kohya(TO_Q)}.lora_mid.weight", "unsupported key type .lora_mid.weight"),
    (f"{to_kohya(TO_Q)}.dora_scale", "unsupported key type .dora_scale"),
    (f"{to_kohya(TO_Q)}.hada_w1_a", "unsupported key type .hada_w1_a"),
])
def test_keys_of_other_families_are_never_dropped_silently(trained, plain, tmp_path, extra, reason):
    d, u = ok_module(trained)
    f = write(tmp_path, one(to_kohya(TO_Q), d, u, 4) | {extra: torch.zeros(2, 2)})
    lora = read_lora(f)
    assert lora.unplaced == {extra: lora.unplaced[extra]} and reason in lora.unplaced[extra]
    with pytest.raises(ValueError, match=f"1 keys could not be placed: {extra.replace('.', '[.]')} "):
        load_lora(plain, lora)
    with pytest.raises(ValueError, match=f"{extra.replace('.', '[.]')} .*--allow-unmatched"):
        convert_lora(f, tmp_path / "out.safetensors", "peft")
    report = convert_lora(f, tmp_path / "out.safetensors", "peft", allow_unmatched=True)
    assert list(report["unplaced"]) == [extra] and report["modules"] == 1


@pytest.mark.parametrize("tensors, match", [
    ({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)},
     "not a LoRA: 0 lora_up/lora_down/lora_A/lora_B keys among 2 keys"),
    ({f"{to_kohya(TO_Q)}.lora_down.weight": torch.zeros(4, 64),
      f"unet.{TO_Q}.lora_B.weight": torch.zeros(64, 4)}, "mixes kohya .* and peft"),
])
def test_files_that_are_not_one_lora_layout_fail(tmp_path, tensors, match):
    with pytest.raises(ValueError, match=match):
        read_lora(write(tmp_path, tensors))


def test_peft_metadata_problems_fail_naming_the_key(trained, tmp_path):
    d, u = ok_module(trained)
    t = {f"unet.{TO_Q}.lora_A.weight": d, f"unet.{TO_Q}.lora_B.weight": u}
    with pytest.raises(ValueError, match="metadata key lora_adapter_metadata is not a valid LoRA config"):
        read_lora(write(tmp_path, t, {"lora_adapter_metadata": "{not json"}))
    md = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}
    with pytest.raises(ValueError, match=f"unet.{TO_Q} \\(lora_adapter_metadata says rank 8, "
                                         "tensors have 4\\)"):
        read_lora(write(tmp_path, t, md, name="r.safetensors"))


def test_same_layer_under_two_names_fails(trained, tmp_path):
    d, u = ok_module(trained)
    ldm = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"           # the same layer, LDM name
    t = one(to_kohya(TO_Q), d, u, 4) | one(ldm, d, u, 4)
    with pytest.raises(ValueError, match=f"layer {TO_Q} appears twice"):
        read_lora(write(tmp_path, t), base=TINY)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"PK\x03\x04" + b"\0" * 60, "PyTorch pickle, not safetensors"),
])
def test_files_that_are_not_safetensors_are_named(tmp_path, content, match):
    f = tmp_path / "x.safetensors"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_lora(f)


# --- writing -------------------------------------------------------------------------------------------

def test_write_is_atomic_and_verified(trained, tmp_path):
    path = files(tmp_path)
    save_lora(trained, path, "style")
    before = path.read_bytes()
    lora = lora_from_model(trained, "style")
    lora.modules[TO_Q].up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        write_lora(path, lora)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]          # no temp file left
    with pytest.raises(ValueError, match="written as .safetensors only"):
        write_lora(tmp_path / "x.pt", lora_from_model(trained, "style"))


def test_kohya_export_folds_odd_attention_alphas(trained, tmp_path):
    # diffusers gives every to_q/k/v/out module the file's majority alpha (formats.md P2): a file with
    # one odd attention alpha would load wrong there. The writer folds it into lora_up instead.
    lora = lora_from_model(trained, "style")
    m = lora.modules[TO_Q]
    lora.modules[TO_Q] = LoraModule(m.down, m.up, 0.5)
    report = write_lora(files(tmp_path), lora)
    assert report["max_rel_error"] < 1e-6 and "folded" in report["notes"][0]
    back = read_lora(files(tmp_path))
    attn = {p: m.alpha for p, m in back.modules.items() if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert set(attn.values()) == {2.0}
    torch.testing.assert_close(back.modules[TO_Q].delta(), lora.modules[TO_Q].delta())


@pytest.mark.parametrize("key, claim", [("ss_base_model_version", "sdxl_base_v1-0"),
                                        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
                                        ("ss_base_model_version", "sd_v1")])
def test_metadata_that_contradicts_the_tensors_is_refused_citing_both(tmp_path, key, claim):
    """reliability.md B6: an SD1.x-shaped LoRA (attn2.to_k takes 768-wide text) whose metadata files
    it under SDXL is mislabelled or damaged; the same tensors labelled SD1.x read as before."""
    from adapterkit.adapters.lycoris_files import read_adapter
    from adapterkit.unet.weights import CheckpointError
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    tensors = {f"{stem}.lora_down.weight": torch.randn(4, 768, generator=g),
               f"{stem}.lora_up.weight": torch.randn(320, 4, generator=g), f"{stem}.alpha": torch.tensor(4.0)}
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path), metadata={key: claim})
    if claim == "sd_v1":
        assert read_adapter(path).modules                               # consistent: read as before
        return
    with pytest.raises(CheckpointError) as e:
        read_adapter(path)
    text = str(e.value)
    assert "SDXL" in text and "SD1" in text and f"{key}={claim}" in text and "768" in text
