"""LoRA training end to end on a tiny random pipeline: the file loads in diffusers and changes its
output; resume == uninterrupted; divergence and dead adapters stop the run clearly."""
import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit.adapters.adapter as adapter_mod
import adapterkit.train.jobs.loop as loop
import adapterkit.train.jobs.lora as lt
from adapterkit.train.jobs.guards import TrainingDiverged, TrainingInterrupted, TrainingOutOfMemory
from adapterkit.train.jobs.lora import main
from adapterkit.unet import PRESETS
from support import REPO
from support.fixtures import alias
from support.recipes import last_adapter_state as _adapter
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")

def test_trains_a_file_that_loads_in_diffusers_and_changes_its_output(pipeline, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = main(recipe(pipeline, images, tmp_path / "run"))
    kohya, peft = out / "lora.safetensors", out / "lora.peft.safetensors"
    assert kohya.is_file() and peft.is_file()
    assert (out / "loss.png").is_file()
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in losses)
    from safetensors import safe_open
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    trained_with = json.loads(meta["adapterkit.training_config"])
    assert trained_with["train"]["steps"] == 4 and trained_with["data"]["root"] == images.name

    pipe = StableDiffusionPipeline.from_pretrained(pipeline)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 8, PRESETS["tiny"].context_dim, generator=g)
    with torch.no_grad():
        before = pipe.unet(x, 500, ctx).sample
        pipe.load_lora_weights(str(kohya))
        after = pipe.unet(x, 500, ctx).sample
    assert (after - before).abs().max() > 1e-4


def test_resume_after_a_crash_equals_the_uninterrupted_run(pipeline, images, tmp_path, monkeypatch):
    straight = main(recipe(pipeline, images, tmp_path / "straight", **{"train.grad_accum": 2}))

    real_step, calls = lt.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:                      # steps 1-3 done and step 2's checkpoint written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(recipe(pipeline, images, tmp_path / "resumed", **{"train.grad_accum": 2}))
    monkeypatch.setattr(lt, "train_step", real_step)
    resumed = main(recipe(pipeline, images, tmp_path / "resumed", **{"train.grad_accum": 2}))

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = lambda out: [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows(resumed)] == [1, 2, 3, 4]
    for x, y in zip(rows(straight), rows(resumed)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(pipeline, images, tmp_path, monkeypatch):
    real_loss, calls = lt.diffusion_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lt, "diffusion_loss", nan_at_step_3)
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match=r"became nan at step 3.*step-000002"):
        main(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "lora.safetensors").exists()


def test_an_adapter_that_gets_no_gradient_stops_the_run(pipeline, images, tmp_path, monkeypatch):
    real_add = adapter_mod.add_lora

    def add_and_bypass_one_layer(model, spec, *args, **kwargs):
        real_add(model, spec, *args, **kwargs)
        layer = next(m for n, m in model.named_modules() if n.endswith("attn1.to_q"))
        layer.forward = lambda x, *a, **k: layer.base_layer(x)       # the LoRA branch never runs

    monkeypatch.setattr(adapter_mod, "add_lora", add_and_bypass_one_layer)
    with pytest.raises(RuntimeError, match=r"got no gradient at step 1.*attn1\.to_q\.lora_B"):
        main(recipe(pipeline, images, tmp_path / "run"))


def test_a_checkpoint_of_another_run_is_not_resumed(pipeline, images, tmp_path):
    main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 2}))
    with pytest.raises(ValueError, match=r"different run.*lora\.rank: 4 -> 8"):
        main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 4, "lora.rank": 8}))


def test_cli_trains_from_yaml_with_overrides(pipeline, images, tmp_path):
    import yaml

    from adapterkit.train.cli.main import main as cli
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "resolution": 32, "bucket_step": 8,
                                            "min_side": 32},
                                   "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
                                   "train": {"steps": 2, "batch_size": 4}}))
    out = tmp_path / "cli"
    assert cli(["train", "lora", str(cfg), f"output.dir={out}", "output.name=style"]) == 0
    assert (out / "style.safetensors").is_file()
    assert cli(["train", "lora", str(cfg), "train.stepz=3"]) == 2       # unknown key: clear error


