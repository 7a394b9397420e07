"""train/pipeline/base.py: base models from a diffusers pipeline folder and from a single-file checkpoint.

Oracle: a tiny random StableDiffusionPipeline built offline (tests/support/pipelines.py). Our U-Net, the
prompt embeddings and the VAE latents must equal what the pipeline itself computes.

Single files: the test assembles an SD1-layout checkpoint from the pipeline's parts. The U-Net keys
come from `save_unet(layout="ldm")`; the text encoder keys are the CLIP names under
`cond_stage_model.transformer.text_model.` (the real SD1 layout, position_ids buffer included); the VAE
keys come from the checkpoint writer's table (train/pipeline/ldm_names.py vae_to_ldm), the inverse of
diffusers' `convert_ldm_vae_checkpoint` following the CompVis names (encoder.down.N.block.M,
downsample.conv, mid.block_1, mid.attn_1.q as a 1x1 conv, nin_shortcut, norm_out; the decoder's up.N
counted from the bottom), which diffusers' from_single_file reads back exactly (test_checkpoint_file.py).
So what is covered is: loading reassembles exactly the pipeline's weights from those names. No real SD
file is available offline, so agreement with a real file rests on those names being the CompVis ones.
"""
import json
import shutil

import pytest
import torch

from adapterkit.train.pipeline.base import default_scheduler_config, load_base
from adapterkit.train.pipeline.encoding import (
    encode_images,
    encode_moments,
    encode_prompts,
    moments_to_latents,
)
from adapterkit.train.pipeline.parts import CONFIGS, UnsupportedCheckpoint
from adapterkit.unet import (
    PRESETS,
    CheckpointError,
    Stage,
    UNetConfig,
    family_of,
    read_weights,
    unet_fingerprint,
)
from adapterkit.unet.weights import write_safetensors
from support.pipelines import build_tiny_pipeline
from support.single_files import configs_only as _configs_only
from support.single_files import single_file as _single_file

CFG = PRESETS["tiny"]
# An SD2-shaped miniature: context 1024 with linear projections.
SD2_LIKE = UNetConfig(stages=(Stage(32, attention=False, heads=1), Stage(64, heads=1)), layers_per_block=1,
                      context_dim=1024, linear_projection=True, sample_size=16)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd"), CFG)


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True)


@pytest.fixture(scope="module")
def base(pipe_dir):
    return load_base(pipe_dir)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- pipeline folders ------------------------------------------------------------------------------

def test_pipeline_folder_loads_frozen_with_its_schedule(base, pipe, pipe_dir):
    assert base.family.name == "tiny" and base.source == pipe_dir
    assert base.fingerprint.unet == unet_fingerprint(pipe.unet.state_dict())
    assert base.scheduler_config == json.loads((pipe_dir / "scheduler/scheduler_config.json").read_text())
    assert base.prediction_type == "epsilon" and base.max_length == 77
    assert (base.latent_scale, base.latent_channels) == (2, 4)
    for m in (base.unet, base.vae, base.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert _same_state(base.vae, pipe.vae) and _same_state(base.text_encoder, pipe.text_encoder)


def test_unet_output_equals_the_pipelines(base, pipe):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, CFG.context_dim, generator=g)
    t = torch.tensor([5, 800])
    with torch.no_grad():
        ours, theirs = base.unet(x, t, ctx), pipe.unet(x, t, ctx).sample
    assert (ours - theirs).abs().max() <= 1e-5


def test_encode_prompts_equals_pipeline_encode_prompt_and_warns_once_on_truncation(base, pipe):
    prompts = ["a red circle on a blue background", "", "z" * 100]
    with pytest.warns(UserWarning, match=r"25 of its 100 tokens dropped"):
        ours = encode_prompts(base, prompts)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert ours.shape == (3, 77, CFG.context_dim) and torch.equal(ours, theirs)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the same caption does not warn again
        encode_prompts(base, ["z" * 100])
    with pytest.raises(TypeError):
        encode_prompts(base, "one string")


