"""SDXL bases (issue 15, item 2): diffusers SDXL pipeline folders and SGM single files, two text encoders,
eps and v-prediction, the VAE's precision, and the files adapterkit refuses (a missing text encoder, a
refiner).

Oracles, on a reduced SDXL geometry (support.pipelines.build_tiny_sdxl_pipeline: SDXL_TINY U-Net, text
encoders 16 + 48 wide, the second projecting to 32): diffusers' StableDiffusionXLPipeline.encode_prompt for
the text conditioning, and diffusers' convert_open_clip_checkpoint for the OpenCLIP names of a single
file's second encoder (random tensors). Offline: every model is built here.
"""
import json
import shutil

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_images, encode_text
from adapterkit.train.pipeline.parts import CONFIGS, UnsupportedCheckpoint
from adapterkit.train.pipeline.single_file import openclip_names
from adapterkit.unet import CheckpointError, read_weights
from adapterkit.unet.families import family_like
from adapterkit.unet.weights import write_safetensors
from support.pipelines import SDXL_TEXT_WIDTHS, build_tiny_sdxl_pipeline, sdxl_scheduler_config
from support.single_files import configs_only, openclip_from_transformers, sdxl_single_file
from support.unets import SDXL_TINY

PROMPTS = ["a red circle on a blue background", "", "z" * 100]
TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(pipe_dir, local_files_only=True)


@pytest.fixture(scope="module")
def base(pipe_dir):
    return load_base(pipe_dir)


@pytest.fixture(scope="module")
def single(pipe_dir, pipe, tmp_path_factory):
    """The pipeline as one SGM-layout file, and a config_dir of its configs (no weights)."""
    root = tmp_path_factory.mktemp("single")
    f = sdxl_single_file(pipe_dir, pipe, root / "model.safetensors")
    return f, configs_only(pipe_dir, root / "configs")


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- pipeline folders ----------------------------------------------------------------------------------

