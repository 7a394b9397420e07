"""A signal that reaches one process of a multi-process run: every process stops after the same step
and one checkpoint is written (two gloo processes on CPU under `accelerate launch`)."""
import json
import os
import subprocess
import sys

import yaml

from support import REPO
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


# Run by each process: the LoRA job, where process 1 alone gets SIGTERM during its second step.
WORKER = """
import os, signal, sys
import adapterkit.train.jobs.lora as lt
real = lt.train_step

def train_step(cfg, accelerator, *rest, **kw):
    loss = real(cfg, accelerator, *rest, **kw)
    if accelerator.process_index == 1 and rest[6] == 1:       # rest[6]: the step, 0-based
        os.kill(os.getpid(), signal.SIGTERM)
    return loss

lt.train_step = train_step
from adapterkit.train.cli.main import main
sys.exit(main(["train", "lora", sys.argv[1]]))
"""


def test_sigterm_on_one_process_stops_all_after_the_same_step(pipeline, images, tmp_path):  # noqa: F811
    cfg, out, worker = tmp_path / "lora.yaml", tmp_path / "ddp", tmp_path / "worker.py"
    worker.write_text(WORKER)
    cfg.write_text(yaml.safe_dump({"model": {"base": str(pipeline)},
                                   "data": {"root": str(images), "resolution": 32, "bucket_step": 8,
                                            "min_side": 32},
                                   "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
                                   "train": {"steps": 5, "batch_size": 2},
                                   "output": {"dir": str(out), "checkpoint_every": 0}}))
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "--main_process_port", "29519", str(worker), str(cfg)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "SIGTERM" in run.stdout + run.stderr, run.stderr[-3000:]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"]                     # both stopped after step 2, one checkpoint
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["step"] == 2
