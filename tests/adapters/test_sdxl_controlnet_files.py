"""SDXL ControlNet files (issue 16, item 2) on the reduced SDXL geometry: the diffusers folder (config.json
as diffusers writes it for SDXL) loads offline in `ControlNetModel.from_pretrained` with no missing or
unexpected keys and gives our residuals; lllyasviel and diffusers-written files read back; the
Control-LoRA in Stability's layout is what ComfyUI's ControlLora loader reads (comfy/controlnet.py:
the key rules re-derived below) and rebuilds the ControlNet to 1e-5; every file records the hint
contract and base fingerprint; the layout is detected; another family or base fails clearly."""
import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterkit.adapters.control_lora import MARKER, load_control_lora, save_control_lora
from adapterkit.adapters.controlnet import ControlNet, HintSpec
from adapterkit.adapters.controlnet_files import diffusers_config, load_controlnet, save_controlnet
from adapterkit.adapters.controlnet_keys import controlnet_key_map
from adapterkit.unet import CheckpointError, Conditioning, ldm_key_map, unet_fingerprint
from support.unets import SD15ISH, SDXL_TINY, lowrank_trained, random_unet

TOL = 1e-5


@pytest.fixture(scope="module")
def xl():
    """(base U-Net, a ControlNet off it moved by rank-3 steps, hint contract set)."""
    unet = random_unet(SDXL_TINY)
    cn = lowrank_trained(unet, rank=3)
    cn.hint = HintSpec(canny_low=100, canny_high=200)
    return unet, cn


def xl_inputs(batch=2, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(batch, 7, SDXL_TINY.context_dim, generator=g),
                        pooled=torch.randn(batch, SDXL_TINY.pooled_dim, generator=g),
                        time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024],
                                               [768, 1344, 32, 64, 832, 1216]]))
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([5, 900]), cond,
            torch.rand(batch, 3, 8 * h, 8 * w, generator=g))


def residual_diff(a, b) -> float:
    x, t, cond, hint = xl_inputs()
    with torch.no_grad():
        ra, rb = a(x, t, cond, hint, 0.9), b(x, t, cond, hint, 0.9)
    return max((p - q).abs().max().item() for p, q in zip([*ra.down, ra.mid], [*rb.down, rb.mid]))


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- diffusers ---------------------------------------------------------------------------------------------

def test_config_json_is_what_diffusers_from_unet_writes_for_sdxl():
    d_unet = UNet2DConditionModel(**{k: v for k, v in SDXL_TINY.to_diffusers().items() if k[0] != "_"})
    written = ControlNetModel.from_unet(d_unet).config
    theirs = {k: list(v) if isinstance(v, tuple) else v for k, v in written.items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = diffusers_config(ControlNet(SDXL_TINY))
    assert {k: v for k, v in ours.items() if k != "_class_name"} == theirs      # every key, both ways
    assert ours["addition_embed_type"] == "text_time" and ours["projection_class_embeddings_input_dim"] == 80
    assert ours["transformer_layers_per_block"] == [1, 2, 3]


def test_diffusers_folder_loads_offline_in_diffusers_with_our_residuals(xl, tmp_path):
    unet, cn = xl
    save_controlnet(cn, tmp_path / "cn")
    config = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time" and config["addition_time_embed_dim"] == 8
    theirs, info = ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True,
                                                   output_loading_info=True)
    assert all(not v for v in info.values()), info                      # no missing/unexpected/mismatched
    x, t, cond, hint = xl_inputs()
    with torch.no_grad():
        for scale, guess in [(1.0, False), (0.5, False), (1.0, True)]:
            down, mid = theirs.eval()(x, t, cond.context, hint, conditioning_scale=scale, guess_mode=guess,
                                      added_cond_kwargs={"text_embeds": cond.pooled,
                                                         "time_ids": cond.time_ids.float()},
                                      return_dict=False)
            ours = cn(x, t, cond, hint, scale, guess)
            for a, b in zip([*ours.down, ours.mid], [*down, mid]):
                torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    back = load_controlnet(tmp_path / "cn", unet)
    assert same_weights(back, cn) and back.hint == cn.hint and back.base_fingerprint == unet_fingerprint(unet)
    # diffusers' own save_pretrained: no metadata, the SDXL config comes from its config.json
    theirs.save_pretrained(tmp_path / "theirs")
    plain = load_controlnet(tmp_path / "theirs")
    assert plain.config.replace(sample_size=0) == SDXL_TINY.replace(sample_size=0)
    assert same_weights(plain, cn) and plain.base_fingerprint is None


