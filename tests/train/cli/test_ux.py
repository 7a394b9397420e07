"""The first hour of a user (issue 22): outputs a person can read and use, no surprises.

- `sample -o` writes the format its suffix names (JPEG bytes for .jpg), and refuses an unknown suffix
  before the base is loaded.
"""
from __future__ import annotations

import pytest
from PIL import Image

import adapterkit.train.cli.sample as sample_cli
from adapterkit.train.cli.main import main as cli
from adapterkit.train.images import save_grid
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")

MAGIC = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".webp": b"RIFF"}


@pytest.mark.parametrize("suffix", list(MAGIC))
def test_save_grid_writes_the_format_of_its_suffix(tmp_path, suffix):
    cells = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    path = save_grid(cells, 1, 2, tmp_path / f"g{suffix}", col_labels=["a", "b"])
    assert path.read_bytes().startswith(MAGIC[suffix])
    with Image.open(path) as img:
        assert img.format == {".jpeg": "JPEG", ".jpg": "JPEG"}.get(suffix, suffix[1:].upper())


def test_sample_jpg_holds_jpeg_bytes(pipeline, tmp_path):
    out = tmp_path / "grid.jpg"
    assert cli(["sample", "--base", str(pipeline), "--prompt", "a red shape", "--steps", "1",
                "-o", str(out)]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"


def test_sample_unknown_suffix_fails_before_the_base_loads(pipeline, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the base was loaded")
    monkeypatch.setattr(sample_cli, "open_base", no_load)
    out = tmp_path / "grid.gif"
    assert cli(["sample", "--base", str(pipeline), "--prompt", "a", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "grid.gif" in err and ".jpg" in err and "Traceback" not in err
    assert not out.exists()
