"""`adapterkit canny IN_DIR OUT_DIR`: Canny edge maps (ControlNet hints) for a folder of images
(train/data/canny.py does the work)."""
from __future__ import annotations

import argparse
import sys

from adapterkit.train.data.canny import HIGH, LOW, canny_folder


def run(args: argparse.Namespace) -> int:
    report = canny_folder(args.in_dir, args.out_dir, args.low, args.high, args.blur,
                          overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(report.summary())
    return 1 if report.skipped else 0          # some image has no edge map: say so to scripts


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "canny", help="write Canny edge maps (ControlNet hints) for a folder of images",
        description="Write the Canny edge map (the ControlNet hint) of every image under IN_DIR to "
                    "OUT_DIR as a same-name PNG; IN_DIR is only read. Thresholds as lllyasviel's "
                    "ControlNet (100/200) unless given; they are stored in each PNG.",
        epilog="Exit status: 0 when every image has an edge map, 1 when some were skipped (listed), "
               "2 on an error.")
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of images (read only; subfolders included)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the PNG edge maps (not inside IN_DIR)")
    p.add_argument("--low", type=float, default=LOW, help=f"lower hysteresis threshold (default {LOW})")
    p.add_argument("--high", type=float, default=HIGH, help=f"upper hysteresis threshold (default {HIGH})")
    p.add_argument("--blur", type=float, default=None, metavar="SIGMA",
                   help="Gaussian blur sigma in pixels before Canny (default: none, as lllyasviel)")
    p.add_argument("--overwrite", action="store_true", help="replace edge maps that already exist")
    p.set_defaults(func=run)
