"""The `adapterkit` command line: one entry point, one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func=<callable(args) -> int | None>` as the parser default. The list below is the only place
that knows them all; a subcommand that is not there does not exist.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "adapterkit.train.cli.demo",
    "adapterkit.train.cli.lora",
    "adapterkit.train.cli.train",
    "adapterkit.train.cli.canny",
    "adapterkit.train.cli.sample",
    "adapterkit.train.cli.quality",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from adapterkit.adapters.lora_fused import FusedLoraOptions, use_fused_lora  # torch, peft: after --help
    from adapterkit.unet.ops import OpsOptions, use_ops
    try:
        # The ablation switches (unet/ops.py, adapters/lora_fused.py) are read here, once.
        with use_ops(OpsOptions.from_env()), use_fused_lora(FusedLoraOptions.from_env()):
            return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Our errors carry the what-and-how-to-fix; a traceback would bury it.
        print(f"adapterkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not getattr(e, "user_facing", False):       # a bug: keep the traceback
            raise
        print(f"adapterkit {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 3)


if __name__ == "__main__":
    sys.exit(main())
