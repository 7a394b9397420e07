"""`adapterkit demo`: a quick run writes the training folder, both adapter files, one labelled grid
and the report (its rows, the issue's figures, the merge check); it refuses folders it did not make
and explains missing assets. The full-length run is marked slow."""
import json

import pytest
from PIL import Image

from adapterkit.train.cli.main import main
from adapterkit.train.world.demo import (
    GRID_NAME,
    MARKER,
    REPORT_NAME,
    native_bf16,
    prepare_out,
    sampling_dtype,
)
from adapterkit.train.world.quality import ROW_BASE, ROW_CONTROL, ROW_LORA, ROW_LORA_CONTROL

ROWS = [ROW_BASE, ROW_LORA, ROW_CONTROL, ROW_LORA_CONTROL]
FIGURES = {"style_with_lora", "style_without_lora", "shape_base", "shape_lora", "colour_base", "colour_lora",
           "shape_ratio", "colour_ratio", "edge_f1_base", "edge_f1_controlnet", "edge_f1_lora",
           "edge_f1_lora_controlnet", "outline_continuity_base", "outline_continuity_lora", "shapes_lost",
           "size_ratio"}


def check_outputs(out, printed, images, scenes):
    assert "demo ok" in printed and "max |merged - unmerged|" in printed
    assert len(list((out / "data").glob("*.png"))) == images
    assert (out / "data" / "00000.txt").read_text().endswith(", sks")
    report = json.loads((out / REPORT_NAME).read_text())
    assert {"settings", "checks", "adapter_files", "loss", "rows", "figures", "merge", "grid", "timings",
            "wall_s"} <= set(report)
    for fmt, name in (("kohya", "demo-style.safetensors"), ("peft", "demo-style.peft.safetensors")):
        path = out / "lora" / name
        assert path.is_file() and report["adapter_files"][fmt]["bytes"] == path.stat().st_size
        assert f"{fmt:5} " in printed
    assert list(report["rows"]) == ROWS
    for row in report["rows"].values():
        assert {"n", "shape", "colour", "background", "both", "style", "edge_f1"} <= set(row)
        assert row["n"] == scenes
    assert FIGURES <= set(report["figures"])
    assert report["checks"]["diffusers_max_abs_diff"] < 1e-4
    assert report["checks"]["ldm_roundtrip_max_abs_diff"] == 0.0
    assert report["merge"]["merged_vs_unmerged_max_abs_diff"] < 1e-4 and report["merge"]["unmerge_exact"]
    with Image.open(out / GRID_NAME) as grid:
        assert grid.width > 5 * 64 and grid.height > min(scenes, 8) * 64   # 5 columns, labels
    assert sorted(p.name for p in out.glob("*.png")) == [GRID_NAME]      # ONE picture at the top
    return report


def test_quick_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("style score at the trigger word", "edge F1", "shape / colour accuracy"):
        assert line in printed
    report = check_outputs(out, printed, images=4, scenes=2)
    assert report["settings"]["recipe"]["train"]["steps"] == 2
    assert report["settings"]["sample_dtype"] == ("bf16" if native_bf16() else "fp32")


def test_sample_dtype_choices_and_the_auto_rule(monkeypatch, tmp_path, capsys):
    import torch

    from adapterkit.train.world import demo
    assert sampling_dtype("fp32") is torch.float32 and sampling_dtype("bf16") is torch.bfloat16
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(demo, "native_bf16", lambda native=native: native)
        assert sampling_dtype("auto") is dtype
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        sampling_dtype("fp16")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--sample-dtype", "fp32"]) == 0
    assert json.loads((out / REPORT_NAME).read_text())["settings"]["sample_dtype"] == "fp32"


def test_rerun_reuses_the_finished_lora_unless_fresh_or_changed(tmp_path, capsys):
    out = tmp_path / "demo"
    lora = out / "lora" / "demo-style.safetensors"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "reusing the LoRA" not in first
    stamp = lora.stat().st_mtime_ns, lora.read_bytes()
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing the LoRA" in printed and "3. the style LoRA" not in printed
    assert (lora.stat().st_mtime_ns, lora.read_bytes()) == stamp
    report = check_outputs(out, printed, images=4, scenes=2)
    assert report["settings"]["reused_lora"] is True
    for again in (["--fresh"], ["optim.lr=2e-3"]):          # asked, or the recipe changed: trains again
        assert main(["demo", "--quick", "--out", str(out), *again]) == 0
        printed = capsys.readouterr().out
        assert "reusing the LoRA" not in printed and "3. the style LoRA" in printed, again
        assert lora.stat().st_mtime_ns != stamp[0]
        stamp = lora.stat().st_mtime_ns, lora.read_bytes()


def test_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not made by `adapterkit demo`" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_rerun_replaces_only_its_own_files(tmp_path):
    (tmp_path / MARKER).write_text("")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "00000.png").write_bytes(b"old")
    (tmp_path / REPORT_NAME).write_text("{}")
    (tmp_path / "keep.txt").write_text("mine")
    prepare_out(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "keep.txt"])


def test_missing_assets_say_how_to_rebuild_them(tmp_path, capsys):
    assert main(["demo", "--quick", "--assets", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "configs/tiny_pretrain.yaml" in err and "tools/gpu_tiny_base.sh" in err
    assert not (tmp_path / "o").exists()


def test_bad_override_fails_before_anything_is_written(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), "lora.rnak=4"]) == 2
    assert "rnak" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_full_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--threads", "2"]) == 0
    report = check_outputs(out, capsys.readouterr().out, images=48, scenes=16)
    figures = report["figures"]
    # The targets, on the demo's 16 scenes (README "the demo" has the measured figures).
    assert figures["shape_base"] >= 0.8 and figures["colour_base"] >= 0.8, figures
    assert figures["style_with_lora"] >= 0.9 and figures["style_without_lora"] <= 0.1, figures
    assert figures["shape_ratio"] >= 0.9 and figures["colour_ratio"] >= 0.9, figures
    assert figures["edge_f1_controlnet"] >= max(0.6, 3 * figures["edge_f1_base"]), figures
    # Clean outlines, no shape lost (issue 22): a LoRA drawing outlines broken over 30% of the way
    # round scores ~0.8 (quality.calibrate_outline), none ~0. The recipe's LoRA loses 1 of the 15
    # shapes the base draws right (README); a LoRA that shrinks or loses shapes fails below.
    assert figures["outline_continuity_lora"] >= 0.85 and figures["outline_continuity_base"] <= 0.1, figures
    assert figures["shapes_lost"] <= 1 and figures["size_ratio"] >= 0.9, figures
