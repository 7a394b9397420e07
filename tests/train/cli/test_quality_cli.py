"""train.quality.evaluate and `adapterkit quality` on a tiny random pixel-space base: the rows are
measured against the scenes they were asked for, with the documented seeds; LoRA and ControlNet
rows differ from the base's; the CLI prints the table and writes JSON and a grid; bad arguments
fail with a message."""
import json

import numpy as np
import pytest
import torch

from adapterkit.adapters.controlnet import ControlNet, hint_widths_for
from adapterkit.adapters.controlnet_files import save_controlnet
from adapterkit.adapters.lora import LoraSpec, add_lora, lora_weights
from adapterkit.adapters.lora_files import save_lora
from adapterkit.train.cli.main import main as cli
from adapterkit.train.pipeline.base import load_base
from adapterkit.train.pipeline.generate import generate, to_images
from adapterkit.train.world.quality import ROW_BASE, ROW_CONTROL, ROW_LORA, ROW_LORA_CONTROL, evaluate
from adapterkit.train.world.shapes import caption, render, sample_scenes

KW = {"steps": 2, "guidance": 3.0}
MEASURES = {"n", "shape", "colour", "background", "both", "outline", "stripes"}


def controlnet_for(base) -> ControlNet:
    """A ControlNet for the base whose zero convs are not zero (as if trained)."""
    cn = ControlNet.from_unet(base.unet, hint_widths=hint_widths_for(base.latent_scale))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    return cn.eval()


def add_style_lora(unet, name: str = "style") -> None:
    """A LoRA whose B is not zero, so that it changes the pictures."""
    add_lora(unet, LoraSpec(rank=2, alpha=2.0), name=name, trainable=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if f"lora_B.{name}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture
def base(pixel_base_dir):
    return load_base(pixel_base_dir)


def test_rows_scenes_and_seeds(base):
    add_style_lora(base.unet)
    cn = controlnet_for(base)
    before = lora_weights(base.unet)
    ev = evaluate(base, 3, 4, trigger="zq", loras={"style": 0.8}, controlnet=cn, **KW)
    assert list(ev.reports) == [ROW_BASE, ROW_LORA, ROW_CONTROL, ROW_LORA_CONTROL]
    for report in ev.reports.values():
        assert MEASURES | {"edge_f1"} <= set(report) and report["n"] == 3
        assert all(0 <= report[k] <= 1 for k in MEASURES - {"n"} | {"edge_f1"}), report
    assert "edge_ratio" in ev.reports[ROW_CONTROL] and "edge_ratio" not in ev.reports[ROW_BASE]
    assert ev.prompts == [caption(s, "zq") for s in sample_scenes(3, 4)]
    assert ev.seeds == [int(z) for z in np.random.SeedSequence([4, 1]).generate_state(3)]
    assert lora_weights(base.unet) == before                       # the caller's weights are back
    # the base row is the base (LoRA at 0, no ControlNet) on the documented seeds
    from adapterkit.adapters.lora import set_lora_weights
    set_lora_weights(base.unet, {"style": 0.0})
    direct = to_images(generate(base, ev.prompts, ev.seeds, **KW))
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(direct, ev.samples[ROW_BASE])] \
        == [True] * 3
    pixels = {label: np.stack([np.asarray(im, np.int16) for im in images])
              for label, images in ev.samples.items()}
    for a, b in ((ROW_BASE, ROW_LORA), (ROW_BASE, ROW_CONTROL), (ROW_LORA, ROW_LORA_CONTROL)):
        assert np.abs(pixels[a] - pixels[b]).max() > 10, (a, b)
    # n = 2 is the first two scenes of n = 3
    assert evaluate(base, 2, 4, trigger="zq", **KW).prompts == ev.prompts[:2]


