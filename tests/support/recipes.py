"""Small recipes of the LoRA and ControlNet jobs on the tiny fixture pipelines."""
from pathlib import Path

from safetensors.torch import load_file

from adapterkit.train.config import load_config
from adapterkit.train.jobs.controlnet import ControlNetRecipe
from adapterkit.train.jobs.lora import LoraRecipe
from support import REPO

CONFIGS = REPO / "configs"


def lora_recipe(pipeline, images, out, **overrides) -> LoraRecipe:
    cfg = {
        "model": {"base": str(pipeline)},
        "data": {"root": str(images), "resolution": 32, "bucket_step": 8, "min_side": 32, "trigger": "sks"},
        "lora": {"rank": 4, "alpha": 4, "targets": "attn"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 4, "min_snr_gamma": 5.0},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1},
    }
    return load_config(cfg, LoraRecipe, [f"{k}={v}" for k, v in overrides.items()])


def controlnet_recipe(pipeline, images, out, **overrides) -> ControlNetRecipe:
    cfg = {
        "model": {"base": str(pipeline)},
        "data": {"root": str(images), "resolution": 64, "bucket_step": 16, "min_side": 32,
                 "caption_dropout": 0.5},
        "optim": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 4},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1},
    }
    return load_config(cfg, ControlNetRecipe, [f"{k}={v}" for k, v in overrides.items()])


def last_adapter_state(out: Path) -> dict:
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(str(ckpt / "adapter_state.safetensors"))


def crash_then_resume(job, cfg, monkeypatch, crash_at: int) -> Path:
    """Run the job module's `main(cfg)` with its `train_step` raising KeyboardInterrupt at call
    `crash_at` (a crash after the checkpoints before it), then `main(cfg)` again, which resumes to the
    end; returns the output folder."""
    import pytest

    real_step, calls = job.train_step, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(job, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        job.main(cfg)
    monkeypatch.setattr(job, "train_step", real_step)
    return job.main(cfg)
