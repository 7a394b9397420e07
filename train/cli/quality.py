"""`adapterkit quality`: a base model (plus LoRAs, a ControlNet) measured on the shapes world.

    adapterkit quality --base BASE [--lora FILE[:WEIGHT] ...] [--controlnet PATH] [--control-scale 1]
                       [--style outline|stripes] [--trigger WORD] [--n 64] [--seed 0] [--steps 30]
                       [--guidance 3] [--sampler ddim|euler|...] [--batch-size 16] [--device cuda|cpu]
                       [--grid out.png] [--json out.json]

Draws n scenes of train.world, prompts the model with their captions (after the trigger word),
and prints train.quality.evaluate's table: one row per setting (base; base + LoRA; base + ControlNet;
base + LoRA + ControlNet), columns shape/colour/background accuracy, the share of each style, and with
a ControlNet the edge F1 of the pictures against the scenes' Canny maps (and its ratio to the same
row without the ControlNet). --grid writes target | hint | one column per row for the first scenes;
--json writes settings, rows and the scenes. On CUDA the U-Net (and ControlNet) run in bf16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GRID_ROWS = 8


def run(args: argparse.Namespace) -> int:
    from adapterkit.train.cli.checks import check_inputs, check_numbers, check_output, writing
    from adapterkit.train.cli.sample import check_loras, load_loras, lora_paths, open_base, seed_ranges
    from adapterkit.train.config import Range
    from adapterkit.train.images import image_format, save_grid
    from adapterkit.train.world.quality import evaluate
    from adapterkit.unet import atomic_write

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    check_numbers([("--steps", args.steps, Range(1)), ("--guidance", args.guidance, Range(0)),
                   ("--batch-size", args.batch_size, Range(1)),
                   ("--control-scale", args.control_scale, Range()), *seed_ranges([args.seed])])
    inputs = [("--base", args.base), ("--tokenizer", args.tokenizer), ("--controlnet", args.controlnet),
              *lora_paths(args)]
    check_inputs(inputs)
    for flag, out in (("--grid", args.grid), ("--json", args.json)):
        if out:
            check_output(out, flag, inputs=inputs)
    if args.grid:
        image_format(args.grid, "--grid")          # .png/.jpg/.webp: an unknown suffix fails before the load
    check_loras(args.lora)
    base, _, nets = open_base(args.base, args.device, args.tokenizer,
                              controlnets=[args.controlnet] if args.controlnet else [])
    controlnet = nets[0] if nets else None
    loras = load_loras(base, args.lora, args.allow_merged)
    result = evaluate(base, args.n, args.seed, style=args.style, trigger=args.trigger, loras=loras,
                      controlnet=controlnet, control_scale=args.control_scale, steps=args.steps,
                      guidance=args.guidance, sampler=args.sampler, batch_size=args.batch_size,
                      progress=True)
    print(f"{args.n} scenes (seed {args.seed}), {args.steps} {args.sampler} steps, "
          f"guidance {args.guidance:g}, {result.settings['size']} px")
    print(result.table())
    if args.grid:
        cells, rows, cols = result.grid(GRID_ROWS)
        with writing(args.grid, "--grid"):
            save_grid(cells, len(rows), len(cols), args.grid, row_labels=rows, col_labels=cols)
        print(f"wrote {args.grid}")
    if args.json:
        out = result.to_json()
        out["settings"] |= {"base": str(args.base), "lora_files": list(args.lora),
                            "controlnet": args.controlnet}
        with writing(args.json, "--json"):
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write([(Path(args.json), lambda tmp: tmp.write_text(json.dumps(out, indent=1) + "\n"))])
        print(f"wrote {args.json}")
    return 0


def register(sub) -> None:
    from adapterkit.train.cli.sample import add_model_arguments
    from adapterkit.train.pipeline.sampling import SAMPLERS
    from adapterkit.train.world.shapes import STYLES

    p = sub.add_parser("quality", help="measure a base (+ LoRAs, ControlNet) on the shapes world",
                       description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--controlnet", metavar="PATH", help="a ControlNet made for this base")
    p.add_argument("--control-scale", type=float, default=1.0)
    p.add_argument("--style", choices=STYLES,
                   help="the style the LoRA teaches (how the targets are drawn)")
    p.add_argument("--trigger", help="word put before every caption (the LoRA's trigger)")
    p.add_argument("--n", type=int, default=64, help="scenes (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--grid", metavar="PNG", help=f"write the first {GRID_ROWS} scenes' pictures here")
    p.add_argument("--json", metavar="FILE", help="write settings, rows and scenes here")
    p.set_defaults(func=run)
