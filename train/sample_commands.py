"""`adapterkit sample`: images from a base model plus any LoRAs, as one PNG grid.

    adapterkit sample --base BASE [--lora FILE[:WEIGHT] ...] --prompt "..." [--prompt ...]
                      [--seed 0 --seed 1] [--steps 25] [--guidance 7.5] [--sampler ddim|euler]
                      [--size 512] [--compare] -o grid.png

Rows are prompt x seed; with --compare a first column shows the base alone (the same noise), so
what the LoRAs change is visible side by side.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def run(args: argparse.Namespace) -> int:
    from adapters.lora import set_lora_weights
    from adapters.lora_files import load_lora_file
    from train.base import encode_prompts, load_base
    from train.images import save_grid
    from train.loop import decode
    from train.sampling import ddim_sample, euler_sample
    from train.schedule import NoiseSchedule

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_base(args.base, dtype=torch.float32, device=device, tokenizer=args.tokenizer)
    base.unet.to(dtype)
    weights = {}
    for i, spec in enumerate(args.lora):
        path, _, w = spec.rpartition(":") if _has_weight(spec) else (spec, "", "1")
        name = f"lora{i}"
        load_lora_file(base.unet, path, name=name, weight=float(w))
        weights[name] = float(w)
        print(f"{name}: {Path(path).name} x{float(w):g}")
    columns = ([("base", {k: 0.0 for k in weights})] if args.compare and weights else []) + \
        [("with LoRAs" if weights else "base", weights)]

    schedule = NoiseSchedule.from_config(base.scheduler_config)
    sampler = ddim_sample if args.sampler == "ddim" else euler_sample
    size = (args.size or base.unet.config.sample_size * base.latent_scale) // base.latent_scale
    uncond = encode_prompts(base, [""]).to(dtype)
    cells, rows = [], []
    with torch.no_grad():
        for prompt in args.prompt:
            cond = encode_prompts(base, [prompt]).to(dtype)
            for seed in args.seed or [0]:
                rows.append(f"{prompt[:40]} / seed {seed}")
                for _, w in columns:
                    if w:
                        set_lora_weights(base.unet, w)
                    g = torch.Generator(device).manual_seed(seed)
                    latents = sampler(lambda x, t, c: base.unet(x.to(dtype), t, c).float(), schedule,
                                      (1, base.latent_channels, size, size), args.steps, g,
                                      cond=cond, uncond=uncond, guidance_scale=args.guidance)
                    cells.append(decode(base, latents)[0])
    save_grid(cells, len(rows), len(columns), args.output, row_labels=rows,
              col_labels=[name for name, _ in columns])
    print(f"wrote {args.output} ({len(cells)} images)")
    return 0


def _has_weight(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
        return True
    except ValueError:
        return False


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate a PNG grid from a base model and LoRAs",
                       description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="local diffusers pipeline folder or single-file checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder (single-file checkpoints carry none)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--seed", action="append", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", choices=["ddim", "euler"], default="ddim")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--compare", action="store_true", help="add a column with the base alone")
    p.add_argument("--device")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=run)
