"""The `adapterkit` command line: one entry point, one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its subcommand(s) and sets
`func=<callable(args) -> int | None>` as the parser default. The list below is the only place
that knows them all; a subcommand that is not there does not exist.

Before or after the subcommand, -q (warnings only, no progress bars) and -v (debug records) set the
level of the adapterkit loggers (train/console.py); they print INFO records and bars otherwise.

Exit status: 0 done; 2 bad input or environment (a file, recipe or argument that cannot be used, a
full disk, a folder we may not write), with one message saying what and what to do; 1 a bug in
adapterkit, with a one-line summary (set ADAPTERKIT_TRACEBACK=1 for the traceback); a training
run's own codes (130/143 after a signal, ...) from its user-facing errors; 130 and one line for a
Ctrl-C that reaches us as KeyboardInterrupt (any command's, or a training run's second one, which stops
at once: the checkpoints already written stay). No traceback reaches the user unless asked for.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import sys

COMMAND_MODULES = (
    "adapterkit.train.cli.demo",
    "adapterkit.train.cli.lora",
    "adapterkit.train.cli.train",
    "adapterkit.train.cli.canny",
    "adapterkit.train.cli.sample",
    "adapterkit.train.cli.quality",
)


class DefaultsFormatter(argparse.HelpFormatter):
    """--help lists each option's default after its help, unless the help already says it or there is
    none to tell (None, False, an empty list: the option is simply off or unset)."""

    def _format_action(self, action):
        told = "default" in (action.help or "") or action.help is argparse.SUPPRESS
        if action.option_strings and not told and action.default not in (None, False, [], argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the command line, subcommands included (they are made with the parser's own
    class): defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    """"adapterkit X (torch Y, diffusers Z, peft W)" from the installed distributions' metadata (no
    import: --version answers at once)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"
    deps = ", ".join(f"{name} {of(name)}" for name in ("torch", "diffusers", "peft", "accelerate"))
    return f"adapterkit {of('adapterkit')} ({deps})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="adapterkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    add_verbosity(parser, None)
    for p in subcommand_parsers(parser):            # `adapterkit -q train ...` and `... train lora R -q`
        add_verbosity(p, argparse.SUPPRESS)
    return parser


# -q / -v: the adapterkit loggers' level (train/console.py); INFO when neither is given.
VERBOSITY = {"quiet": logging.WARNING, "verbose": logging.DEBUG}


def add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """-q / -v on `parser`; the subcommands' have `default` SUPPRESS, so that an option given before
    the subcommand is not reset by the subcommand's default."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet",
                       default=default, help="no progress bars and no log notes, warnings and errors "
                                             "only (results and summaries are still printed)")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                       default=default, help="debug records too, each with the module that wrote it")


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (subcommands, and their subcommands: train lora), each once."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):
                found += [p, *subcommand_parsers(p)]
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from adapterkit.train.console import configure_logging
    configure_logging(VERBOSITY.get(args.verbosity, logging.INFO))
    from adapterkit.adapters.lora_fused import FusedLoraOptions, use_fused_lora  # torch, peft: after --help
    from adapterkit.unet.ops import OpsOptions, use_ops
    try:
        # The ablation switches (unet/ops.py, adapters/lora_fused.py) are read here, once.
        with use_ops(OpsOptions.from_env()), use_fused_lora(FusedLoraOptions.from_env()):
            return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Our errors carry the what-and-how-to-fix; a traceback would bury it.
        return _fail(args, str(e), 2)
    except OSError as e:                               # the environment: disk full, permissions, ...
        from adapterkit.train.cli.checks import os_error_message
        return _fail(args, os_error_message(e), 2)
    except RuntimeError as e:
        if getattr(e, "user_facing", False):
            return _fail(args, str(e), getattr(e, "exit_code", 3))
        return _bug(args, e)
    except Exception as e:
        return _bug(args, e)
    except KeyboardInterrupt:                          # not an error: the user stopped it
        what = INTERRUPTED_TRAINING if args.command == "train" else "files written before are intact"
        print(f"adapterkit {args.command}: interrupted; {what}", file=sys.stderr)
        return INTERRUPTED


# The exit status of a Ctrl-C (128 + SIGINT), and what a stopped training run leaves.
INTERRUPTED = 130
INTERRUPTED_TRAINING = ("stopped at once, the checkpoints written before are intact: run the same command "
                        "again to resume from the last one")


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"adapterkit {args.command}: error: {message}", file=sys.stderr)
    return code


def _bug(args: argparse.Namespace, e: Exception) -> int:
    """An error no check of ours anticipated: a bug. One line, exit 1; the traceback on request."""
    if os.environ.get("ADAPTERKIT_TRACEBACK"):
        raise e
    first_line = (str(e).splitlines() or [""])[0][:300]
    return _fail(args, f"internal error, a bug in adapterkit ({type(e).__name__}: {first_line}). Please "
                       "report it with the command; ADAPTERKIT_TRACEBACK=1 shows the traceback.", 1)


if __name__ == "__main__":
    sys.exit(main())