def test_folder_loads_both_text_encoders_by_the_family_rows(base, pipe):
    assert family_like(base.unet.config).name == "sdxl" and base.family.name == "tiny"   # reduced widths
    assert [p.spec.folder for p in base.text] == ["text_encoder", "text_encoder_2"]
    assert [type(m).__name__ for m in base.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert base.text_encoder is base.text_encoders[0] and base.tokenizer is base.tokenizers[0]
    assert same_state(base.text_encoders[0], pipe.text_encoder)
    assert same_state(base.text_encoders[1], pipe.text_encoder_2)
    assert base.tokenizers[1].pad_token == "!" and base.tokenizers[0].pad_token == "<|endoftext|>"
    assert base.context_dim == sum(SDXL_TEXT_WIDTHS) == SDXL_TINY.context_dim and base.time_ids == 6
    assert base.empty_prompt_zeros                       # model_index.json: force_zeros_for_empty_prompt
    for module in (base.unet, base.vae, *base.text_encoders):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert "+" in base.fingerprint.text_encoder          # both encoders and tokenizers key the text cache


def test_encode_text_equals_the_pipelines_encode_prompt(base, pipe):
    with pytest.warns(UserWarning, match="caption truncated"):
        ours = encode_text(base, PROMPTS)
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert ours.context.shape == (3, 77, 64) and ours.pooled.shape == (3, SDXL_TINY.pooled_dim)
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert ours.time_ids is None                         # a picture's geometry, not its caption, gives them
    # the concatenation order shows: the first 16 features are the first encoder's penultimate layer
    with torch.no_grad():
        ids = base.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        first = base.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(ours.context[:1, :, :SDXL_TEXT_WIDTHS[0]], first)


def test_float16_keeps_the_sdxl_vae_in_float32(pipe_dir, tmp_path):
    half = load_base(pipe_dir, dtype=torch.float16)
    assert half.vae.dtype == torch.float32 and half.unet.conv_in.weight.dtype == torch.float16
    assert all(m.dtype == torch.float16 for m in half.text_encoders)
    # a VAE made for fp16 (config force_upcast false, like the fp16-fixed SDXL VAE) runs in fp16
    folder = shutil.copytree(pipe_dir, tmp_path / "fixed")
    cfg = json.loads((folder / "vae/config.json").read_text())
    (folder / "vae/config.json").write_text(json.dumps(cfg | {"force_upcast": False}))
    assert load_base(folder, dtype=torch.float16).vae.dtype == torch.float16


def test_a_v_prediction_folder_and_zero_terminal_snr(pipe_dir, tmp_path):
    folder = shutil.copytree(pipe_dir, tmp_path / "vpred")
    cfg = sdxl_scheduler_config("v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(cfg))
    loaded = load_base(folder)
    assert loaded.prediction_type == "v_prediction" and loaded.scheduler_config["rescale_betas_zero_snr"]


# --- single files ----------------------------------------------------------------------------------------

def test_openclip_names_are_diffusers_conversion(tmp_path):
    """Random tensors in OpenCLIP's names (a 48-wide tower, 2 blocks, projection to 32): ours and
    diffusers' convert_open_clip_checkpoint give the same transformers state dict."""
    config = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                            projection_dim=32, vocab_size=100, max_position_embeddings=77)
    g = torch.Generator().manual_seed(0)
    state = {"token_embedding.weight": (100, 48), "positional_embedding": (77, 48), "ln_final.weight": (48,),
             "ln_final.bias": (48,), "text_projection": (48, 32), "logit_scale": ()}
    for i in range(2):
        b = f"transformer.resblocks.{i}."
        state |= {b + "ln_1.weight": (48,), b + "ln_1.bias": (48,), b + "ln_2.weight": (48,),
                  b + "ln_2.bias": (48,), b + "attn.in_proj_weight": (144, 48),
                  b + "attn.in_proj_bias": (144,), b + "attn.out_proj.weight": (48, 48),
                  b + "attn.out_proj.bias": (48,), b + "mlp.c_fc.weight": (96, 48),
                  b + "mlp.c_fc.bias": (96,), b + "mlp.c_proj.weight": (48, 96), b + "mlp.c_proj.bias": (48,)}
    state = {k: torch.randn(s, generator=g) for k, s in state.items()}
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    theirs = convert_open_clip_checkpoint(model, {TE2 + k: v for k, v in state.items()}, prefix=TE2)
    ours, unplaced = openclip_names(state, 48)
    assert unplaced == [] and ours.keys() == theirs.keys() == model.state_dict().keys() - {
        "text_model.embeddings.position_ids"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the test's own inverse (support.single_files) is what diffusers converts back
    inverse = {TE2 + k: v for k, v in openclip_from_transformers(ours).items()}
    again = convert_open_clip_checkpoint(model, inverse, prefix=TE2)
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_single_file_loads_the_same_model(single, base, pipe, pipe_dir):
    f, configs = single
    loaded = load_base(f, config_dir=configs)
    assert [type(m).__name__ for m in loaded.text_encoders] == ["CLIPTextModel",
                                                                "CLIPTextModelWithProjection"]
    assert same_state(loaded.unet, base.unet) and same_state(loaded.vae, pipe.vae)
    assert same_state(loaded.text_encoders[0], pipe.text_encoder)
    assert same_state(loaded.text_encoders[1], pipe.text_encoder_2)
    assert loaded.fingerprint == base.fingerprint and loaded.scheduler_config == base.scheduler_config
    assert loaded.empty_prompt_zeros
    px = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(encode_images(loaded, px), encode_images(base, px))
    a, b = encode_text(loaded, PROMPTS[:2]), encode_text(base, PROMPTS[:2])
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_one_bare_tokenizer_folder_serves_both_encoders(single, base, pipe_dir, tmp_path):
    """The CLIP ViT-L tokenizer alone (what most users have beside a single file): the second tokenizer
    is the same vocabulary with SDXL's shipped settings (pad "!"), so the base is the folder's."""
    f, configs = single
    bare = configs_only(pipe_dir, tmp_path / "configs")
    shutil.rmtree(bare / "tokenizer")
    shutil.rmtree(bare / "tokenizer_2")
    loaded = load_base(f, tokenizer=pipe_dir / "tokenizer", config_dir=bare)
    assert loaded.tokenizers[1].pad_token == "!" and loaded.fingerprint == base.fingerprint
    shipped = json.loads((CONFIGS / "base/sdxl/tokenizer_2/tokenizer_config.json").read_text())
    assert shipped["pad_token"] == "!"
    # a pipeline folder as tokenizer= gives each encoder its own
    assert load_base(f, tokenizer=pipe_dir, config_dir=bare).fingerprint == base.fingerprint


@pytest.mark.parametrize("marks, metadata, expect", [
    ({"v_pred": torch.tensor([])}, {}, ("v_prediction", False)),
    ({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, {}, ("v_prediction", True)),
    ({}, {"modelspec.prediction_type": "v"}, ("v_prediction", False)),
    ({}, {"modelspec.prediction_type": "epsilon"}, ("epsilon", False)),
    ({}, {}, ("epsilon", False)),
], ids=["v_pred marker", "v_pred + ztsnr", "modelspec v", "modelspec epsilon", "silent"])
def test_a_single_file_says_its_prediction_type(single, tmp_path, marks, metadata, expect):
    tensors, meta = read_weights(single[0])
    out = tmp_path / "marked.safetensors"
    write_safetensors(tensors | marks, out, meta | metadata)
    configs = shutil.copytree(single[1], tmp_path / "configs")
    shutil.rmtree(configs / "scheduler")                 # the family default, and what the file says
    loaded = load_base(out, config_dir=configs)
    assert (loaded.prediction_type, loaded.scheduler_config.get("rescale_betas_zero_snr", False)) == expect
    if expect[0] == "v_prediction":
        with pytest.warns(UserWarning, match="overrides the file's own 'v_prediction'"):
            assert load_base(out, config_dir=configs, prediction_type="epsilon").prediction_type == "epsilon"


def test_shipped_sdxl_configs_are_the_real_sizes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    def load(part):
        d = json.loads((CONFIGS / "base/sdxl" / part / "config.json").read_text())
        return {k: v for k, v in d.items() if not k.startswith("_")}

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**load("text_encoder")))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**load("text_encoder_2")))
        vae = AutoencoderKL.from_config(load("vae"))
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in big_g.parameters()) == 694_659_840
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert clip_l.config.hidden_size + big_g.config.hidden_size == 2048
    assert big_g.config.projection_dim == 1280
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast


