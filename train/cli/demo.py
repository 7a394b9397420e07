"""`adapterkit demo`: the bundled end-to-end demo (train/world/demo.py runs it)."""
from __future__ import annotations

import argparse

from adapterkit.train.world import demo


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the bundled end-to-end demo on the CPU",
                       description=demo.__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=demo.__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="out/demo", help="folder for everything the demo writes")
    p.add_argument("--style", default="outline", help="outline or stripes (default outline)")
    p.add_argument("--trigger", default="sks", help="the LoRA's trigger word (default sks)")
    p.add_argument("--images", type=int, help=f"training pictures (default {demo.FULL['images']})")
    p.add_argument("--scenes", type=int, help=f"measured scenes (default {demo.FULL['scenes']})")
    p.add_argument("--sample-steps", type=int, help=f"DDIM steps (default {demo.FULL['sample_steps']})")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32, help="sampling batch")
    p.add_argument("--sample-dtype", default="auto", choices=demo.SAMPLE_DTYPES,
                   help="the sampling dtype: auto = bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else "
                        "fp32; training, checks and the merge comparison are fp32 (default auto)")
    p.add_argument("--seed", type=int, default=0, help="the training pictures' seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {demo.QUICK['images']} pictures, {demo.QUICK['scenes']} scenes, "
                        f"{demo.QUICK['sample_steps']} DDIM steps, {' '.join(demo.QUICK['overrides'])}")
    p.add_argument("--fresh", action="store_true",
                   help="train the LoRA again even when --out holds one trained on the same pictures and "
                        "recipe")
    p.add_argument("--assets", default=str(demo.DEFAULT_ASSETS),
                   help="folder with tiny-base/ and tiny-canny/")
    p.add_argument("--config", default=str(demo.DEFAULT_CONFIG), help="the LoRA recipe (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe's keys")
    p.set_defaults(func=demo.run)
