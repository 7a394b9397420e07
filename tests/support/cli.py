"""Running `adapterkit` in-process, and a fixed probe of a tiny U-Net, for the command tests."""
import torch

import adapterkit.train.cli.main as cli
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
