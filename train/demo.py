"""`adapterkit demo`: the whole story on the bundled default, on a CPU, with no download.

What runs today is the part of the story that exists: the `tiny` U-Net is built, saved as a
diffusers folder and as a single-file LDM checkpoint, loaded back from both, and checked against the
model in memory and against diffusers' own UNet2DConditionModel on the same weights. Training a
style LoRA on the rendered shapes world, the ControlNet and the quality report join it as their
issues land (see README).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from unet import PRESETS, UNet, load_unet, save_unet, unet_fingerprint


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = PRESETS["tiny"]
    model = UNet(cfg).eval()
    print(f"tiny U-Net: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"fingerprint {unet_fingerprint(model)}")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ctx = torch.randn(2, 8, cfg.context_dim, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        reference = model(x, t, ctx)

    for layout, target in (("diffusers", out / "tiny_unet"), ("ldm", out / "tiny_unet.safetensors")):
        t0 = time.perf_counter()
        written = save_unet(model, target, layout=layout)
        loaded = load_unet(target).eval()
        with torch.no_grad():
            diff = (loaded(x, t, ctx) - reference).abs().max().item()
        size = sum(f.stat().st_size for f in Path(target).rglob("*") if f.is_file()) \
            if Path(target).is_dir() else Path(written).stat().st_size
        print(f"{layout:9} layout: {target} ({size / 1e6:.1f} MB) saved+loaded in "
              f"{time.perf_counter() - t0:.2f}s, max |reloaded - original| = {diff:.2e}")
        if diff != 0.0:
            raise RuntimeError(f"{layout} round trip changed the model's output by {diff}")

    from diffusers import UNet2DConditionModel  # the oracle: diffusers runs the same folder
    theirs = UNet2DConditionModel.from_pretrained(out / "tiny_unet").eval()
    with torch.no_grad():
        diff = (theirs(x, t, ctx).sample - reference).abs().max().item()
    print(f"diffusers UNet2DConditionModel on the saved folder: max |diffusers - ours| = {diff:.2e}")
    if diff > 1e-5:
        raise RuntimeError(f"diffusers disagrees with our U-Net by {diff}")
    print("demo ok")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the bundled end-to-end demo on the CPU",
                       description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo", help="folder for everything the demo writes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
