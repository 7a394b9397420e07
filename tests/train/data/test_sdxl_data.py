"""The data side of SDXL training (issue 15, item 3): SDXL's bucket list, the size/crop ids of a picture in
its bucket (against diffusers' SDXL training script's arithmetic), the ids in each micro-batch's
conditioning, both text encoders' outputs in the text cache, and a VAE that overflows in fp16 (a clear
error naming the picture, nothing cached). On the reduced SDXL pipeline (support.pipelines)."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from adapterkit.train.data.buckets import SDXL_MIN_AREA, Crop, make_buckets, plan_crop, size_conditioning
from adapterkit.train.data.cache import LatentCache
from adapterkit.train.data.folder import CaptionedImageFolder, DataConfig
from adapterkit.train.jobs.batches import BatchPlan, noisy_batch
from adapterkit.train.jobs.recipe import LoopConfig
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.encoding import encode_text
from adapterkit.train.pipeline.schedule import NoiseSchedule
from support.pipelines import build_tiny_sdxl_pipeline
from support.unets import SDXL_TINY

# SDXL paper (Podell et al. 2023), App. I, the multi-aspect training buckets, as height x width.
SDXL_PAPER_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def diffusers_ids(size, resolution):
    """The ids diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py computes for a picture
    of `size` (w, h) with --center_crop at --resolution: original_sizes (image.height, image.width);
    transforms.Resize(resolution) (shorter side to `resolution`, the longer int(resolution * long /
    short), torchvision's rule); y1 = max(0, int(round((height - resolution) / 2.0))), x1 likewise;
    target (resolution, resolution)."""
    w, h = size
    if w <= h:
        rw, rh = resolution, int(resolution * h / w)
    else:
        rw, rh = int(resolution * w / h), resolution
    y1 = max(0, int(round((rh - resolution) / 2.0)))
    x1 = max(0, int(round((rw - resolution) / 2.0)))
    return (h, w) + (y1, x1) + (resolution, resolution)


def test_sdxl_buckets_are_the_papers_list():
    ours = make_buckets(1024, 64, min_area=SDXL_MIN_AREA)
    assert sorted((h, w) for w, h in ours) == sorted(SDXL_PAPER_BUCKETS) and len(ours) == 41
    assert make_buckets(1024) != ours and set(make_buckets(1024)) < set(ours)   # default: maximal sizes only
    assert DataConfig(root=".", resolution=1024, min_bucket_area=SDXL_MIN_AREA).resolution == 1024
    with pytest.raises(ValueError, match="min_area"):
        make_buckets(1024, 64, min_area=1.5)


@pytest.mark.parametrize("size", [(1500, 1000), (1000, 1500), (1024, 1024), (1300, 800), (3000, 2000),
                                  (1333, 750), (2048, 1024), (600, 1800)])
def test_size_ids_are_the_diffusers_sdxl_scripts(size):
    """Pictures whose resized longer side diffusers' truncation leaves (nearly) whole: the same ids."""
    crop = plan_crop(size, (1024, 1024))
    assert size_conditioning(size, crop) == diffusers_ids(size, 1024)


def test_size_ids_in_a_non_square_bucket_and_at_random_sizes():
    # 1500x1000 into 1216x832: resized to cover it, 1248x832; centered, 16 px cut on either side
    crop = plan_crop((1500, 1000), (1216, 832))
    assert size_conditioning((1500, 1000), crop) == (1000, 1500, 0, 16, 832, 1216)
    # diffusers resizes to whole pixels first (truncating: 640x480 -> 1365 wide, crop at 170), we crop in
    # source pixels (170.67 -> 171): at most 1 px apart
    rng = np.random.default_rng(0)
    for w, h in rng.integers(256, 4096, (200, 2)):
        ours, theirs = size_conditioning((w, h), plan_crop((w, h), (1024, 1024))), diffusers_ids((w, h), 1024)
        assert ours[:2] == theirs[:2] and ours[4:] == theirs[4:]
        assert abs(ours[2] - theirs[2]) <= 1 and abs(ours[3] - theirs[3]) <= 1
    flipped = dataclasses.replace(plan_crop((1300, 800), (1024, 1024)), flip=True)
    assert size_conditioning((1300, 800), flipped)[2:4] == (0, 320)   # a centered crop mirrors onto itself


# --- on the reduced SDXL pipeline --------------------------------------------------------------------

SIZES = {"wide.png": (96, 64), "tall.png": (48, 80), "square.png": (64, 64)}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def base(pipe_dir):
    return load_base(pipe_dir)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a picture called {name[:-4]}")
    return root


def scan(root):
    return CaptionedImageFolder.scan(DataConfig(root=str(root), resolution=32, bucket_step=8, min_side=32,
                                                min_bucket_area=SDXL_MIN_AREA))


def test_each_micro_batch_carries_its_pictures_ids(base, data, tmp_path):
    dataset = scan(data)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    cache.build(dataset, base)
    plan = BatchPlan(dataset, 1, 1, 1, 0)
    seen = set()
    for step in range(len(dataset)):
        b = noisy_batch(dataset, plan, cache, base, NoiseSchedule(), LoopConfig(), step, 0,
                        torch.device("cpu"), torch.float32)
        (sample,), crop = b.samples, b.samples[0]["crop"]
        (w, h), (bw, bh) = sample["size"], crop.bucket
        assert b.cond.time_ids.dtype == torch.int64 and b.cond.time_ids.shape == (1, 6)
        assert tuple(b.cond.time_ids[0].tolist()) == size_conditioning(sample["size"], crop) == \
            (h, w, *crop.top_left, bh, bw)
        assert b.cond.pooled.shape == (1, SDXL_TINY.pooled_dim) and b.cond.context.shape == (1, 77, 64)
        text = encode_text(base, [sample["caption"]])          # the cache encoded it in a batch of 3
        assert torch.allclose(b.cond.context, text.context, atol=1e-6)
        assert torch.allclose(b.cond.pooled, text.pooled, atol=1e-6)
        seen.add(crop.bucket)
    assert len(seen) == 3                                    # three aspect ratios, three buckets


def test_both_encoders_outputs_are_cached_with_the_pooled_vector(base, data, tmp_path):
    dataset = scan(data)
    cache = LatentCache(tmp_path / "cache", base.fingerprint)
    stats = cache.build(dataset, base)
    assert stats["text_encoded"] == 3
    files = sorted((tmp_path / "cache" / "texts").rglob("*.safetensors"))
    with safe_open(files[0], "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        what = json.loads(f.metadata()["adapterkit.cache_entry"])
    assert shapes == {"embedding": (77, 64), "pooled": (SDXL_TINY.pooled_dim,)}
    assert what["layer"] == "penultimate,penultimate" and "+" in what["text_encoder"]
    captions = [f"a picture called {n[:-4]}" for n in SIZES]
    cached, fresh = cache.text(base, captions), encode_text(base, captions)
    assert torch.equal(cached.context, fresh.context) and torch.equal(cached.pooled, fresh.pooled)
    assert cache.build(dataset, base)["encoded"] == 0        # a second build hits every entry


def test_a_vae_that_overflows_in_fp16_is_named_and_nothing_is_cached(pipe_dir, data, tmp_path):
    """A VAE that says it runs in fp16 (force_upcast false) but overflows there: the latents are not
    finite, the build stops naming the picture, and no image entry is written."""
    folder = shutil.copytree(pipe_dir, tmp_path / "fp16")
    cfg = json.loads((folder / "vae/config.json").read_text())
    (folder / "vae/config.json").write_text(json.dumps(cfg | {"force_upcast": False}))
    half = load_base(folder, dtype=torch.float16)
    assert half.vae.dtype == torch.float16
    with torch.no_grad():
        half.vae.encoder.conv_in.weight.mul_(1e6)            # activations past fp16's 65504
    dataset = scan(data)
    cache = LatentCache(tmp_path / "cache", half.fingerprint)
    with pytest.raises(ValueError, match=r"NaN/inf values .* for .*\.png; nothing was cached.*float32 VAE"):
        cache.build(dataset, half)
    assert not list((tmp_path / "cache").rglob("images/**/*.safetensors"))
    # the SDXL VAE as shipped (force_upcast) stays fp32 under an fp16 base, and its latents are finite
    fp32 = load_base(pipe_dir, dtype=torch.float16)
    assert fp32.vae.dtype == torch.float32
    assert LatentCache(tmp_path / "ok", fp32.fingerprint).build(dataset, fp32)["image_encoded"] == 3


def test_crop_top_left_is_in_bucket_pixels():
    crop = Crop((250.0, 0.0, 1050.0, 800.0), (1024, 1024))
    assert crop.top_left == (0, 320) and math.isclose(1024 / 800, 1.28)
