"""LoRA training job, the safety nets around the loop: atomic and rotated checkpoints, SIGTERM, the
step-2 gradient check of lora_A, what a checkpoint folder holds, TensorBoard and the progress bar, and
`adapterkit sample` with two LoRAs. Fixtures and the recipe come from tests/test_lora_train.py."""
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterkit.adapters.adapter as adapter_mod
import adapterkit.train.jobs.lora as lt
from adapterkit.train.jobs.checkpoints import MARKER, STATE_FILE
from adapterkit.train.jobs.guards import TrainingInterrupted
from adapterkit.train.jobs.lora import main
from adapterkit.train.jobs.recipe import public_recipe
from support.fixtures import alias
from support.recipes import last_adapter_state as _adapter
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


def ckpt_names(out: Path) -> list[str]:
    """Everything under out/checkpoints (temp folders included), sorted."""
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs that trained alike: the same adapter in the last checkpoint and the same loss history."""
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    assert max((x[k] - y[k]).abs().max().item() for k in x) <= 1e-6
    assert [r["step"] for r in rows(a)] == [r["step"] for r in rows(b)]
    assert [r["loss"] for r in rows(a)] == pytest.approx([r["loss"] for r in rows(b)], abs=1e-6)


# --- 1. atomic checkpoints -------------------------------------------------------------------------

def test_an_export_failing_mid_checkpoint_leaves_the_previous_checkpoint_as_it_was(pipeline, images,
                                                                                  tmp_path, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "run"
    real_save, before = lt.save_lora, {}

    def fail_in_step_4s_peft_file(unet, path, fmt, **kwargs):
        path = Path(path)
        if fmt == "peft" and path.parent.name.startswith(".tmp-step-000004"):
            assert (path.parent / "lora.safetensors").is_file()           # the kohya file went first
            before.update(folder_bytes(out / "checkpoints" / "step-000002"))
            path.write_bytes(b"\0" * 100)                                  # half a file, then the disk fills
            raise OSError(28, "No space left on device")
        return real_save(unet, path, fmt=fmt, **kwargs)

    monkeypatch.setattr(lt, "save_lora", fail_in_step_4s_peft_file)
    with pytest.raises(OSError, match="No space left"):
        main(recipe(pipeline, images, out))
    assert before, "the failing export never ran"
    assert ckpt_names(out) == ["step-000002"]                # no step-000004, no .tmp-* left behind
    assert folder_bytes(out / "checkpoints" / "step-000002") == before
    assert not (out / "lora.safetensors").exists()

    monkeypatch.setattr(lt, "save_lora", real_save)
    capsys.readouterr()
    main(recipe(pipeline, images, out))
    assert re.search(r"resuming from \S*step-000002 \(step 2\)", capsys.readouterr().out)
    assert (out / "lora.safetensors").is_file()


def test_a_checkpoint_without_its_marker_is_skipped_and_the_resume_repeats_the_run(pipeline, images,
                                                                                    tmp_path, capsys):
    out = tmp_path / "run"
    main(recipe(pipeline, images, out))
    straight = {"adapter": _adapter(out), "rows": rows(out)}
    newest = out / "checkpoints" / "step-000004"
    (newest / MARKER).unlink()                                # as if killed just before the marker

    capsys.readouterr()
    main(recipe(pipeline, images, out))
    assert re.search(r"resuming from \S*step-000002 \(step 2\)", capsys.readouterr().out)
    assert (newest / MARKER).is_file()                        # step 4 was trained and written again
    again = _adapter(out)
    assert again.keys() == straight["adapter"].keys()
    assert max((again[k] - straight["adapter"][k]).abs().max().item() for k in again) <= 1e-6
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in straight["rows"]], abs=1e-6)


# --- 2. rotation ----------------------------------------------------------------------------------

def test_only_the_newest_checkpoints_are_kept(pipeline, images, tmp_path):
    out = main(recipe(pipeline, images, tmp_path / "run", **{
        "train.steps": 5, "output.checkpoint_every": 1, "output.keep_checkpoints": 2}))
    assert ckpt_names(out) == ["step-000004", "step-000005"]
    for name, step in (("step-000004", 4), ("step-000005", 5)):
        folder = out / "checkpoints" / name
        assert (folder / MARKER).is_file()
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == step


# --- 3. SIGTERM -----------------------------------------------------------------------------------

def test_sigterm_writes_a_final_checkpoint_and_the_run_resumes_to_the_same_result(pipeline, images, tmp_path,
                                                                                  monkeypatch):
    over = {"output.checkpoint_every": 0}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **over))
    handler_before = signal.getsignal(signal.SIGTERM)
    real_step, calls = lt.train_step, []

    def terminate_during_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, handler_before):
                pytest.fail("no SIGTERM handler during training: the signal would kill the process")
            os.kill(os.getpid(), signal.SIGTERM)          # as `kill` or a scheduler's preemption would
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", terminate_during_step_2)
    cfg = recipe(pipeline, images, tmp_path / "run", **over)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at step 2") as stopped:
        main(cfg)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / MARKER).is_file() and (ckpt / "lora.safetensors").is_file()
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before             # handler restored

    monkeypatch.setattr(lt, "train_step", real_step)
    resumed = main(cfg)
    assert len(calls) == 2                                                 # steps 3-4 ran unpatched
    assert (resumed / "lora.safetensors").is_file()
    assert_same_training(straight, resumed)


# --- 4. the step-2 gradient check of lora_A --------------------------------------------------------

def test_a_lora_a_that_gets_no_gradient_at_step_2_stops_the_run(pipeline, images, tmp_path, monkeypatch):
    real_add, starved = adapter_mod.add_lora, []

    def add_and_cut_one_lora_a(model, spec, *args, **kwargs):
        real_add(model, spec, *args, **kwargs)
        name, p = next((n, p) for n, p in model.named_parameters()
                       if n.endswith("attn2.to_k.lora_A.default.weight"))
        p.register_hook(torch.zeros_like)                  # its gradient never arrives; lora_B's does
        starved.append(name)

    monkeypatch.setattr(adapter_mod, "add_lora", add_and_cut_one_lora_a)
    with pytest.raises(RuntimeError, match=r"got no gradient at step 2.*attn2\.to_k\.lora_A") as stopped:
        main(recipe(pipeline, images, tmp_path / "run", **{"output.checkpoint_every": 1}))
    assert starved and starved[0] in str(stopped.value)
    assert "lora_B" not in str(stopped.value)
    # Step 1 passed the lora_B check and was checkpointed; step 2 stopped before its optimizer step.
    assert ckpt_names(tmp_path / "run") == ["step-000001"]
    assert not (tmp_path / "run" / "lora.safetensors").exists()


def test_a_frozen_adapter_tensor_stops_the_run_at_step_1(pipeline, images, tmp_path, monkeypatch):
    """A lora_B left out of training (requires_grad off, so not in the optimizer either) would stay 0
    for the whole run: the step-1 check names it."""
    real_add = adapter_mod.add_lora

    def add_and_freeze_one_lora_b(model, spec, *args, **kwargs):
        real_add(model, spec, *args, **kwargs)
        next(p for n, p in model.named_parameters()
             if n.endswith("attn1.to_v.lora_B.default.weight")).requires_grad_(False)

    monkeypatch.setattr(adapter_mod, "add_lora", add_and_freeze_one_lora_b)
    with pytest.raises(RuntimeError, match=r"got no gradient at step 1.*attn1\.to_v\.lora_B"):
        main(recipe(pipeline, images, tmp_path / "run"))


@pytest.mark.parametrize("job", ["lora", "controlnet"])
def test_random_crop_is_refused_before_any_model_loads(images, tmp_path, monkeypatch, job):
    """Training always caches latents (one encoding per image, crop and flip): data.random_crop is
    refused at once, saying what to set instead, before a base model is read."""
    import adapterkit.train.jobs.controlnet as ct
    from adapterkit.train.config import load_config

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded")
    for module in (lt, ct):
        for name in ("load_frozen_base", "open_base"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_base)
    run, recipe_type = (lt.main, lt.LoraRecipe) if job == "lora" else (ct.main, ct.ControlNetRecipe)
    cfg = load_config({"model": {"base": str(tmp_path / "any")},
                       "data": {"root": str(images), "random_crop": True},
                       "output": {"dir": str(tmp_path / "out")}}, recipe_type)
    with pytest.raises(ValueError, match=r"random_crop=true .* Set data\.random_crop: false"):
        run(cfg)


# --- 5. what a checkpoint holds -------------------------------------------------------------------

def test_every_checkpoint_holds_both_adapter_files_with_the_training_config(pipeline, images, tmp_path):
    cfg = recipe(pipeline, images, tmp_path / "run", **{"train.steps": 2, "output.checkpoint_every": 1})
    out = main(cfg)
    expected_config = public_recipe(cfg)
    assert ckpt_names(out) == ["step-000001", "step-000002"]
    for step, name in enumerate(ckpt_names(out), start=1):
        folder = out / "checkpoints" / name
        files = lt.adapter_files(cfg.output, folder)
        assert sorted(p.name for p in files.values()) == ["lora.peft.safetensors", "lora.safetensors"]
        for path in files.values():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            assert json.loads(meta["adapterkit.training_config"]) == expected_config
            assert meta["ss_steps"] == str(step)
            assert str(pipeline) not in meta["adapterkit.training_config"]     # no full paths
        # The exported peft tensors are the checkpoint's own adapter state of that step.
        state, peft = load_file(str(folder / STATE_FILE)), load_file(str(files["peft"]))
        for key, value in peft.items():
            own = key.removeprefix("unet.").replace(".weight", ".default.weight")
            assert torch.equal(value, state[own]), key
        assert len(peft) == len(state)


# --- 6. TensorBoard and the progress bar ----------------------------------------------------------

def test_tensorboard_logs_the_loss_and_the_progress_bar_shows_loss_and_speed(pipeline, images, tmp_path,
                                                                            capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 3, "output.log_every": 1}))
    err = capfd.readouterr().err
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events
    logged = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            logged = {e.step: e.value for e in acc.Scalars("loss")}
    history = rows(out)
    assert sorted(logged) == [r["step"] for r in history] == [1, 2, 3]
    assert [logged[r["step"]] for r in history] == pytest.approx([r["loss"] for r in history], rel=1e-6)

    bars = [line for line in re.split(r"[\r\n]+", err) if line.startswith("lora:") and "=" in line]
    postfixes = [dict(re.findall(r"(\w+)=([\d.]+)", line)) for line in bars]
    assert postfixes and all({"loss", "img_s"} <= p.keys() for p in postfixes), err[-2000:]
    assert postfixes[-1]["loss"] == f"{history[-1]['loss']:.4f}"           # the last step's loss
    assert all(float(p["img_s"]) > 0 for p in postfixes)
    assert re.search(r"lora: +100%.*3/3", err)


# --- 7. `adapterkit sample` with two LoRAs --------------------------------------------------------

@pytest.fixture(scope="module")
def two_loras(pipeline, images, tmp_path_factory):
    """Two short runs with a large learning rate (so a 3-step sample visibly changes), unlike each other."""
    root = tmp_path_factory.mktemp("two_loras")
    over = {"train.steps": 2, "optim.lr": 5e-2, "output.checkpoint_every": 0}
    a = main(recipe(pipeline, images, root / "a", **over))
    b = main(recipe(pipeline, images, root / "b", **over, **{"train.seed": 1, "lora.rank": 2}))
    return a / "lora.safetensors", b / "lora.safetensors"


def sample_cells(pipeline, tmp_path, name, *args, compare=False) -> list[np.ndarray]:
    """Run `adapterkit sample` for one 32 px image (seed 0); the grid's cells, left to right, as the
    8-bit pictures written (support.cli.drawn_grids: the PNG also holds labels and a footer)."""
    from adapterkit.train.cli.main import main as cli
    from support.cli import drawn_grids
    with drawn_grids() as drawn:
        assert cli(["sample", "--base", str(pipeline), "--prompt", "a red shape", "--seed", "0",
                    "--steps", "3", "--size", "32", *(["--compare"] if compare else []), *args,
                    "-o", str(tmp_path / f"{name}.png")]) == 0
    cells = drawn[-1]["cells"]
    assert len(cells) == (2 if compare else 1) and all(c.shape == (32, 32, 3) for c in cells)
    return cells


def test_sample_with_two_loras_and_euler(pipeline, two_loras, tmp_path, capsys):
    a, b = two_loras
    loras = lambda wa, wb: ["--lora", f"{a}:{wa}", "--lora", f"{b}:{wb}"]     # noqa: E731
    base_cell, lora_cell = sample_cells(pipeline, tmp_path, "both", *loras(0.8, 1.5), "--sampler", "euler",
                                        compare=True)
    said = capsys.readouterr().out
    assert f"lora0: {a.name} x0.8" in said and f"lora1: {b.name} x1.5" in said
    assert (tmp_path / "both.png").is_file()
    assert np.abs(lora_cell.astype(int) - base_cell).max() > 0              # the LoRAs change the picture

    [plain_euler] = sample_cells(pipeline, tmp_path, "base", "--sampler", "euler")
    [zero] = sample_cells(pipeline, tmp_path, "zero", *loras(0, 0), "--sampler", "euler")
    assert np.array_equal(base_cell, plain_euler)          # --compare's column is the base alone
    assert np.array_equal(zero, plain_euler)               # weight 0 for both: the base, exactly

    [plain_ddim] = sample_cells(pipeline, tmp_path, "ddim")                 # the default sampler
    assert np.abs(plain_ddim.astype(int) - plain_euler).max() > 0
