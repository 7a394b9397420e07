"""Test-session settings shared by every file.

One intra-op thread: the tests run tiny models whose kernels are too small to split, and on a
2-core machine two OpenMP threads per process (plus anything else running) made files 3-10x slower.
No test may reach a model hub.
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