def test_encode_images_equals_the_vae_posterior(base, pipe):
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(px).latent_dist
    sf = pipe.vae.config.scaling_factor
    mean, logvar = encode_moments(base, px)
    assert torch.equal(mean, dist.mean) and torch.equal(logvar, dist.logvar)
    assert torch.equal(encode_images(base, px), dist.mean * sf)                 # no generator: the mean
    sampled = encode_images(base, px, torch.Generator().manual_seed(3))
    assert torch.allclose(sampled, dist.sample(torch.Generator().manual_seed(3)) * sf, atol=1e-6)
    assert torch.equal(sampled, moments_to_latents(base, (mean, logvar), torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="multiple of the VAE's factor 2"):
        encode_moments(base, px[..., :31])


# --- single files ----------------------------------------------------------------------------------

def test_single_file_loads_the_same_model(pipe_dir, pipe, base, tmp_path):
    f = _single_file(pipe_dir, pipe, tmp_path / "model.safetensors")
    configs = _configs_only(pipe_dir, tmp_path / "configs")
    single = load_base(f, tokenizer=pipe_dir / "tokenizer", config_dir=configs)
    assert single.family.name == "tiny" and single.fingerprint == base.fingerprint
    assert _same_state(single.unet, base.unet)
    assert _same_state(single.vae, pipe.vae) and _same_state(single.text_encoder, pipe.text_encoder)
    assert single.scheduler_config == base.scheduler_config
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(encode_images(single, px), encode_images(base, px))
    assert torch.equal(encode_prompts(single, ["a cat"]), encode_prompts(base, ["a cat"]))
    # the tokenizer may also come from config_dir
    assert load_base(f, config_dir=configs).fingerprint == base.fingerprint


def test_single_file_without_scheduler_config_uses_the_family_default(pipe_dir, pipe, tmp_path):
    f = _single_file(pipe_dir, pipe, tmp_path / "model.safetensors")
    configs = _configs_only(pipe_dir, tmp_path / "configs")
    shutil.rmtree(configs / "scheduler")
    loaded = load_base(f, config_dir=configs, prediction_type="v_prediction")
    assert loaded.scheduler_config == default_scheduler_config("tiny", "v_prediction")
    assert loaded.prediction_type == "v_prediction"


@pytest.mark.parametrize("case, match", [
    ("no tokenizer", r"do not contain a tokenizer: pass tokenizer="),
    ("unet only", r"holds no text encoder \(no cond_stage_model\.transformer\.\* tensors\)"),
    ("no vae", r"holds no VAE \(no first_stage_model\.\* or vae\.\* tensors\)"),
    ("no configs", r"ships no default vae config for the 'tiny' model family.*config_dir="),
    ("vae tensor missing", r"VAE \(first_stage_model\.\*\) in .* 1 missing tensors "
                           r"\(encoder\.conv_in\.weight\)"),
    ("stray vae tensor", r"tensors that have no place \(first_stage_model\.encoder\.extra\.weight\)"),
    ("nan", r"NaN or inf values in 1 tensors: encoder\.layers\.0\.mlp\.fc1\.weight"),
])
def test_single_file_errors_name_the_file_and_what_is_missing(pipe_dir, pipe, tmp_path, case, match):
    f = tmp_path / "model.safetensors"
    configs = _configs_only(pipe_dir, tmp_path / "configs")
    kwargs = {"tokenizer": pipe_dir / "tokenizer", "config_dir": configs}
    if case == "no tokenizer":
        shutil.rmtree(configs / "tokenizer")
        kwargs.pop("tokenizer")
        _single_file(pipe_dir, pipe, f)
    elif case == "unet only":
        _single_file(pipe_dir, pipe, f, vae=False, clip=False)
    elif case == "no vae":
        _single_file(pipe_dir, pipe, f, vae=False)
    elif case == "no configs":
        kwargs.pop("config_dir")
        _single_file(pipe_dir, pipe, f)
    elif case == "vae tensor missing":
        _single_file(pipe_dir, pipe, f)
        tensors, meta = read_weights(f)
        del tensors["first_stage_model.encoder.conv_in.weight"]
        write_safetensors(tensors, f, meta)
    elif case == "stray vae tensor":
        _single_file(pipe_dir, pipe, f, extra={"first_stage_model.encoder.extra.weight": torch.zeros(2)})
    elif case == "nan":
        _single_file(pipe_dir, pipe, f)
        tensors, meta = read_weights(f)
        name = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")
        write_safetensors(tensors, f, meta)
    with pytest.raises(CheckpointError, match=match) as e:
        load_base(f, **kwargs)
    assert str(f) in str(e.value)


def test_sd2_single_files_are_refused_and_mixed_parts_named(pipe_dir, pipe, tmp_path):
    f = _single_file(pipe_dir, pipe, tmp_path / "sd2.safetensors", clip=False, extra={
        "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": torch.ones(4)})
    match = r"SD2\.x single file.*diffusers folder.*prediction_type="
    with pytest.raises(UnsupportedCheckpoint, match=match) as e:
        load_base(f, tokenizer=pipe_dir / "tokenizer")
    assert isinstance(e.value, NotImplementedError) and str(f) in str(e.value)
    # SDXL single files load (tests/train/pipeline/test_sdxl_base.py); SDXL text encoders beside an SD1.x
    # U-Net are parts of different models
    f = _single_file(pipe_dir, pipe, tmp_path / "xl.safetensors", clip=False, extra={
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4)})
    with pytest.raises(CheckpointError, match=r"no cond_stage_model\.transformer\.\* tensors.*SDXL's text "
                                              r"encoders \(conditioner\.embedders\.0\.\*\) instead"):
        load_base(f, tokenizer=pipe_dir / "tokenizer")


# --- folder errors ---------------------------------------------------------------------------------

