"""`adapterkit canny`: the command writes the maps, reports skipped files in its exit status, and
refuses its input folder as output."""
import argparse
import json

import pytest
from PIL import Image

from adapterkit.train.cli import canny as canny_cli
from adapterkit.train.data.canny import SETTINGS_KEY
from support.pictures import write_canny_folder


@pytest.fixture
def folder(tmp_path):
    return write_canny_folder(tmp_path / "images")


def test_cli_writes_maps_and_reports_status(folder, tmp_path, monkeypatch, capsys):
    import adapterkit.train.cli.main as train_cli
    # main() as shipped, with only this command registered (the others import diffusers: seconds)
    monkeypatch.setattr(train_cli, "COMMAND_MODULES", ("adapterkit.train.cli.canny",))
    out = tmp_path / "edges"
    assert train_cli.main(["canny", str(folder), str(out), "--low", "50", "--high", "150"]) == 1
    printed = capsys.readouterr().out
    assert "1 written" in printed and "broken.png" in printed
    with Image.open(out / "good.png") as im:
        assert json.loads(im.text[SETTINGS_KEY])["low"] == 50
    (folder / "broken.png").unlink()
    assert train_cli.main(["canny", str(folder), str(out)]) == 0          # kept, nothing skipped
    assert "1 kept" in capsys.readouterr().out
    assert train_cli.main(["canny", str(folder), str(folder)]) == 2
    assert "is the input folder" in capsys.readouterr().err


def test_register_adds_the_subcommand_with_defaults():
    parser = argparse.ArgumentParser()
    canny_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["canny", "a", "b"])
    assert (args.low, args.high, args.blur, args.overwrite) == (100, 200, None, False)
    assert args.func is canny_cli.run
