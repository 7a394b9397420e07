"""`adapterkit sample`: images from a base model plus any LoRAs and a ControlNet, as one PNG grid.

    adapterkit sample --base BASE [--lora FILE[:WEIGHT] ...] --prompt "..." [--prompt ...]
                      [--seed 0 --seed 1] [--steps 25] [--guidance 7.5] [--sampler ddim|euler]
                      [--size 512] [--compare] [--batch-size 4]
                      [--controlnet PATH --hint IMAGE [--control-scale 1.0] [--guess-mode]]
                      -o grid.png

Rows are prompt x seed; with --compare a first column shows the base alone (the same noise), so
what the LoRAs change is visible side by side. With a ControlNet every image is steered by the one
hint picture (an edge map for a Canny ControlNet: `adapterkit canny` makes them); the images take
the hint's size, or with --size the hint is center-cropped to a square and resized, as in training.
Sampling is train.generate's: each image's noise comes from its own seed (on the CPU), so neither
the batch size nor the device changes the pictures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> int:
    from train.generate import generate_columns
    from train.images import save_grid

    if (args.controlnet is None) != (args.hint is None):
        raise ValueError("--controlnet and --hint go together: the ControlNet steers by the hint picture")
    if args.guess_mode and args.controlnet is None:
        raise ValueError("--guess-mode is a way to apply a ControlNet: give --controlnet and --hint")
    base, _, cn = open_base(args.base, args.device, args.tokenizer, args.controlnet)
    size, steer = args.size, {}
    if cn is not None:
        hint, size = read_hint(args.hint, args.size, base.latent_scale)
        steer = {"controlnet": cn, "control_scale": args.control_scale, "guess_mode": args.guess_mode}
    weights = load_loras(base.unet, args.lora)
    columns = ([("base", {k: 0.0 for k in weights})] if args.compare and weights else []) + \
        [("with LoRAs" if weights else "base", weights)]
    seeds = args.seed or [0]
    rows = [(prompt, seed) for prompt in args.prompt for seed in seeds]
    if cn is not None:
        steer["hints"] = [hint] * len(rows)
    cells = generate_columns(base, rows, [w for _, w in columns], steps=args.steps, guidance=args.guidance,
                             sampler=args.sampler, size=size, batch_size=args.batch_size, **steer)
    save_grid(cells, len(rows), len(columns), args.output,
              row_labels=[f"{prompt[:40]} / seed {seed}" for prompt, seed in rows],
              col_labels=[name for name, _ in columns])
    print(f"wrote {args.output} ({len(cells)} images)")
    return 0


def open_base(path, device: str | None = None, tokenizer=None, controlnet=None):
    """`load_base` for sampling: on CUDA (the default when there is one) the U-Net in bf16, the rest
    fp32; on CPU all fp32. With `controlnet` (a path), that ControlNet too, checked against the
    base's fp32 weights before the cast (their fingerprint is taken at fp16 precision, which bf16
    copies do not keep) and cast alike. Returns (base, the U-Net's dtype, the ControlNet or None)."""
    from train.base import load_base

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_base(path, dtype=torch.float32, device=device, tokenizer=tokenizer)
    cn = None
    if controlnet is not None:
        from adapters.controlnet_files import load_controlnet
        cn = load_controlnet(controlnet, unet=base.unet, device=device).to(dtype)
    base.unet.to(dtype)
    return base, dtype, cn


def read_hint(path: str, size: int | None, latent_scale: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The hint picture as (3, H, W) in [0, 1] and the image size it sets: its own size (each side a
    multiple of the base's latent scale), or `size` x `size` after a center crop to a square."""
    from PIL import Image, ImageOps

    from train.buckets import plan_crop
    from train.images import unit_tensor

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    if size is not None:
        return unit_tensor(plan_crop(img.size, (size, size)).apply(img)), (size, size)
    w, h = img.size
    if w % latent_scale or h % latent_scale:
        raise ValueError(f"the hint {path} is {w}x{h} px; without --size each side must be a multiple of "
                         f"{latent_scale} (the base's pixels per latent pixel): pass --size to crop and "
                         "resize it")
    return unit_tensor(img), (h, w)


def load_loras(unet: torch.nn.Module, specs: list[str]) -> dict[str, float]:
    """Load each "FILE[:WEIGHT]" onto the U-Net as adapter lora0, lora1, ...; returns {name: weight}."""
    from adapters.lora_files import load_lora_file, split_lora_spec

    weights = {}
    for i, spec in enumerate(specs):
        path, w = split_lora_spec(spec)
        name = f"lora{i}"
        load_lora_file(unet, path, name=name, weight=w)
        weights[name] = w
        print(f"{name}: {Path(path).name} x{w:g}")
    return weights


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--base, --tokenizer, --lora: what `open_base` and `load_loras` read (also `adapterkit quality`)."""
    p.add_argument("--base", required=True, help="local diffusers pipeline folder or single-file checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder (single-file checkpoints carry none)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]")


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate a PNG grid from a base model and LoRAs",
                       description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--seed", action="append", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", choices=["ddim", "euler"], default="ddim")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--compare", action="store_true", help="add a column with the base alone")
    p.add_argument("--batch-size", type=int, default=4, help="images per U-Net batch (default 4)")
    p.add_argument("--controlnet", metavar="PATH", help="a ControlNet made for this base (folder or file)")
    p.add_argument("--hint", metavar="IMAGE", help="the ControlNet's conditioning picture (e.g. an edge map)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet strength (default 1.0)")
    p.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: residuals 0.1x..1x by depth, on the conditional half only")
    p.add_argument("--device")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=run)