def test_lllyasviel_and_single_files_read_back_and_infer_sdxl_from_shapes(xl, tmp_path):
    unet, cn = xl
    names = controlnet_key_map(SDXL_TINY)
    assert names["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert names["controlnet_down_blocks.8.weight"] == "zero_convs.8.0.weight"
    save_controlnet(cn, tmp_path / "cn.lllyasviel.safetensors", layout="lllyasviel")
    save_controlnet(cn, tmp_path / "cn.safetensors")
    for path in ("cn.lllyasviel.safetensors", "cn.safetensors"):
        assert same_weights(load_controlnet(tmp_path / path, unet), cn)
        bare = tmp_path / f"bare-{path}"               # another tool's file: no metadata, no config.json
        save_file(load_file(tmp_path / path), bare)
        back = load_controlnet(bare, unet)
        assert same_weights(back, cn) and back.config == unet.config


# --- Control-LoRA --------------------------------------------------------------------------------------

def comfy_control_lora(tensors: dict, unet) -> dict:
    """The ControlNet weights ComfyUI's ControlLora.pre_run builds from `tensors` on base `unet`, by LDM
    name (comfy/controlnet.py, ControlLora.pre_run and ControlLoraOps): the control model is built from
    the base's U-Net config; every base weight is copied in under its own LDM name where the control
    model has that attribute; then every file key but `lora_controlnet` is set as an attribute by its
    path: a full tensor replaces the weight, `<layer>.up` / `<layer>.down` go onto a Linear/Conv2d,
    whose forward uses weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape). Layers the base
    lacks (hint encoder, zero convs) have no weight unless the file sets one."""
    cn_names = set(controlnet_key_map(unet.config).values())
    base = unet.state_dict()
    weights = {ldm: base[ours] for ours, ldm in ldm_key_map(unet.config).items() if ldm in cn_names}
    ups = {}
    for key, t in tensors.items():
        if key == MARKER:
            continue
        stem, _, part = key.rpartition(".")
        if part in ("up", "down"):
            assert f"{stem}.weight" in cn_names, f"{key}: ComfyUI puts it on no layer"
            ups.setdefault(stem, {})[part] = t.float()
        else:
            assert key in cn_names, f"{key}: no such tensor in ComfyUI's control model"
            weights[key] = t.float()
    for stem, d in ups.items():
        w = weights[f"{stem}.weight"]
        assert w.ndim >= 2, f"{stem}: up/down on a norm would be ignored by ComfyUI"
        weights[f"{stem}.weight"] = w.float() + (d["up"].flatten(1) @ d["down"].flatten(1)).reshape(w.shape)
    assert set(weights) == cn_names, f"without a weight: {sorted(cn_names - set(weights))[:5]}"
    return weights


def test_control_lora_is_what_comfyui_reads_and_rebuilds_the_controlnet(xl, tmp_path):
    unet, cn = xl
    path = tmp_path / "cl.safetensors"
    report = save_control_lora(cn, unet, path, rank=3, dtype=None)
    assert report.max_error < 1e-5 and report.ratio > 1
    tensors = load_file(path)
    assert tensors[MARKER].numel() == 0
    assert "label_emb.0.0.up" in tensors and "label_emb.0.0.bias" in tensors       # the added embedding
    assert "input_blocks.7.1.transformer_blocks.2.attn2.to_k.down" in tensors     # SDXL's depth-3 stage
    assert not any(k.startswith("input_hint_block.") and k.endswith((".up", ".down")) for k in tensors)
    comfy = comfy_control_lora(tensors, unet)
    names = controlnet_key_map(SDXL_TINY)
    for ours, w in cn.state_dict().items():
        assert (comfy[names[ours]] - w).abs().max().item() <= TOL, ours
    bare = tmp_path / "stability.safetensors"              # as Stability's files: no adapterkit metadata
    save_file(tensors, bare)
    for back in (load_control_lora(path, unet), load_controlnet(path, unet), load_controlnet(bare, unet)):
        assert residual_diff(back, cn) <= TOL
        assert back.base_fingerprint == unet_fingerprint(unet)
    assert load_controlnet(path, unet).hint == cn.hint
    with safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"].endswith("/control-lora")
    assert json.loads(md["adapterkit.hint"])["canny_low"] == 100
    assert md["adapterkit.base_fingerprint"] == unet_fingerprint(unet)


def test_other_bases_and_families_fail_clearly(xl, tmp_path):
    unet, cn = xl
    path = tmp_path / "cl.safetensors"
    save_control_lora(cn, unet, path, rank=2, dtype=None)
    other = random_unet(SDXL_TINY, seed=7)
    with pytest.raises(ValueError, match=f"fingerprint {unet_fingerprint(unet)}.*{unet_fingerprint(other)}"):
        load_control_lora(path, other)
    sd1 = random_unet(SD15ISH)
    with pytest.raises(CheckpointError, match=r"An SDXL Control-LoRA cannot steer an SD1\.x U-Net"):
        load_controlnet(path, sd1)
    save_controlnet(cn, tmp_path / "cn")
    with pytest.raises(ValueError, match=r"An SDXL ControlNet cannot steer an SD1\.x U-Net"):
        load_controlnet(tmp_path / "cn", sd1)
    sd1_cn = ControlNet.from_unet(sd1)
    save_controlnet(sd1_cn, tmp_path / "sd1.safetensors")
    save_control_lora(lowrank_trained(sd1, 2), sd1, tmp_path / "sd1-cl.safetensors", rank=2)
    for name, what in [("sd1.safetensors", "ControlNet"), ("sd1-cl.safetensors", "Control-LoRA")]:
        with pytest.raises(ValueError, match=rf"An SD1\.x {what} cannot steer an SDXL U-Net"):
            load_controlnet(tmp_path / name, unet)
        bare = tmp_path / f"bare-{name}"                 # no metadata: the shapes tell
        save_file(load_file(tmp_path / name), bare)
        with pytest.raises(ValueError, match=rf"An SD1\.x {what} cannot steer an SDXL U-Net"):
            load_controlnet(bare, unet)
