"""`adapterkit sample`: images from a base model plus any LoRAs and a ControlNet, as one PNG grid.

    adapterkit sample --base BASE [--lora FILE[:WEIGHT] ...] --prompt "..." [--prompt ...]
                      [--seed 0 --seed 1] [--steps 25] [--guidance 7.5] [--sampler ddim|euler|...]
                      [--size 512] [--compare] [--batch-size 4]
                      [--controlnet PATH --hint IMAGE [--control-scale 1.0] ...] [--guess-mode]
                      -o grid.png

The grid's format follows the output's suffix: .png, .jpg/.jpeg or .webp.
Rows are prompt x seed; with --compare a first column shows the base alone (the same noise), so
what the LoRAs change is visible side by side. With a ControlNet every image is steered by its hint
picture (an edge map for a Canny ControlNet: `adapterkit canny` makes them); several ControlNets, each
with its hint and scale, add their residuals. The images take the hints' size, or with --size each
hint is center-cropped to a square and resized, as in training.
Sampling is train.generate's: each image's noise comes from its own seed (on the CPU), so neither
the batch size nor the device changes the pictures.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from adapterkit.train.cli.checks import check_inputs, check_numbers, check_output, writing
from adapterkit.train.config import Range
from adapterkit.train.images import image_format, read_image
from adapterkit.train.pipeline.sampling import SAMPLERS

# Transparent pixels of a hint mean "no edge", as in training (train.jobs.controlnet.HINT_BACKGROUND).
HINT_BACKGROUND = (0, 0, 0)


def run(args: argparse.Namespace) -> int:
    from adapterkit.train.images import save_grid
    from adapterkit.train.infotext import PARAMETERS
    from adapterkit.train.pipeline.generate import generate_columns

    nets, hint_files, scales = args.controlnet, args.hint, args.control_scale or [1.0]
    check_numbers([("--steps", args.steps, Range(1)), ("--guidance", args.guidance, Range(0)),
                   ("--size", args.size, Range(1)), ("--batch-size", args.batch_size, Range(1)),
                   *(("--control-scale", c, Range()) for c in scales), *seed_ranges(args.seed or [])])
    if len(nets) != len(hint_files):
        raise ValueError(f"each --controlnet needs its --hint picture, in the same order: {len(nets)} "
                         f"ControlNets, {len(hint_files)} hints")
    if len(scales) not in (1, len(nets)):
        raise ValueError(f"give one --control-scale for all ControlNets or one each ({len(nets)}), not "
                         f"{len(scales)}")
    if args.guess_mode and not nets:
        raise ValueError("--guess-mode is a way to apply a ControlNet: give --controlnet and --hint")
    inputs = [("--base", args.base), ("--tokenizer", args.tokenizer), *(("--controlnet", p) for p in nets),
              *(("--hint", h) for h in hint_files), *lora_paths(args)]
    check_inputs(inputs)                 # before the base is loaded (which takes a while), not after
    check_output(args.output, "-o", inputs=inputs)
    image_format(args.output, "-o")      # the grid's format by suffix: an unknown one fails now
    pictures = [read_image(h, "--hint", background=HINT_BACKGROUND) for h in hint_files]
    check_loras(args.lora)
    base, _, controlnets = open_base(args.base, args.device, args.tokenizer, controlnets=nets)
    size, steer = args.size, {}
    if nets:
        hints = [hint_tensor(p, h, args.size, base.latent_scale) for p, h in zip(pictures, hint_files)]
        if len({hint_size for _, hint_size in hints}) > 1:
            raise ValueError(f"the hints have different sizes {[hs for _, hs in hints]}: pass --size to "
                             "crop and resize them all to one")
        size = hints[0][1]
        steer = {"controlnet": controlnets if len(nets) > 1 else controlnets[0],
                 "control_scale": scales[0] if len(scales) == 1 else scales, "guess_mode": args.guess_mode}
    weights = load_loras(base, args.lora, args.allow_merged)
    from adapterkit.adapters.lora_files import split_lora_spec
    files = [split_lora_spec(spec)[0] for spec in args.lora]
    names = {name: Path(f).stem for name, f in zip(weights, files)}
    control = f" + ControlNet {'/'.join(f'{c:g}' for c in scales)}" if nets else ""
    columns = ([(f"base{control}", {k: 0.0 for k in weights})] if args.compare and weights else []) + \
        [(" + ".join([f"{names[k]} {w:g}" for k, w in weights.items()] or ["base"]) + control, weights)]
    seeds = args.seed or [0]
    rows = [(prompt, seed) for prompt in args.prompt for seed in seeds]
    if nets:
        per_net = [[hint] * len(rows) for hint, _ in hints]
        steer["hints"] = per_net if len(nets) > 1 else per_net[0]
    cells = generate_columns(base, rows, [w for _, w in columns], steps=args.steps, guidance=args.guidance,
                             sampler=args.sampler, size=size, batch_size=args.batch_size, progress=True,
                             **steer)
    params = first_cell_infotext(args, rows[0], columns[0][1], cells[0])   # before the hint column
    labels = [name for name, _ in columns]
    if nets:                            # the first column: what the ControlNet(s) were given
        ncol = len(columns)
        cells = [c for r in range(len(rows)) for c in [hints[0][0] * 2 - 1] + cells[r * ncol:(r + 1) * ncol]]
        labels = ["hint" if len(nets) == 1 else "hint (1st)"] + labels
    pixels = (f"{size[1]}x{size[0]} px" if isinstance(size, tuple) else f"{size} px" if size
              else "the base's size")
    footer = " | ".join([f"{args.sampler}, {args.steps} steps, guidance {args.guidance:g}, {pixels}",
                         f"base {Path(args.base).name}", *(f"LoRA {Path(f).name}" for f in files),
                         *(f"ControlNet {Path(n).name}" + (" (guess mode)" if args.guess_mode else "")
                           for n in nets)])
    with writing(args.output, "-o"):
        save_grid(cells, len(rows), len(labels), args.output,
                  row_labels=[f"{prompt} / seed {seed}" for prompt, seed in rows], col_labels=labels,
                  footer=footer, text={PARAMETERS: params})
    print(f"wrote {args.output} ({len(cells)} images)")
    return 0


def first_cell_infotext(args: argparse.Namespace, row: tuple[str, int], weights: dict[str, float],
                        cell: torch.Tensor) -> str:
    """A1111's infotext of the grid's first picture (train/infotext.py): its prompt and seed, each
    LoRA by file name with its weight in that column and its hash, the base's name (and hash, for a
    single file)."""
    from adapterkit.adapters.lora_files import split_lora_spec
    from adapterkit.train.infotext import infotext, lora_hash, model_hash

    files = [Path(split_lora_spec(spec)[0]) for spec in args.lora]
    loras = [(f.stem, weights.get(f"lora{i}", 0.0), lora_hash(f)) for i, f in enumerate(files)]
    extra = {"ControlNet": ", ".join(Path(p).name for p in args.controlnet)} if args.controlnet else {}
    return infotext(row[0], steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=row[1],
                    size=(cell.shape[-1], cell.shape[-2]), model=Path(args.base).name,
                    model_hash=model_hash(args.base), loras=loras, extra=extra)


def check_loras(specs: list[str]) -> None:
    """Read each --lora file (LoRA, LoHa, LoKr, DoRA) once before the base is loaded, so that a broken
    one (not an adapter, integer tensors, a nonsense alpha, ...) fails in a second, not after the load;
    LDM-named keys are placed later, against the base."""
    from adapterkit.adapters.lora_files import split_lora_spec
    from adapterkit.adapters.lycoris_files import read_adapter
    for spec in specs:
        read_adapter(split_lora_spec(spec)[0])


def lora_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """("--lora", path) of each --lora FILE[:WEIGHT], for `check_inputs`; a weight must be finite."""
    from adapterkit.adapters.lora_files import split_lora_spec
    specs = [split_lora_spec(s) for s in args.lora]
    check_numbers([(f"--lora {path} weight", w, Range()) for path, w in specs])
    return [("--lora", path) for path, _ in specs]


def seed_ranges(seeds: Sequence[int]) -> list[tuple[str, int, Range]]:
    """--seed values for `check_numbers`: seeds are non-negative 63-bit integers (numpy's and torch's)."""
    return [("--seed", s, Range(0, 2**63 - 1)) for s in seeds]


def open_base(path, device: str | None = None, tokenizer=None, controlnets: Sequence = ()):
    """`load_base` for sampling: on CUDA (the default when there is one) the U-Net in bf16, the rest
    fp32; on CPU all fp32. Each of `controlnets` (paths) is loaded too, checked against the base's fp32
    weights before the cast (their fingerprint is taken at fp16 precision, which bf16 copies do not
    keep) and cast alike. Returns (base, the U-Net's dtype, the ControlNets)."""
    from adapterkit.adapters.controlnet_files import load_controlnet
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.pipeline.graphed import channels_last

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_base(path, dtype=torch.float32, device=device, tokenizer=tokenizer)
    nets = [load_controlnet(p, unet=base.unet, device=device).to(dtype) for p in controlnets]
    base.unet.to(dtype)
    for m in (base.unet, *nets):             # NHWC with the GroupNorm kernels, as in training (CUDA)
        channels_last(m, device)
    return base, dtype, nets


def hint_tensor(img, path: str, size: int | None, latent_scale: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The hint picture `img` (read from `path` by `read_image`) as (3, H, W) in [0, 1] and the image
    size it sets: its own size (each side a multiple of the base's latent scale), or `size` x `size`
    after a center crop to a square."""
    from adapterkit.train.data.buckets import plan_crop
    from adapterkit.train.images import unit_tensor

    if size is not None:
        return unit_tensor(plan_crop(img.size, (size, size)).apply(img)), (size, size)
    w, h = img.size
    if w % latent_scale or h % latent_scale:
        raise ValueError(f"the hint {path} is {w}x{h} px; without --size each side must be a multiple of "
                         f"{latent_scale} (the base's pixels per latent pixel): pass --size to crop and "
                         "resize it")
    return unit_tensor(img), (h, w)


def load_loras(base, specs: list[str], allow_merged: bool = False) -> dict[str, float]:
    """Load each "FILE[:WEIGHT]" onto the base as adapter lora0, lora1, ...: its U-Net part on the U-Net,
    its text-encoder part (kohya lora_te*_, diffusers text_encoder[_2].) on the text encoders; prints
    what went where. A LoRA the base's merge record lists is refused unless `allow_merged`
    (--allow-merged). Returns {name: weight}."""
    from adapterkit.adapters.lora_files import split_lora_spec
    from adapterkit.train.pipeline.loras import load_lora_on_base

    weights = {}
    for i, spec in enumerate(specs):
        path, w = split_lora_spec(spec)
        applied = load_lora_on_base(base, path, name=f"lora{i}", weight=w, allow_merged=allow_merged,
                                    override="--allow-merged")
        weights[applied.name] = w
        print(applied.line())
    return weights


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--base, --tokenizer, --lora: what `open_base` and `load_loras` read (also `adapterkit quality`)."""
    p.add_argument("--base", required=True, help="local diffusers pipeline folder or single-file checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder (single-file checkpoints carry none)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]")
    p.add_argument("--allow-merged", action="store_true",
                   help="apply a --lora that the base's merge record says is merged into it already "
                        "(its effect adds up); default: refuse")


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate a PNG grid from a base model and LoRAs",
                       description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--seed", action="append", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--compare", action="store_true", help="add a column with the base alone")
    p.add_argument("--batch-size", type=int, default=4, help="images per U-Net batch (default 4)")
    p.add_argument("--controlnet", metavar="PATH", action="append", default=[],
                   help="a ControlNet made for this base (folder or file); several are summed")
    p.add_argument("--hint", metavar="IMAGE", action="append", default=[],
                   help="the conditioning picture (e.g. an edge map) of each --controlnet, in order")
    p.add_argument("--control-scale", type=float, action="append",
                   help="ControlNet strength: one for all, or one per --controlnet (default 1.0)")
    p.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: residuals 0.1x..1x by depth, on the conditional half only")
    p.add_argument("--device")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=run)
