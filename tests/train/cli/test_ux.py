"""The first hour of a user (issue 22): outputs a person can read and use, no surprises.

- `sample -o` writes the format its suffix names (JPEG bytes for .jpg), and refuses an unknown suffix
  before the base is loaded.
- `train lora|controlnet` end with a summary: the files written (names, sizes), the loss at the start and
  end of loss.jsonl, the steps, the wall time and a `sample` line.
- A failed run leaves no empty folder it made; a folder that was there before stays.
- A second Ctrl-C (StopSignals raises KeyboardInterrupt) ends in one line and exit 130, no traceback.
- `--lora F:strong` says the weight is not a number (not "no such file"); paths with colons stay whole.
- Sampling shows a bar counting the images (`generate(progress=True)`, as `sample` asks); silent by
  default.
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest
import yaml
from PIL import Image

import adapterkit.train.cli.sample as sample_cli
import adapterkit.train.cli.train as train_cli
from adapterkit.adapters.lora_files import split_lora_spec
from adapterkit.train.cli.main import main as cli
from adapterkit.train.cli.train import loss_line, remove_if_empty
from adapterkit.train.images import save_grid
from adapterkit.train.jobs.progress import StopSignals
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import generate
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")

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


def test_loss_line_means_the_first_and_last_steps(tmp_path):
    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 if s <= 10 else 0.25, "lr": 1e-4}) + "\n"
                           for s in range(1, 41)))
    assert loss_line(log) == "steps 40, loss 1 -> 0.25 (mean of the first/last 10 steps)"
    assert loss_line(tmp_path / "none.jsonl") == "no loss logged (no step was run)"


def train_yaml(tmp_path, pipeline, images, sections=None, **data) -> str:
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "min_side": 32, **data},
                                   "train": {"steps": 3, "batch_size": 4}, **(sections or {})}))
    return str(cfg)


def test_train_lora_ends_with_files_sizes_and_losses(pipeline, images, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = train_yaml(tmp_path, pipeline, images, {"lora": {"rank": 2, "alpha": 2, "targets": "attn"}},
                     resolution=32, bucket_step=8)
    assert cli(["train", "lora", cfg, f"output.dir={out}", "output.name=style",
                "output.formats=[kohya,peft]"]) == 0
    text = capsys.readouterr().out
    tail = text[text.index(f"done: {out}"):]
    for name in ("style.safetensors", "style.peft.safetensors"):
        size = (out / name).stat().st_size / 2**10
        assert re.search(rf"{re.escape(name)}\s+{size:.1f} KiB", tail), tail
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert f"steps 3, loss {rows[0]['loss']:.4g} -> {rows[-1]['loss']:.4g} (first/last step)" in tail, tail
    assert re.search(r"done: .* \(\d+\.\d s\)", tail), tail
    assert f"--lora {out / 'style.safetensors'}:1" in tail, tail
    assert "also: checkpoints/, lora/, loss.jsonl, loss.png\n" in tail, tail     # lora/: TensorBoard's
    assert "plan: 3 steps of 4 images" in text[:text.index(f"done: {out}")]


def test_train_controlnet_ends_with_its_files(controlnet_pipeline, controlnet_images, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = train_yaml(tmp_path, controlnet_pipeline, controlnet_images, resolution=64, bucket_step=16)
    assert cli(["train", "controlnet", cfg, f"output.dir={out}", "output.name=edges", "train.steps=1",
                "output.formats=[diffusers,diffusers-file]"]) == 0
    tail = capsys.readouterr().out.split(f"done: {out}")[1]
    folder = sum(f.stat().st_size for f in (out / "edges").rglob("*") if f.is_file())
    assert re.search(rf"edges/\s+{folder / 2**20:.1f} MiB", tail), tail
    assert "edges.safetensors" in tail and "steps 1, loss " in tail, tail
    assert f"--controlnet {out / 'edges'} --hint" in tail, tail


def no_pictures(tmp_path, pipeline):
    empty = tmp_path / "pictures"
    empty.mkdir()
    return train_yaml(tmp_path, pipeline, empty, {"lora": {"rank": 2, "alpha": 2, "targets": "attn"}},
                      resolution=32, bucket_step=8)


def test_a_failed_run_leaves_no_folder_it_made(pipeline, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert cli(["train", "lora", no_pictures(tmp_path, pipeline), f"output.dir={out}"]) == 2
    assert "no images" in capsys.readouterr().err.lower()
    assert not (tmp_path / "new").exists()


def test_a_failed_run_keeps_the_users_folder(pipeline, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    assert cli(["train", "lora", no_pictures(tmp_path, pipeline), f"output.dir={out}"]) == 2
    assert out.is_dir()


def test_remove_if_empty_keeps_a_tree_with_a_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "c").mkdir()
    (tmp_path / "a" / "c" / "note.txt").write_text("x")
    remove_if_empty(tmp_path / "a")
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "a" / "c" / "note.txt").is_file()
    (tmp_path / "a" / "c" / "note.txt").unlink()
    remove_if_empty(tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_second_ctrl_c_prints_one_line(tmp_path, monkeypatch, capsys):
    def run(args):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)          # the first: "finishing this step ..."
            assert stop.requested == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)          # the second: KeyboardInterrupt
        raise AssertionError("not stopped")
    monkeypatch.setattr(train_cli, "run", run)
    assert cli(["train", "lora", str(tmp_path / "r.yaml")]) == 130
    out, err = capsys.readouterr()
    assert "again to abort" in out
    assert err.startswith("adapterkit train: interrupted;") and err.count("\n") == 1, err
    assert "resume" in err and "Traceback" not in err


def test_a_lora_weight_that_is_not_a_number(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    assert split_lora_spec(f"{lora}:0.5") == (str(lora), 0.5)
    assert split_lora_spec(str(lora)) == (str(lora), 1.0)
    assert split_lora_spec("C:\\x.safetensors") == ("C:\\x.safetensors", 1.0)    # a drive, not a weight
    assert split_lora_spec("a:b.safetensors") == ("a:b.safetensors", 1.0)
    (tmp_path / "odd:name").write_bytes(b"")
    assert split_lora_spec(str(tmp_path / "odd:name")) == (str(tmp_path / "odd:name"), 1.0)   # exists whole
    for spec in (f"{lora}:strong", f"{lora}:", "missing.safetensors:strong"):
        with pytest.raises(ValueError, match="is not a number"):
            split_lora_spec(spec)


def test_sample_lora_weight_word_is_its_own_message(pipeline, tmp_path, monkeypatch, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    monkeypatch.setattr(sample_cli, "open_base", lambda *a, **k: pytest.fail("the base was loaded"))
    assert cli(["sample", "--base", str(pipeline), "--lora", f"{lora}:strong", "--prompt", "a",
                "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "weight 'strong' is not a number" in err and "no such file" not in err, err


def test_generate_counts_images_only_when_asked(pipeline, capsys):
    base = load_base(pipeline)
    capsys.readouterr()                                       # the text encoder's own loading bar
    generate(base, ["a", "b", "c"], [0, 1, 2], steps=1, guidance=1.0, batch_size=2)
    assert capsys.readouterr() == ("", "")                    # a library call prints nothing
    generate(base, ["a", "b", "c"], [0, 1, 2], steps=1, guidance=1.0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "sampling" in err and "3/3" in err, err


def test_sample_shows_progress(pipeline, tmp_path, capsys):
    assert cli(["sample", "--base", str(pipeline), "--prompt", "a", "--prompt", "b", "--steps", "1",
                "--compare", "-o", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err
    assert "sampling" in err and "2/2" in err, err
