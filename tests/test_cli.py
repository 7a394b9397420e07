"""The command line: the demo runs end to end and errors reach the user as one clear line."""
import pytest

from train.cli import build_parser, main


def test_demo_runs_and_writes_both_layouts(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "demo ok" in printed
    assert (tmp_path / "tiny_unet" / "config.json").is_file()
    assert (tmp_path / "tiny_unet.safetensors").is_file()


def test_unknown_subcommand_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nonsense"])
