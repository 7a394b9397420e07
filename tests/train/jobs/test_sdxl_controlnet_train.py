"""SDXL ControlNet training (issue 16, item 3) on the reduced SDXL pipeline with an 8x VAE, on the CPU:
`adapterkit train controlnet configs/sdxl_controlnet.yaml` end to end (paths, picture size and run
length overridden): Canny maps made on the fly at SDXL-style buckets, each picture's own size/crop ids
in the conditioning, the hint at 8x the latents with the picture's crop; the exported folder loads in
diffusers' ControlNetModel (SDXL config) and gives our residuals; the Control-LoRA and the metadata."""
import json

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors import safe_open

import adapterkit.train.jobs.controlnet as ct
from adapterkit.adapters.controlnet import HintSpec
from adapterkit.adapters.controlnet_files import load_controlnet
from adapterkit.train.cli.main import main as cli
from adapterkit.train.data.canny import edge_map_tensor
from adapterkit.train.pipeline.base import load_base
from adapterkit.unet import Conditioning
from support import REPO
from support.fixtures import alias
from support.pipelines import build_tiny_sdxl_pipeline
from support.unets import SDXL_TINY

images = alias("images", "controlnet_images")       # 11 pictures of 64x64, one of 96x64


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), vae_scale=8)


def test_the_sdxl_recipe_trains_a_controlnet_end_to_end(pipe_dir, images, tmp_path, monkeypatch):
    seen = []
    real = ct.controlled_prediction

    def spy(unet, controlnet, x, t, cond, hint, scale, guess_mode=False):
        if torch.is_grad_enabled():                                   # training steps, not the samples
            seen.append((x.shape, cond, hint.detach().clone()))
        return real(unet, controlnet, x, t, cond, hint, scale, guess_mode)

    monkeypatch.setattr(ct, "controlled_prediction", spy)
    out = tmp_path / "run"
    code = cli(["train", "controlnet", str(REPO / "configs/sdxl_controlnet.yaml"), f"model.base={pipe_dir}",
                f"data.root={images}", "data.resolution=64", "data.bucket_step=32", "data.min_side=32",
                "train.steps=3", "train.batch_size=4", "optim.lr=1e-3", "control.control_lora_rank=4",
                f"output.dir={out}", "output.log_every=1", "output.checkpoint_every=2",
                "sample.prompts=[a red shape]", "sample.steps=2", "sample.num_hints=1",
                "sample.control_scales=[0.0,1.0]"])
    assert code == 0
    rows = [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < float("inf") for r in rows)
    assert (out / "samples" / "final.png").is_file()

    # what the steps saw: SDXL conditioning with each picture's size/crop ids, hints at 8x the latents
    assert len(seen) == 3
    ids = set()
    for shape, cond, hint in seen:
        assert isinstance(cond, Conditioning) and cond.pooled.shape == (shape[0], SDXL_TINY.pooled_dim)
        assert hint.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
        ids |= {tuple(r) for r in cond.time_ids.tolist()}
        for row, h in zip(cond.time_ids.tolist(), hint):
            assert row[4:] == list(h.shape[1:])                           # target size = the bucket
    # the square pictures: their size, no crop; the 96x64 one: its size, a centered crop of its resize
    square, wide = (64, 64, 0, 0, 64, 64), (64, 96, 0, 16, 64, 64)
    assert ids == {square, wide}                                     # 12 pictures: one epoch
    hints = {tuple(row): h for _, cond, hint in seen for row, h in zip(cond.time_ids.tolist(), hint)}
    picture = Image.open(images / "img11.png").convert("RGB")        # the 96x64 one, cropped as its ids say
    assert torch.equal(hints[wide], edge_map_tensor(picture.crop((16, 0, 80, 64)), 100, 200))
    assert any(torch.equal(hints[square], edge_map_tensor(Image.open(p).convert("RGB"), 100, 200))
               for p in sorted(images.glob("*.png")))                      # the Canny map of a picture

    # the files: diffusers' SDXL ControlNetModel folder, the ComfyUI file, the Control-LoRA
    folder = out / "sdxl-canny"
    config = json.loads((folder / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time"
    assert config["projection_class_embeddings_input_dim"] == 80
    base = load_base(pipe_dir)
    cn = load_controlnet(folder, base.unet)
    assert cn.hint == HintSpec("canny", "like-target", 100, 200)
    assert cn.base_fingerprint == base.fingerprint.unet
    theirs, info = ControlNetModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert all(not v for v in info.values()), info
    _, cond, hint = seen[-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(hint.shape[0], 4, hint.shape[2] // 8, hint.shape[3] // 8, generator=g)
    cond = cond.to(torch.float32)
    with torch.no_grad():
        ours = cn.eval()(x, torch.tensor(500), cond, hint)
        down, mid = theirs.eval()(x, 500, cond.context, hint, return_dict=False, added_cond_kwargs={
            "text_embeds": cond.pooled, "time_ids": cond.time_ids.float()})
    assert ours.mid.abs().max() > 1e-4                                   # the zero convs trained
    for a, b in zip([*ours.down, ours.mid], [*down, mid]):
        torch.testing.assert_close(a, b.float(), atol=1e-3, rtol=1e-3)   # the fp16 file in both
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()[ct.RECIPE_KEY])
    assert recipe["data"]["min_bucket_area"] == 0.9 and recipe["train"]["gradient_checkpointing"]
    single = load_controlnet(out / "sdxl-canny.safetensors", base.unet).state_dict()
    assert all(torch.equal(v, single[k]) for k, v in cn.state_dict().items())
    cl = out / "sdxl-canny.control-lora.safetensors"
    with safe_open(str(cl), "pt") as f:
        keys = set(f.keys())
    assert "lora_controlnet" in keys and "label_emb.0.0.up" in keys
    assert load_controlnet(cl, base.unet).config == base.unet.config
