"""The command line: subcommands are registered and errors reach the user as one clear line
(the demo itself: tests/test_demo.py)."""
import pytest

from adapterkit.train.cli.main import build_parser


def test_unknown_subcommand_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nonsense"])
