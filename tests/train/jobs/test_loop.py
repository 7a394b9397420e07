"""train.loop.run_steps on a one-parameter model with a stand-in accelerator: what the job tests
(test_lora_train, test_controlnet_train, test_pretrain) do not pin down: the exact schedule of
samples, tracker logs, checkpoint exports and the final export, on the main process and elsewhere,
and the job's OOM explanation wrapping each step."""
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from adapterkit.train.jobs.guards import TrainingDiverged
from adapterkit.train.jobs.loop import Training, run_steps
from adapterkit.train.jobs.optimizer import make_optimizer
from adapterkit.train.jobs.pretrain import (
    PretrainLoopConfig,
    PretrainOutputConfig,
    PretrainRecipe,
    PretrainSampleConfig,
)
from adapterkit.train.jobs.progress import PendingSteps
from adapterkit.train.jobs.state import TrainingState


class Accelerator:
    """The part of accelerate.Accelerator run_steps and save_checkpoint use, on one CPU process."""

    def __init__(self, main: bool = True):
        self.is_main_process = self.is_local_main_process = main
        self.num_processes, self.process_index = 1, 0
        self.logged: list[int] = []
        self.trackers: list = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append(step)

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def wait_for_everyone(self) -> None:
        pass

    def end_training(self) -> None:
        pass


def run(out: Path, steps: int, main: bool = True, log_every: int = 3, **overrides):
    cfg = PretrainRecipe(train=PretrainLoopConfig(steps=steps),
                         output=PretrainOutputConfig(dir=str(out), checkpoint_every=0, log_every=log_every),
                         sample=PretrainSampleConfig(every=2))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer, lr_schedule = make_optimizer(cfg.optim, [weight], steps)
    accelerator, calls = Accelerator(main), []

    def step(s: int) -> float:
        loss = (weight ** 2).sum()
        loss.backward()
        calls.append(("step", s))
        return loss.item()

    state = TrainingState(accelerator, lambda: {"weight": weight.detach()}, optimizer, lr_schedule)
    kw = dict(step=step, training=Training(weight, [weight], state),
              export=lambda folder, step=None: calls.append(
                  ("export", "out" if Path(folder) == out else "checkpoint", step)),
              sample=lambda s, path: calls.append(("sample", s, path.name)),
              images_per_step=1, name="test", what="test") | overrides
    assert run_steps(accelerator, cfg, out, 0, **kw) == steps
    return calls, accelerator.logged


def test_samples_every_n_steps_and_once_at_the_end(tmp_path):
    calls, logged = run(tmp_path / "odd", 5)
    events = [c for c in calls if c[0] != "step"]
    assert events == [("sample", 2, "step-000002.png"), ("sample", 4, "step-000004.png"),
                      ("export", "checkpoint", 5), ("export", "out", None), ("sample", 5, "final.png")]
    assert logged == [3, 5]                                   # log_every, and the last step
    calls, _ = run(tmp_path / "even", 4)                      # the last step is sampled once
    assert [c for c in calls if c[0] == "sample"] == [("sample", 2, "step-000002.png"),
                                                       ("sample", 4, "final.png")]


def test_other_processes_neither_sample_nor_export(tmp_path):
    calls, _ = run(tmp_path / "run", 4, main=False)
    assert [c for c in calls if c[0] != "step"] == []


def test_the_jobs_oom_explanation_wraps_each_step(tmp_path):
    seen = []

    @contextmanager
    def explain(cfg, step, out):
        seen.append(step)
        try:
            yield
        except torch.OutOfMemoryError:
            raise ValueError(f"explained at {step}") from None

    def oom_at_step_2(s):
        if s == 1:
            raise torch.OutOfMemoryError("out of memory")
        return 1.0

    with pytest.raises(ValueError, match="explained at 1"):
        run(tmp_path / "run", 4, step=oom_at_step_2, explain_oom=explain)
    assert seen == [0, 1]


def test_log_every_zero_logs_the_last_step_only(tmp_path):
    _, logged = run(tmp_path / "quiet", 5, log_every=0)
    assert logged == [5]


def test_losses_are_read_back_at_log_checkpoint_and_sample_steps_only(tmp_path, monkeypatch):
    # A step returns its loss as a tensor (the jobs' device tensor); the loop reads the values only
    # where it needs them: samples every 2, log_every 3, the last step. Every step still gets its row.
    from adapterkit.train.jobs import progress
    reads, real_read = [], progress.PendingSteps.read

    def counted(self):
        rows = real_read(self)
        reads.append([r[0] for r in rows])
        return rows

    monkeypatch.setattr(progress.PendingSteps, "read", counted)
    _, logged = run(tmp_path / "run", 7, step=lambda s: torch.tensor(0.1 * s))
    assert reads == [[1, 2], [3], [4], [5, 6], [7]]            # sample 2, log 3, sample 4, log+sample 6, last
    assert logged == [3, 6, 7]
    rows = [json.loads(r) for r in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert all(a["seconds"] <= b["seconds"] for a, b in zip(rows, rows[1:]))


def test_a_nan_between_reads_stops_at_the_next_read_naming_its_step(tmp_path):
    # log_every 5, no samples in between: the NaN of step 2 (0-based 1) is seen at step 5's read; the
    # message names step 2, loss.jsonl keeps step 1 only, and nothing was exported.
    def nan_at_step_2(s):
        return torch.tensor(float("nan") if s == 1 else 1.0)

    with pytest.raises(TrainingDiverged, match="became nan at step 2;"):
        run(tmp_path / "run", 8, log_every=5, step=nan_at_step_2, sample=None)
    rows = [json.loads(r) for r in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


def test_pending_steps_read_floats_and_tensors_in_order():
    clock = iter(range(100)).__next__
    pending = PendingSteps(lambda: float(clock()))
    pending.add(1, torch.tensor(0.5), 1e-3)
    pending.add(2, 0.25, 1e-3)
    pending.add(3, torch.tensor([2.0]).sum(), 2e-3)
    rows = pending.read()
    assert [(s, loss, lr) for s, loss, lr, _ in rows] == [(1, 0.5, 1e-3), (2, 0.25, 1e-3), (3, 2.0, 2e-3)]
    assert [t for *_, t in rows] == sorted(t for *_, t in rows)     # each stamped when its step ended
    assert pending.read() == []
