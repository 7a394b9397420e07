"""SDXL LoRA training (issue 15, item 3) on the reduced SDXL pipeline, on the CPU: `adapterkit train lora
configs/sdxl_lora.yaml` end to end (only the paths and the picture size overridden), and a v-prediction
SDXL base trained with the v target (diffusers' get_velocity as the oracle)."""
import json

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from safetensors import safe_open

import adapterkit.train.jobs.lora as lt
from adapterkit.train.cli.main import main as cli
from adapterkit.train.data.buckets import size_conditioning
from adapterkit.train.jobs.lora import main
from adapterkit.unet import Conditioning
from support import REPO
from support.fixtures import alias
from support.pipelines import build_tiny_sdxl_pipeline, sdxl_scheduler_config
from support.recipes import lora_recipe
from support.unets import SDXL_TINY

images = alias("images", "lora_images")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def vpred_dir(tmp_path_factory):
    scheduler = sdxl_scheduler_config("v_prediction", rescale_betas_zero_snr=True)
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("vpred"), scheduler=scheduler)


def test_the_sdxl_recipe_trains_end_to_end(pipe_dir, images, tmp_path):
    """configs/sdxl_lora.yaml as shipped (bf16 U-Net, gradient checkpointing, SDXL buckets at 90-100% of
    resolution^2, cached latents and text) at 32 px instead of 1024: a kohya SDXL file that loads in
    diffusers' StableDiffusionXLPipeline and changes its U-Net, and a sample grid at the end."""
    out = tmp_path / "run"
    code = cli(["train", "lora", str(REPO / "configs/sdxl_lora.yaml"), f"model.base={pipe_dir}",
                f"data.root={images}", "data.resolution=32", "data.bucket_step=8", "data.min_side=32",
                "train.steps=3", "train.batch_size=2", "optim.warmup_steps=0", "lora.rank=4", "lora.alpha=4",
                f"output.dir={out}", "output.log_every=1", "sample.prompts=[a red shape]", "sample.seeds=[0]",
                "sample.steps=2"])
    assert code == 0
    rows = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < float("inf") for r in rows)
    assert list((out / "samples").glob("*.png"))
    kohya = out / "sdxl-style.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    trained_with = json.loads(meta["adapterkit.training_config"])
    assert trained_with["model"]["dtype"] == "bf16" and trained_with["train"]["gradient_checkpointing"]
    assert trained_with["data"]["min_bucket_area"] == 0.9
    texts = list((out / "cache" / "texts").rglob("*.safetensors"))
    with safe_open(str(texts[0]), "pt") as f:
        assert set(f.keys()) == {"embedding", "pooled"}              # both encoders' outputs cached

    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, SDXL_TINY.context_dim, generator=g)
    added = {"text_embeds": torch.randn(1, SDXL_TINY.pooled_dim, generator=g),
             "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        before = pipe.unet(x, 500, ctx, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(kohya))
        after = pipe.unet(x, 500, ctx, added_cond_kwargs=added).sample
    assert (after - before).abs().max() > 1e-4


def test_a_v_prediction_base_trains_with_the_v_target(vpred_dir, images, tmp_path, monkeypatch):
    """Every step's loss is the MSE to diffusers' velocity (DDPMScheduler.get_velocity on the same
    schedule), and far from the MSE to the noise: a job that used the eps target fails here."""
    real, seen = lt.diffusion_loss, []

    def spy(model_out, x0, noise, t, schedule, *weighting):
        loss = real(model_out, x0, noise, t, schedule, *weighting)
        seen.append((model_out.detach().float(), x0, noise, t, schedule, loss.detach()))
        return loss

    monkeypatch.setattr(lt, "diffusion_loss", spy)
    main(lora_recipe(vpred_dir, images, tmp_path / "run", **{"train.steps": 2, "train.min_snr_gamma": None}))
    oracle = DDPMScheduler.from_config(sdxl_scheduler_config("v_prediction", rescale_betas_zero_snr=True))
    assert len(seen) == 2
    for out, x0, noise, t, schedule, loss in seen:
        assert schedule.prediction_type == "v_prediction" and schedule.rescale_betas_zero_snr
        velocity = oracle.get_velocity(x0.float(), noise.float(), t)
        v_loss = torch.nn.functional.mse_loss(out, velocity)
        eps_loss = torch.nn.functional.mse_loss(out, noise.float())
        assert loss.item() == pytest.approx(v_loss.item(), rel=1e-5)
        assert abs(loss.item() - eps_loss.item()) > 1e-3 * eps_loss.item()


def test_every_sdxl_micro_batch_carries_pooled_text_and_its_pictures_ids(pipe_dir, images, tmp_path,
                                                                          monkeypatch):
    """What each training step hands the U-Net (MicroBatch.cond): context, pooled text and the six ids of
    each of its pictures."""
    real, batches = lt.noisy_batch, []

    def spy(*args, **kwargs):
        batches.append(real(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(lt, "noisy_batch", spy)
    main(lora_recipe(pipe_dir, images, tmp_path / "run", **{"train.steps": 2}))
    assert len(batches) == 2
    for b in batches:
        assert isinstance(b.cond, Conditioning) and b.cond.time_ids.dtype == torch.int64
        n = len(b.samples)                                  # 4, or 1 from the one-picture bucket
        assert b.cond.pooled.shape == (n, SDXL_TINY.pooled_dim) and b.cond.context.shape == (n, 77, 64)
        assert [tuple(ids) for ids in b.cond.time_ids.tolist()] == \
            [size_conditioning(s["size"], s["crop"]) for s in b.samples]
