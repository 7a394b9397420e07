"""U-Net checkpoints: diffusers folders and LDM single files against diffusers itself (the oracle),
config inference, the LDM key table, every bad file of reliability.md §5.A that load_unet meets, and
atomic saves. Offline: everything is built here and read from tmp_path."""
import copy
import functools
import json
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterkit.unet.checkpoint as checkpoint_module
import adapterkit.unet.weights as weights_module
from adapterkit.unet import (
    PRESETS,
    CheckpointError,
    Stage,
    UNet,
    UNetConfig,
    infer_unet_config,
    ldm_key_map,
    load_unet,
    save_unet,
    unet_fingerprint,
)
from adapterkit.unet.ldm_keys import LDM_PREFIX

TOL = 1e-5
CONFIGS = {
    "tiny": PRESETS["tiny"],
    # SD1.5's layout at 1/10 width: attention in stages 0-2, conv proj_in/out, 8 heads, L=2.
    "sd15-like": UNetConfig(stages=(Stage(32), Stage(32), Stage(64), Stage(64, attention=False)),
                            context_dim=32),
    # SD2.1's layout: linear proj_in/out and head width 64 (so the narrowest widths are 64 and 128).
    "sd21-like": UNetConfig(stages=(Stage(64, heads=1), Stage(128, heads=2),
                                    Stage(128, attention=False, heads=2)),
                            context_dim=32, linear_projection=True),
}