def test_two_processes_with_accelerate_launch_train_one_adapter(pipeline, images, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: two gloo processes."""
    import os
    import subprocess
    import sys

    import yaml
    cfg = tmp_path / "lora.yaml"
    out = tmp_path / "ddp"
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "resolution": 32, "bucket_step": 8,
                                            "min_side": 32},
                                   "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
                                   "train": {"steps": 2, "batch_size": 2},
                                   "output": {"dir": str(out), "checkpoint_every": 2}}))
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--main_process_port", "29517",
                          "-m", "adapterkit", "train", "lora", str(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["processes"] == 2
    assert (out / "lora.safetensors").is_file()
    assert run.stdout.count("done:") == 2          # both processes finished


def test_bf16_base_trains_with_fp32_master_weights_and_resumes_exactly(pipeline, images, tmp_path,
                                                                        monkeypatch):
    """A bf16 base: the LoRA branch computes in bf16, the optimizer holds fp32 masters; the checkpoint
    and the exported file carry the fp32 values, and a resume continues exactly."""
    over = {"model.dtype": "bf16", "train.grad_accum": 1}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **over))
    real_step, calls = lt.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(recipe(pipeline, images, tmp_path / "resumed", **over))
    monkeypatch.setattr(lt, "train_step", real_step)
    resumed = main(recipe(pipeline, images, tmp_path / "resumed", **over))

    a, b = _adapter(straight), _adapter(resumed)
    assert all(v.dtype == torch.float32 for v in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # The exported file holds the masters, not their bf16 roundings.
    exported = load_file(str(straight / "lora.peft.safetensors"))
    key = next(k for k in exported if "lora_B" in k)
    name = key.removeprefix("unet.").replace("lora_B.weight", "lora_B.default.weight")
    assert exported[key].dtype == torch.float32
    assert torch.equal(exported[key], a[name])
    assert not torch.equal(a[name], a[name].bfloat16().float())


def test_sample_command_writes_a_grid_with_and_without_the_lora(pipeline, images, tmp_path):
    from PIL import Image as PILImage

    from adapterkit.train.cli.main import main as cli
    out = main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 2}))
    grid = tmp_path / "grid.png"
    assert cli(["sample", "--base", str(pipeline), "--lora", f"{out / 'lora.safetensors'}:0.8",
                "--prompt", "a red shape", "--seed", "0", "--seed", "1", "--steps", "3",
                "--size", "32", "--compare", "-o", str(grid)]) == 0
    img = PILImage.open(grid)
    assert img.width > 2 * 32 and img.height > 2 * 32       # 2 rows (seeds) x 2 columns (+ labels)


def test_sigint_writes_a_final_checkpoint_and_the_run_resumes_from_it(pipeline, images, tmp_path,
                                                                      monkeypatch):
    import os
    import signal

    real_step, calls = lt.train_step, []

    def interrupt_during_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)          # as Ctrl-C would, mid-step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", interrupt_during_step_2)
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.checkpoint_every": 0})
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2") as stopped:
        main(cfg)                                         # after the final checkpoint
    assert stopped.value.exit_code == 130
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "lora.safetensors").is_file()
    assert not (tmp_path / "run" / "lora.safetensors").exists()      # the run did not finish
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored
    monkeypatch.setattr(lt, "train_step", real_step)
    main(cfg)
    assert (tmp_path / "run" / "lora.safetensors").is_file()


def test_sample_grids_are_written_during_and_after_training(pipeline, images, tmp_path):
    main(recipe(pipeline, images, tmp_path / "run", **{
        "sample.prompts": "a red shape,a blue shape", "sample.every": 2, "sample.steps": 2,
        "sample.lora_scales": "0,1"}))
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    # The last step (4) is sampled once, as final.png (train.loop.run_steps' policy, shared with the
    # ControlNet and pretrain jobs): a step-000004.png would be the same weights sampled twice.
    assert samples == ["final.png", "step-000002.png"]


def test_out_of_memory_names_the_sizes_to_change_and_keeps_the_checkpoint(pipeline, images, tmp_path,
                                                                         monkeypatch):
    real_step, calls = lt.train_step, []

    def oom_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", oom_at_step_3)
    with pytest.raises(TrainingOutOfMemory, match=r"step 3 with batch_size=4 at resolution 32.*step-000002"):
        main(recipe(pipeline, images, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()


def test_a_damaged_checkpoint_is_refused_not_restarted(pipeline, images, tmp_path):
    main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 2}))
    (tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"step-000002 is damaged: optimizer\.safetensors is empty"):
        main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 4}))


def test_an_unwritable_output_folder_fails_before_loading_anything(pipeline, images, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(lt, "load_frozen_base", lambda *a: pytest.fail("loaded a model first"))
    with pytest.raises(ValueError, match="is not writable"):
        main(recipe(pipeline, images, blocker / "run"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_what_the_eager_step_trains(pipeline, images, tmp_path, monkeypatch, capsys):
    """On a GPU the job replays its steps from CUDA graphs (train.graphs): the same losses and adapter
    as without them. A large learning rate makes a graph that read stale weights show at once."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)       # fp32, no TF32: sums' order only
    # eps = 1 makes AdamW's step ~ lr * gradient: no sign-like steps that turn rounding noise in a
    # near-zero gradient into a full step (graphed and eager kernels sum in different orders).
    over = {"train.steps": 5, "optim.lr": 1.0, "optim.eps": 1.0, "optim.weight_decay": 0.0,
            "output.checkpoint_every": 0, "model.dtype": "fp32"}
    graphed = main(recipe(pipeline, images, tmp_path / "graphs", **over, **{"train.cuda_graphs": True}))
    assert "CUDA graphs: on" in capsys.readouterr().out
    eager = main(recipe(pipeline, images, tmp_path / "eager", **over, **{"train.cuda_graphs": False}))
    losses = lambda out: [json.loads(r)["loss"] for r in (out / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(graphed) == pytest.approx(losses(eager), rel=1e-4)
    assert len(set(losses(graphed))) == 5                      # the steps differ: the weights moved
    a, b = _adapter(graphed), _adapter(eager)
    assert max((a[k] - b[k]).abs().max().item() / (b[k].abs().max().item() + 1e-6) for k in a) <= 1e-4


def test_only_the_lora_reaches_the_optimizer_and_gradient_checkpointing_changes_nothing(pipeline, images,
                                                                                       tmp_path, monkeypatch):
    """The optimizer gets exactly the LoRA tensors (and so keeps state for nothing else); the frozen
    U-Net has no gradients. Recomputing activations in the backward (train.gradient_checkpointing)
    trains the same adapter with the same losses."""
    real, seen = loop.make_optimizer, {}

    def recording(cfg, params, steps):
        seen["params"] = list(params)
        return real(cfg, params, steps)

    real_step = lt.train_step

    def step_and_look(cfg, accelerator, model, *rest, **kw):
        loss = real_step(cfg, accelerator, model, *rest, **kw)
        seen["frozen_grads"] = [n for n, p in model.named_parameters()
                                if ".lora_" not in n and p.grad is not None]
        return loss

    monkeypatch.setattr(loop, "make_optimizer", recording)
    monkeypatch.setattr(lt, "train_step", step_and_look)
    over = {"train.steps": 3, "output.checkpoint_every": 0}
    plain = main(recipe(pipeline, images, tmp_path / "plain", **over))
    assert seen["params"] and seen["frozen_grads"] == []
    trained = load_file(str(plain / "lora.peft.safetensors"))
    assert len(seen["params"]) == len(trained) and sum(p.numel() for p in seen["params"]) == \
        sum(t.numel() for t in trained.values())

    monkeypatch.setattr(lt, "train_step", real_step)
    checkpointed = main(recipe(pipeline, images, tmp_path / "ckpt", **over,
                               **{"train.gradient_checkpointing": True}))
    a, b = (load_file(str(out / "lora.peft.safetensors")) for out in (plain, checkpointed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    la, lb = ([json.loads(r)["loss"] for r in (out / "loss.jsonl").read_text().splitlines()]
              for out in (plain, checkpointed))
    assert la == pytest.approx(lb, abs=1e-6)


def test_a_checkpoint_without_a_key_added_since_resumes_as_its_default(pipeline, images, tmp_path):
    """A recipe key added after a checkpoint was written reads as its default there: an older run whose
    recipe only lacks it is the same run; the key set to another value is a different run."""
    from adapterkit.train.config import to_dict
    from adapterkit.train.jobs.checkpoints import check_same_run
    cfg = recipe(pipeline, images, tmp_path / "run")
    older = to_dict(cfg)
    del older["train"]["timestep_sampling"], older["train"]["noise_offset"]
    check_same_run(tmp_path, tmp_path / "checkpoint-2", older, cfg, mutable=("train.steps",))
    newer = recipe(pipeline, images, tmp_path / "run", **{"train.noise_offset": 0.1})
    with pytest.raises(ValueError, match=r"different run.*train\.noise_offset: 0\.0 -> 0\.1"):
        check_same_run(tmp_path, tmp_path / "checkpoint-2", older, newer, mutable=("train.steps",))