def test_the_rows_are_measured_against_their_own_scenes(base, monkeypatch):
    """Samplers replaced by ground truth: the ControlNet rows get the scene itself, the others the
    next scene; the table must say so (64 px, where the measures are calibrated)."""
    import adapterkit.train.pipeline.generate as train_generate
    def fake_generate(base, prompts, seeds, *, controlnet=None, hints=None, size=None, **kw):
        scenes = {caption(s): s for s in sample_scenes(6, 0)}
        order = list(scenes)
        wanted = prompts if controlnet is not None else [order[(order.index(p) + 1) % 6] for p in prompts]
        assert controlnet is None or len(hints) == len(prompts)
        pixels = [torch.from_numpy(np.asarray(render(scenes[p], size), np.float32)).permute(2, 0, 1)
                  for p in wanted]
        return torch.stack(pixels) / 127.5 - 1

    monkeypatch.setattr(train_generate, "generate", fake_generate)
    ev = evaluate(base, 6, 0, controlnet=controlnet_for(base), size=64, **KW)
    right, wrong = ev.reports[ROW_CONTROL], ev.reports[ROW_BASE]
    assert right["both"] == 1.0 and right["edge_f1"] > 0.95 and right["stripes"] == 0.0
    assert wrong["both"] < 0.5 and wrong["edge_f1"] < 0.6
    assert right["edge_ratio"] == pytest.approx(right["edge_f1"] / wrong["edge_f1"])
    assert ev.table().splitlines()[0].split()[:3] == ["n", "shape", "colour"]


def test_cli_prints_the_table_and_writes_json_and_a_grid(base, pixel_base_dir, tmp_path, capsys):
    add_style_lora(base.unet, name="default")
    save_lora(base.unet, tmp_path / "style.safetensors")
    save_controlnet(controlnet_for(base), tmp_path / "cn")
    out = tmp_path / "report"
    assert cli(["quality", "--base", str(pixel_base_dir), "--lora", f"{tmp_path / 'style.safetensors'}:0.7",
                "--controlnet", str(tmp_path / "cn"), "--style", "outline", "--trigger", "zq", "--n", "2",
                "--steps", "2", "--device", "cpu", "--grid", str(out / "grid.png"),
                "--json", str(out / "q.json")]) == 0
    printed = capsys.readouterr().out
    for label in (ROW_BASE, ROW_LORA, ROW_CONTROL, ROW_LORA_CONTROL):
        assert any(line.startswith(label + " ") for line in printed.splitlines()), label
    data = json.loads((out / "q.json").read_text())
    assert set(data) == {"settings", "rows", "scenes"}
    assert list(data["rows"]) == [ROW_BASE, ROW_LORA, ROW_CONTROL, ROW_LORA_CONTROL]
    assert all(MEASURES | {"edge_f1"} <= set(r) for r in data["rows"].values())
    assert data["settings"]["loras"] == {"lora0": 0.7} and data["settings"]["style"] == "outline"
    assert data["settings"]["controlnet"] == str(tmp_path / "cn") and data["settings"]["steps"] == 2
    assert [s["prompt"] for s in data["scenes"]] == [caption(s, "zq") for s in sample_scenes(2, 0)]
    assert data["scenes"][0]["scene"]["style"] == "outline"
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.width > 6 * 16 and grid.height > 2 * 16             # target, hint, 4 rows; 2 scenes


def test_cli_base_alone(pixel_base_dir, tmp_path, capsys):
    assert cli(["quality", "--base", str(pixel_base_dir), "--n", "1", "--steps", "1",
                "--json", str(tmp_path / "q.json")]) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert list(data["rows"]) == [ROW_BASE] and "edge_f1" not in data["rows"][ROW_BASE]
    assert data["settings"]["lora_files"] == [] and data["settings"]["controlnet"] is None


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors: no such file"),
    (["--controlnet", "no/such/cn"], "--controlnet no/such/cn: no such file"),
    (["--controlnet", "CN8X"], "downsamples 8x"),
])
def test_cli_bad_arguments(base, pixel_base_dir, tmp_path, capsys, args, message):
    if "CN8X" in args:
        save_controlnet(ControlNet.from_unet(base.unet), tmp_path / "cn8")
        args = [str(tmp_path / "cn8") if a == "CN8X" else a for a in args]
    assert cli(["quality", "--base", str(pixel_base_dir), "--steps", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_unknown_style_is_refused(pixel_base_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["quality", "--base", str(pixel_base_dir), "--style", "dots"])
    assert e.value.code == 2 and "invalid choice: 'dots'" in capsys.readouterr().err