@functools.cache
def diffusers_unet(name: str) -> UNet2DConditionModel:
    """A diffusers U-Net with every parameter perturbed (a swapped norm must not hide at 1/0)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**{k: v for k, v in CONFIGS[name].to_diffusers().items() if k[0] != "_"})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> a folder written by diffusers' own save_pretrained."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name in CONFIGS:
        diffusers_unet(name).save_pretrained(root / name)
        out[name] = root / name
    return out


def max_diff(ours: UNet, theirs: UNet2DConditionModel, cfg: UNetConfig) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g)
    with torch.no_grad():
        return (ours.eval()(x, t, ctx) - theirs(x, t, ctx).sample).abs().max().item()


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# --- diffusers folders -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_loads_strictly_and_matches_diffusers(name, folders):
    theirs = diffusers_unet(name)
    ours = load_unet(folders[name])
    assert ours.config == CONFIGS[name]
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    assert max_diff(ours, theirs, CONFIGS[name]) <= TOL


def test_pipeline_folder_with_unet_subfolder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    diffusers_unet("sd15-like").save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path)
    assert ours.config == CONFIGS["sd15-like"]
    assert max_diff(ours, diffusers_unet("sd15-like"), CONFIGS["sd15-like"]) <= TOL


def test_fp16_variant_sharded_folder_dtype_and_device(tmp_path):
    theirs = diffusers_unet("tiny")
    copy.deepcopy(theirs).half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = load_unet(tmp_path / "fp16")
    expected = {k: v.half().float() for k, v in theirs.state_dict().items()}
    assert_same_tensors(ours.state_dict(), expected)          # dtype=None means float32

    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = load_unet(tmp_path / "sharded", dtype=torch.bfloat16, device="meta")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in ours.parameters()} == {"meta"}
    assert_same_tensors(load_unet(tmp_path / "sharded").state_dict(), theirs.state_dict())


def test_diffusers_loads_the_folder_we_save(tmp_path, folders):
    ours = load_unet(folders["sd15-like"])
    save_unet(ours, tmp_path / "ours")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(ours, theirs, ours.config) <= TOL
    meta = safe_open(tmp_path / "ours" / "diffusion_pytorch_model.safetensors", "pt").metadata()
    assert meta == {"format": "pt"}


# --- LDM single files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_ldm_file_is_what_diffusers_converts_back_exactly(name, folders, tmp_path):
    theirs = diffusers_unet(name)
    save_unet(load_unet(folders[name]), tmp_path / "unet.safetensors", layout="ldm")
    checkpoint = load_file(tmp_path / "unet.safetensors")
    assert all(k.startswith(LDM_PREFIX) for k in checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(theirs.config))
    assert_same_tensors(converted, theirs.state_dict())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_to_ldm_to_diffusers_is_bit_exact(name, folders, tmp_path):
    theirs = diffusers_unet(name)
    save_unet(load_unet(folders[name]), tmp_path / "ldm.safetensors", layout="ldm")
    meta = safe_open(tmp_path / "ldm.safetensors", "pt").metadata()
    assert meta["format"] == "pt"
    assert UNetConfig.from_dict(json.loads(meta["adapterkit.unet_config"])) == CONFIGS[name]
    ours = load_unet(tmp_path / "ldm.safetensors")
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    weights = save_unet(ours, tmp_path / "back")
    assert_same_tensors(load_file(weights), theirs.state_dict())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert UNetConfig.from_diffusers(config) == CONFIGS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_single_file_without_metadata_infers_config_and_ignores_other_models(name, tmp_path):
    # A checkpoint as released: U-Net + VAE + text encoder + EMA copies + schedule, no metadata.
    theirs = diffusers_unet(name)
    key_map = ldm_key_map(CONFIGS[name])
    full = {LDM_PREFIX + key_map[k]: v for k, v in theirs.state_dict().items()}
    full.update({"first_stage_model.encoder.conv_in.weight": torch.ones(4, 3, 3, 3),
                 "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(8),
                 "model_ema.diffusion_modelinput_blocks00weight": torch.full((2,), float("nan")),
                 "alphas_cumprod": torch.linspace(1, 0, 10)})
    save_file(full, tmp_path / "sd.safetensors")
    ours = load_unet(tmp_path / "sd.safetensors")
    assert ours.config == CONFIGS[name]              # the head rule gives the true heads here
    assert_same_tensors(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("explicit", [False, True])
def test_bare_diffusers_keyed_file(explicit, tmp_path):
    theirs = diffusers_unet("sd21-like")
    save_file(theirs.state_dict(), tmp_path / "unet.safetensors")
    ours = load_unet(tmp_path / "unet.safetensors", config=CONFIGS["sd21-like"] if explicit else None)
    assert ours.config == CONFIGS["sd21-like"]
    assert_same_tensors(ours.state_dict(), theirs.state_dict())


def test_ldm_key_map_is_a_bijection_with_the_documented_names():
    key_map = ldm_key_map(PRESETS["sd15"])
    assert len(key_map) == len(set(key_map.values())) == 686
    prefixes = {".".join(d.split(".")[:-1]): ".".join(l.split(".")[:-1]) for d, l in key_map.items()}
    # shared/research/formats.md §2.3, the SD1.5 prefix map
    for ours, ldm in [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_2", "time_embed.2"),
                      ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
                      ("down_blocks.0.attentions.1.proj_in", "input_blocks.2.1.proj_in"),
                      ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
                      ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
                      ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
                      ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
                      ("mid_block.resnets.0.norm1", "middle_block.0.in_layers.0"),
                      ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
                       "middle_block.1.transformer_blocks.0.attn2.to_k"),
                      ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
                      ("up_blocks.0.resnets.2.norm2", "output_blocks.2.0.out_layers.0"),
                      ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
                      ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                      ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv"),
                      ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
                      ("conv_norm_out", "out.0"), ("conv_out", "out.2")]:
        assert prefixes[ours] == ldm, ours


INFER_CASES = {**CONFIGS, "sd15": PRESETS["sd15"], "sd21": PRESETS["sd21"],
               # inpainting-like input, two transformer layers, three ResNets per stage
               "odd": UNetConfig(stages=(Stage(32, depth=2), Stage(64, attention=False)), in_channels=9,
                                 out_channels=8, layers_per_block=3, context_dim=40)}


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
@pytest.mark.parametrize("name", list(INFER_CASES))
def test_inferred_config_equals_the_true_config(name, layout):
    cfg = INFER_CASES[name]
    with torch.device("meta"):                     # shapes are all inference reads
        state = UNet(cfg).state_dict()
    if layout == "ldm":
        key_map = ldm_key_map(cfg)
        state = {LDM_PREFIX + key_map[k]: v for k, v in state.items()}
    assert infer_unet_config(state) == cfg


# --- bad files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny.safetensors"
    save_unet(UNet(PRESETS["tiny"]), path, layout="ldm")
    return path.read_bytes()


def _torch_zip(path):
    torch.save({"state_dict": {"a": torch.zeros(2)}}, path)
    return path.read_bytes()


BAD_FILES = {
    "truncated": (lambda good, p: good[: len(good) // 2], ["truncated", "missing", "get the file again"]),
    "cut in header": (lambda good, p: good[:40], ["truncated", "header declares"]),
    "trailing bytes": (lambda good, p: good + b"\0" * 8, ["8 unexpected bytes", "corrupt"]),
    "empty": (lambda good, p: b"", ["empty (0 bytes)"]),
    "lfs pointer": (lambda good, p: b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                    + b"ab" * 32 + b"\nsize 3438167536\n", ["Git LFS pointer", "git lfs pull"]),
    "html page": (lambda good, p: b"\n<!DOCTYPE html><html><body>Access denied</body></html>",
                  ["HTML page", "Download the file again"]),
    "renamed torch.save": (lambda good, p: _torch_zip(p), ["PyTorch pickle", "Rename it to .ckpt",
                                                           "allow_pickle=True"]),
    "other bytes": (lambda good, p: b"GIF89a" + bytes(range(200)), ["not a safetensors file", "GIF89a"]),
    "duplicate key": (lambda good, p: _with_header(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                                   b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                                                   b"\0" * 4), ["more than once", "'a'"]),
}


def _with_header(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_weights_file_is_named_and_explained(case, good_bytes, tmp_path):
    make, phrases = BAD_FILES[case]
    path = tmp_path / "model-v1.safetensors"
    path.write_bytes(make(good_bytes, path))
    with pytest.raises(CheckpointError) as err:
        load_unet(path)
    message = str(err.value)
    assert "model-v1.safetensors" in message
    for phrase in phrases:
        assert phrase.lower() in message.lower(), (phrase, message)


def _tiny_state():
    return {k: v.clone() for k, v in diffusers_unet("tiny").state_dict().items()}


def _load_broken(tmp_path, state, **kwargs):
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_unet(tmp_path / "broken.safetensors", **kwargs)
    assert "broken.safetensors" in str(err.value)
    return str(err.value)


def test_missing_tensors_are_listed_and_counted(tmp_path):
    state = _tiny_state()
    gone = sorted(state)[:7]
    for k in gone:
        del state[k]
    message = _load_broken(tmp_path, state, config="tiny")
    assert "7 missing tensors" in message and gone[0] in message and "(2 more)" in message


def test_missing_tensors_of_an_ldm_file_are_named_as_in_the_file(tmp_path):
    key_map = ldm_key_map(CONFIGS["tiny"])
    state = {LDM_PREFIX + key_map[k]: v for k, v in _tiny_state().items()}
    del state[LDM_PREFIX + "out.2.weight"]
    message = _load_broken(tmp_path, state, config="tiny")
    assert "1 missing tensors (model.diffusion_model.out.2.weight)" in message


def test_unexpected_tensors_are_listed_and_counted(tmp_path):
    state = _tiny_state()
    state["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(3)
    state["mid_block.gate"] = torch.zeros(1)
    message = _load_broken(tmp_path, state)
    assert "2 unexpected tensors" in message
    assert "down_blocks.0.resnets.0.extra.weight" in message and "mid_block.gate" in message


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    state = _tiny_state()
    state["down_blocks.1.resnets.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    message = _load_broken(tmp_path, state)
    assert "down_blocks.1.resnets.0.conv2.weight: expected [64, 64, 3, 3], found [64, 64, 1, 1]" in message


def test_nan_and_inf_weights_are_named(tmp_path):
    state = _tiny_state()
    state["conv_in.bias"][3] = float("nan")
    state["up_blocks.0.attentions.0.proj_out.weight"][0, 0] = float("inf")
    message = _load_broken(tmp_path, state)
    assert "NaN or inf values in 2 tensors" in message
    assert "conv_in.bias (1 of 32 values)" in message
    assert "up_blocks.0.attentions.0.proj_out.weight (1 of 16384 values)" in message


def test_given_config_that_disagrees_with_the_weights_names_the_fields(tmp_path):
    message = _load_broken(tmp_path, _tiny_state(), config="sd15")
    assert "config='sd15' does not match" in message
    assert "stage channels: config (320, 640, 1280, 1280), weights (32, 64, 128)" in message
    assert "layers_per_block: config 2, weights 1" in message
    assert "context_dim: config 768, weights 64" in message


def test_config_json_that_disagrees_with_the_weights_is_named(folders, tmp_path):
    folder = tmp_path / "edited"
    diffusers_unet("sd15-like").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["cross_attention_dim"] = 768
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(str(folder / "config.json"))) as err:
        load_unet(folder)
    assert "context_dim: config 768, weights 32" in str(err.value)


def test_missing_path_and_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors does not exist"):
        load_unet(tmp_path / "nowhere.safetensors")
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "README.md").write_text("hi")
    with pytest.raises(CheckpointError) as err:
        load_unet(folder)
    message = str(err.value)
    assert "empty-model" in message and "diffusion_pytorch_model.safetensors" in message
    assert "unet/ subfolder" in message and "README.md" in message


def test_lora_and_sdxl_files_are_recognised_as_such(tmp_path):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    assert "LoRA file" in _load_broken(tmp_path, lora)
    key_map = ldm_key_map(CONFIGS["tiny"])
    sdxl = {LDM_PREFIX + key_map[k]: v for k, v in _tiny_state().items()}
    sdxl[LDM_PREFIX + "label_emb.0.0.weight"] = torch.zeros(128, 16)
    assert "SDXL" in _load_broken(tmp_path, sdxl)


# --- pickles ---------------------------------------------------------------------------------------

def test_pickle_refused_by_default_and_read_weights_only_when_allowed(tmp_path):
    theirs = diffusers_unet("tiny")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": theirs.state_dict(), "global_step": 3}, path)
    with pytest.raises(CheckpointError) as err:
        load_unet(path)
    assert "model.ckpt" in str(err.value) and "allow_pickle=True" in str(err.value)
    assert "arbitrary code" in str(err.value)
    ours = load_unet(path, allow_pickle=True)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())


def _make_sentinel(path):
    open(path, "w").close()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _make_sentinel, (self.path,)


def test_pickle_with_code_is_not_executed_even_when_allowed(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(1)}, "x": _Evil(str(sentinel))},
               tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_unet(tmp_path / "evil.pt", allow_pickle=True)
    assert not sentinel.exists()
    assert "evil.pt" in str(err.value) and "_make_sentinel" in str(err.value)


# --- saving ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(layout, tmp_path, monkeypatch):
    target = tmp_path / ("unet.safetensors" if layout == "ldm" else "unet")
    save_unet(UNet(PRESETS["tiny"]), target, layout=layout)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")          # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    for module in (checkpoint_module, weights_module):                  # folder and single-file writers
        monkeypatch.setattr(module, "save_file", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        save_unet(UNet(PRESETS["tiny"]), target, layout=layout)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_save_casts_dtype_and_refuses_a_model_with_extra_layers(tmp_path):
    model = UNet(PRESETS["tiny"])
    path = save_unet(model, tmp_path / "half.safetensors", layout="ldm", dtype=torch.float16)
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    model.conv_in.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="conv_in.lora_A"):
        save_unet(model, tmp_path / "x.safetensors", layout="ldm")


def test_fingerprint_identifies_weights_across_dtype_and_reload(tmp_path):
    model = UNet(PRESETS["tiny"])
    fp = unet_fingerprint(model)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{16}", fp)
    assert unet_fingerprint(model.state_dict()) == fp
    assert unet_fingerprint({k: v.half() for k, v in model.state_dict().items()}) == fp
    save_unet(model, tmp_path / "m.safetensors", layout="ldm")
    assert unet_fingerprint(load_unet(tmp_path / "m.safetensors")) == fp
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    changed["up_blocks.1.resnets.0.conv1.weight"] += 1e-2
    other = unet_fingerprint(changed)
    assert other != fp and other[:8] == fp[:8]               # same architecture, other weights
    assert unet_fingerprint(UNet(CONFIGS["sd15-like"]))[:8] != fp[:8]
