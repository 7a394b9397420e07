"""Test-session settings shared by every file.

One intra-op thread: the tests run tiny models whose kernels are too small to split, and on a
2-core machine two OpenMP threads per process (plus anything else running) made files 3-10x slower.
No test may reach a model hub.
"""
import os

import pytest
import torch

from adapterkit.unet import PRESETS
from support.pictures import write_controlnet_folder, write_lora_folder
from support.pipelines import build_pixel_base, build_tiny_pipeline, build_tiny_pipeline_8x_vae

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pixel_base_dir(tmp_path_factory):
    """A tiny random pixel-space base folder (support.pipelines.build_pixel_base: 16 px pictures,
    2 x 2 pixel patches, so latents are 8 x 8 x 12), built once per session; load it per test."""
    return build_pixel_base(tmp_path_factory.mktemp("pixel_base"))


@pytest.fixture(scope="module")
def lora_pipeline(tmp_path_factory):
    """The tiny random SD pipeline folder of the LoRA job tests (tiny U-Net, 2x VAE)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("base"), PRESETS["tiny"])


@pytest.fixture(scope="module")
def lora_images(tmp_path_factory):
    return write_lora_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def controlnet_pipeline(tmp_path_factory):
    """The tiny fixture pipeline with its 2x VAE replaced by a 4-level (8x) one."""
    return build_tiny_pipeline_8x_vae(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def controlnet_images(tmp_path_factory):
    return write_controlnet_folder(tmp_path_factory.mktemp("images"))