# --- refusals ----------------------------------------------------------------------------------------

def _refiner_folder(pipe_dir, folder):
    shutil.copytree(pipe_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
              "tokenizer": [None, None], "requires_aesthetics_score": True}
    (folder / "model_index.json").write_text(json.dumps(index))


def _five_id_unet(pipe_dir, folder):
    """The base folder with a refiner-like U-Net: 5 ids x 8 + 32 pooled = 72 added-embedding inputs."""
    from diffusers import UNet2DConditionModel
    shutil.copytree(pipe_dir, folder)
    cfg = json.loads((folder / "unet/config.json").read_text())
    ids = 5 * SDXL_TINY.addition_time_embed_dim
    cfg["projection_class_embeddings_input_dim"] = SDXL_TINY.pooled_dim + ids
    shutil.rmtree(folder / "unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    unet.save_pretrained(folder / "unet")


def _file_without(single, out, prefix):
    tensors, meta = read_weights(single[0])
    write_safetensors({k: v for k, v in tensors.items() if not k.startswith(prefix)}, out, meta)


def _file_with(single, out, changes):
    tensors, meta = read_weights(single[0])
    tensors |= changes
    tensors = {k: v for k, v in tensors.items() if v is not None}
    write_safetensors(tensors, out, meta)


@pytest.mark.parametrize("case, error, match", [
    ("no second encoder", CheckpointError,
     r"no conditioner\.embedders\.1\.model\.\* tensors.*holds conditioner\.embedders\.0\.\* only"),
    ("no first encoder", CheckpointError,
     r"no conditioner\.embedders\.0\.transformer\.\* tensors.*holds conditioner\.embedders\.1\.\* only"),
    ("refiner file", UnsupportedCheckpoint,
     r"SDXL refiner \(its only text encoder is OpenCLIP under conditioner\.embedders\.0\.model\.\*\).*base"),
    ("openclip tensor missing", CheckpointError,
     r"text encoder \(conditioner\.embedders\.1\.model\.\*\) .*1 missing tensors "
     r"\(text_model\.final_layer_norm\.weight\)"),
    ("stray openclip tensor", CheckpointError,
     r"tensors that have no place \(conditioner\.embedders\.1\.model\.transformer\.extra\.weight\)"),
    ("refiner folder", UnsupportedCheckpoint, r"SDXL refiner \(its model_index\.json lists no text_encoder"),
    ("aesthetic score", UnsupportedCheckpoint, r"SDXL refiner \(its model_index\.json sets "
                                               r"requires_aesthetics_score\).*5 ids"),
    ("five-id U-Net", CheckpointError, r"takes 72 inputs, read as 24 pooled \+ 6 ids x 8, but text_encoder_2 "
                                       r"projects to 32.*72 inputs is an SDXL refiner's U-Net"),
    ("no text_encoder_2 folder", CheckpointError, r"has no text_encoder_2/"),
])
def test_bad_sdxl_input_is_refused_clearly(single, pipe_dir, tmp_path, case, error, match):
    f, configs = tmp_path / "model.safetensors", single[1]
    if case == "no second encoder":
        _file_without(single, f, TE2)
    elif case == "no first encoder":
        _file_without(single, f, "conditioner.embedders.0.")
    elif case == "refiner file":
        tensors, meta = read_weights(single[0])
        tensors = {k.replace(TE2, "conditioner.embedders.0.model."): v for k, v in tensors.items()
                   if not k.startswith("conditioner.embedders.0.")}
        write_safetensors(tensors, f, meta)
    elif case == "openclip tensor missing":
        _file_with(single, f, {TE2 + "ln_final.weight": None})
    elif case == "stray openclip tensor":
        _file_with(single, f, {TE2 + "transformer.extra.weight": torch.zeros(2)})
    elif case == "refiner folder":
        _refiner_folder(pipe_dir, f := tmp_path / "refiner")
    elif case == "aesthetic score":
        index_file = shutil.copytree(pipe_dir, f := tmp_path / "aes") / "model_index.json"
        index = json.loads(index_file.read_text()) | {"requires_aesthetics_score": True}
        index_file.write_text(json.dumps(index))
    elif case == "five-id U-Net":
        _five_id_unet(pipe_dir, f := tmp_path / "five")
    elif case == "no text_encoder_2 folder":
        shutil.rmtree(shutil.copytree(pipe_dir, f := tmp_path / "pipe") / "text_encoder_2")
    with pytest.raises(error, match=match) as e:
        load_base(f, config_dir=configs) if f.is_file() else load_base(f)
    assert str(f) in str(e.value)