def _break(folder, case):
    if case in ("text_encoder", "tokenizer", "vae"):
        shutil.rmtree(folder / case)
    elif case == "model_index":
        (folder / "model_index.json").unlink()
    elif case == "te tensor missing":
        tensors, meta = read_weights(folder / "text_encoder/model.safetensors")
        tensors.pop(next(k for k in tensors if k.endswith("final_layer_norm.weight")))
        write_safetensors(tensors, folder / "text_encoder/model.safetensors", meta)
    elif case == "lfs pointer":
        (folder / "vae/diffusion_pytorch_model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif case == "pickle only":
        f = folder / "text_encoder/model.safetensors"
        torch.save(read_weights(f)[0], folder / "text_encoder/pytorch_model.bin")
        f.unlink()
    elif case == "sdxl index":
        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case, error, match", [
    ("text_encoder", CheckpointError, r"has no text_encoder/"),
    ("tokenizer", CheckpointError, r"has no tokenizer/"),
    ("vae", CheckpointError, r"has no vae/, and its U-Net works on 4-channel latents"),
    ("model_index", CheckpointError, r"not a diffusers pipeline folder: no model_index\.json"),
    ("te tensor missing", CheckpointError, r"1 missing tensors \(final_layer_norm\.weight\)"),
    ("lfs pointer", CheckpointError, r"vae/diffusion_pytorch_model\.safetensors is a Git LFS pointer"),
    ("pickle only", CheckpointError, r"allow_pickle=True"),
    ("sdxl index", CheckpointError, r"lists text_encoder_2, but the U-Net .* is built like an SD1\.x U-Net"),
])
def test_folder_errors_name_the_path_and_the_missing_part(pipe_dir, tmp_path, case, error, match):
    folder = shutil.copytree(pipe_dir, tmp_path / "pipe")
    _break(folder, case)
    with pytest.raises(error, match=match) as e:
        load_base(folder)
    assert str(folder) in str(e.value)


def test_folder_with_pickled_text_encoder_loads_when_allowed(pipe_dir, base, tmp_path):
    folder = shutil.copytree(pipe_dir, tmp_path / "pipe")
    _break(folder, "pickle only")
    assert load_base(folder, allow_pickle=True).fingerprint == base.fingerprint


def test_missing_path_and_unet_folder_are_explained(pipe_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"single-component folder.*load_unet"):
        load_base(pipe_dir / "unet")


def test_sd2_folder_without_scheduler_needs_the_prediction_type(tmp_path):
    folder = build_tiny_pipeline(tmp_path, SD2_LIKE)
    shutil.rmtree(folder / "scheduler")
    match = r"no scheduler config.*prediction_type='epsilon' or 'v_prediction'"
    with pytest.raises(CheckpointError, match=match):
        load_base(folder)
    loaded = load_base(folder, prediction_type="v_prediction")
    assert loaded.family.name == "sd2"
    assert loaded.scheduler_config == default_scheduler_config("sd2", "v_prediction")
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_prediction_type_overrides_a_folders_scheduler_with_a_warning(pipe_dir):
    with pytest.warns(UserWarning, match="overrides the scheduler config's 'epsilon'"):
        loaded = load_base(pipe_dir, prediction_type="v_prediction")
    assert loaded.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        load_base(pipe_dir, prediction_type="v")


def test_float16_keeps_a_force_upcast_vae_in_float32(pipe_dir):
    half = load_base(pipe_dir, dtype=torch.float16)
    assert half.unet.conv_in.weight.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
    assert half.vae.dtype == torch.float32


# --- families and shipped configs ------------------------------------------------------------------

def test_family_detection():
    assert [family_of(PRESETS[n]).name for n in ("sd15", "sd21", "tiny")] == ["sd1", "sd2", "tiny"]
    assert family_of(SD2_LIKE).name == "sd2"


def test_shipped_scheduler_defaults():
    from diffusers import DDIMScheduler
    for family, pred, expect in [("sd1", None, "epsilon"), ("tiny", None, "epsilon"),
                                 ("sd2", "epsilon", "epsilon"), ("sd2", "v_prediction", "v_prediction")]:
        cfg = default_scheduler_config(family, pred)
        s = DDIMScheduler.from_config(cfg)
        assert s.config.prediction_type == expect and s.config.beta_schedule == "scaled_linear"
        assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)
        assert not s.config.set_alpha_to_one and s.config.steps_offset == 1
    with pytest.raises(ValueError, match="prediction_type="):
        default_scheduler_config("sd2")


def test_shipped_sd1_component_configs_are_the_real_sizes():
    """The configs for single files describe CLIP ViT-L/14's text tower and the KL-f8 VAE: their
    parameter counts are the published ones (built on the meta device: shapes only)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    def load(part):
        d = json.loads((CONFIGS / "base/sd1" / part / "config.json").read_text())
        return {k: v for k, v in d.items() if not k.startswith("_")}

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**load("text_encoder")))
        vae = AutoencoderKL.from_config(load("vae"))
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert clip.config.hidden_size == PRESETS["sd15"].context_dim and vae.config.scaling_factor == 0.18215
