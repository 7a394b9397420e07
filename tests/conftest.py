"""Test-session settings shared by every file.

One intra-op thread: the tests run tiny models whose kernels are too small to split, and on a
2-core machine two OpenMP threads per process (plus anything else running) made files 3-10x slower.
No test may reach a model hub.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pixel_base_dir(tmp_path_factory):
    """A tiny random pixel-space base folder (tests/sd_fixtures.build_pixel_base: 16 px pictures,
    2 x 2 pixel patches, so latents are 8 x 8 x 12), built once per session; load it per test."""
    from sd_fixtures import build_pixel_base  # tests/ is on sys.path under pytest
    return build_pixel_base(tmp_path_factory.mktemp("pixel_base"))
