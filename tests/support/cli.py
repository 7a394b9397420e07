"""Running `adapterkit` in-process, the pictures its grids hold, and a fixed probe of a tiny U-Net,
for the command tests."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import adapterkit.train.cli.main as cli
import adapterkit.train.images as images
from adapterkit.unet import PRESETS


def run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) as the shell would call it: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def out(model):
    """The tiny U-Net's output on fixed inputs (seed 3): what a merge or an adapter must move alike."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([50]),
                     torch.randn(1, 5, PRESETS["tiny"].context_dim, generator=g))


@contextmanager
def drawn_grids():
    """Record what every `save_grid` call draws while the block runs (the grid is still written): a list
    of dicts, one a grid, with `cells` (8-bit HxWx3 arrays, row-major), `cols` and its labels. Tests
    compare the sampled pictures there: the PNG around them holds labels and a settings footer."""
    drawn, save_grid = [], images.save_grid

    def recording(cells, rows, cols, path, **labels):
        pictures = [images.tensor_to_pil(c) if torch.is_tensor(c) else c.convert("RGB") for c in cells]
        drawn.append({"cells": [np.asarray(p) for p in pictures], "cols": cols, **labels})
        return save_grid(cells, rows, cols, path, **labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "save_grid", recording)
        yield drawn
