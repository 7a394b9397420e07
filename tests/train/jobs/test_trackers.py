"""Trackers, logging, progress bars and the plan a run starts with (issue 17 item 9, issue 22 item 1).

- `output.trackers` reaches accelerate's `log_with` (tensorboard by name, W&B as accelerate's own
  WandBTracker named after the job; none: no tracker); wandb where it is not installed fails when the
  recipe is read, naming `pip install wandb`.
- One LoRA run with both trackers (a fake `wandb` module, nothing reaches a network): W&B starts offline
  in out/, gets the recipe, the loss and lr at every step and each sample grid as an image; TensorBoard
  gets the same grids (add_images) at the steps they were drawn; the plan names the steps, images a
  step, files and what a stop leaves; the scan, cache and sample bars count the right totals; the
  cache's INFO record is printed (logging is configured by the job).
- `-q` / `-v` set the adapterkit loggers' level; under -q no bar is drawn; WANDB_MODE set by the user
  is kept.
"""
from __future__ import annotations

import importlib.machinery
import logging
import re
import sys
import types

import pytest
from accelerate.tracking import WandBTracker
from accelerate.utils import LoggerType
from PIL import Image

from adapterkit.train.config import ConfigError
from adapterkit.train.console import LOGGER, bar, configure_logging
from adapterkit.train.data.folder import DataConfig, scan_folder
from adapterkit.train.jobs.loop import make_accelerator
from adapterkit.train.jobs.lora import main
from adapterkit.train.jobs.trackers import start_trackers
from support.fixtures import alias
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")


@pytest.fixture(autouse=True)
def logger_level():
    """Each test leaves the adapterkit logger's level as it found it (-q would silence later tests)."""
    log = logging.getLogger(LOGGER)
    level = log.level
    yield
    log.setLevel(level)


class FakeWandb(types.ModuleType):
    """The parts of `wandb` accelerate's WandBTracker calls, recording each call (no network, no files)."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished, self.env = [], [], 0, {}
        self.config = types.SimpleNamespace(update=lambda values, **kw: self.stored.update(values))
        self.stored = {}
        fake = self

        class Image:
            def __init__(self, image):
                self.image = image

        class Run:
            def log(self, values, step=None, **kw):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        self.Image = Image
        self._run = Run()

    def init(self, **kwargs):
        import os
        self.inits.append(kwargs)
        self.env = {"WANDB_MODE": os.environ.get("WANDB_MODE")}
        return self._run


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)        # restored (or removed) after the test
    return fake


# --- the recipe key and accelerate -----------------------------------------------------------------

@pytest.mark.parametrize("trackers, expected", [("[tensorboard]", [LoggerType.TENSORBOARD]), ("[none]", [])])
def test_the_tracker_choice_reaches_accelerate(pipeline, images, tmp_path, trackers, expected):
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.trackers": trackers})
    accelerator = make_accelerator(tmp_path / "run", cfg, "lora")
    assert accelerator.log_with == expected


def test_wandb_reaches_accelerate_as_its_tracker_named_after_the_job(pipeline, images, tmp_path, fake_wandb):
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.trackers": "[tensorboard,wandb]"})
    accelerator = make_accelerator(tmp_path / "run", cfg, "controlnet")
    tb, wb = accelerator.log_with
    assert tb == LoggerType.TENSORBOARD
    assert isinstance(wb, WandBTracker) and wb.run_name == "controlnet"
    assert wb.init_kwargs == {"dir": str(tmp_path / "run"), "name": "run"}


def test_wandb_missing_fails_at_recipe_load(pipeline, images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # not importable, whatever is installed
    with pytest.raises(ConfigError, match=r"wandb is not installed: `pip install wandb`"):
        recipe(pipeline, images, tmp_path / "run", **{"output.trackers": "[wandb]"})


def test_wandb_missing_is_exit_2_before_anything_loads(pipeline, images, tmp_path, monkeypatch, capsys):
    import adapterkit.train.jobs.loop as loop
    from adapterkit.train.cli.main import main as cli

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"model: {{base: {pipeline}}}\ndata: {{root: {images}}}\n")
    assert cli(["train", "lora", str(cfg), f"output.dir={tmp_path / 'out'}", "output.trackers=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_none_stands_alone(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match="none means no tracker"):
        recipe(pipeline, images, tmp_path / "run", **{"output.trackers": "[tensorboard,none]"})


def test_a_users_wandb_mode_is_kept(pipeline, images, tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = recipe(pipeline, images, tmp_path / "run", **{"output.trackers": "[wandb]"})
    accelerator = make_accelerator(tmp_path / "run", cfg, "lora")
    line = start_trackers(accelerator, cfg.output.trackers, "lora", tmp_path / "run", {"a": 1})
    assert fake_wandb.env == {"WANDB_MODE": "disabled"} and "wandb disabled" in line
    assert fake_wandb.inits[0]["project"] == "lora" and fake_wandb.stored == {"a": 1}
    accelerator.end_training()
    assert fake_wandb.finished == 1


# --- one run: both trackers, grids, plan, bars ------------------------------------------------------

def test_a_run_logs_loss_and_grids_to_both_trackers_and_shows_plan_and_bars(pipeline, images, tmp_path,
                                                                           fake_wandb, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = recipe(pipeline, images, out, **{"output.trackers": "[tensorboard,wandb]", "train.steps": 3,
                                           "output.checkpoint_every": 2, "sample.every": 2,
                                           "sample.prompts": "a red shape", "sample.steps": 1,
                                           "sample.lora_scales": "0,1"})
    main(cfg)
    printed = capsys.readouterr()
    final = Image.open(out / "samples" / "final.png")

    # W&B: offline, under out/, named after the job and the folder; the recipe; loss + lr each step
    assert fake_wandb.env == {"WANDB_MODE": "offline"}
    assert fake_wandb.inits == [{"project": "lora", "dir": str(out), "name": "run"}]
    assert fake_wandb.stored["train.steps"] == 3 and fake_wandb.stored["lora.rank"] == 4
    losses = [(step, v) for step, v in fake_wandb.logged if "loss" in v]
    assert [s for s, _ in losses] == [1, 2, 3] and all({"loss", "lr"} <= v.keys() for _, v in losses)
    grids = [(step, v["samples"]) for step, v in fake_wandb.logged if "samples" in v]
    assert [s for s, _ in grids] == [2, 3]                       # step-000002.png, then final.png at 3
    assert grids[-1][1][0].image.size == final.size
    assert fake_wandb.finished == 1

    # TensorBoard: the same grids, as images at their steps
    tagged = []
    for path in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        if "samples" in acc.Tags()["images"]:
            tagged = acc.Images("samples")
    assert [e.step for e in tagged] == [2, 3]
    assert (tagged[-1].width, tagged[-1].height) == final.size

    # the plan, before the first step
    plan = printed.out[printed.out.index("plan: "):]
    assert plan.startswith("plan: 3 steps of 4 images (batch 4 x 1 accumulated x 1 process)"), plan
    assert f"at the end, in {out}/: lora.safetensors, lora.peft.safetensors, loss.png" in plan
    assert "checkpoints/step-N/ every 2 steps and at the end (the newest 3 kept)" in plan
    assert "samples/ (step-N.png every 2 steps, final.png at the end)" in plan
    assert f"tensorboard in {out / 'lora'}/" in plan and f"wandb offline in {out / 'wandb'}/" in plan
    assert "a stop (Ctrl-C, SIGTERM)" in plan and "the same command resumes" in plan

    # bars with the right totals: 16 pictures scanned and encoded, 4 captions, 1 x 2 sample cells
    err = printed.err
    for desc, total in (("scan", 16), ("cache images", 16), ("cache texts", 4), ("samples", 2), ("lora", 3)):
        assert re.search(rf"{desc}: 100%\|[^\r\n]*\| {total}/{total} ", err), (desc, err[-3000:])
    # the cache's INFO record: logging configured by the job
    cached = r"latent cache .*: 0 images and 0 captions cached, 16 \+ 4 encoded now"
    assert re.search(cached, err), err[-3000:]


# --- -q / -v and the bars -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, level", [([], logging.INFO), (["-q"], logging.WARNING),
                                         (["-v"], logging.DEBUG), (["after"], logging.WARNING)])
def test_quiet_and_verbose_set_the_loggers_level(tmp_path, monkeypatch, argv, level):
    import adapterkit.train.cli.main as cli_main
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("adapterkit.train.cli.canny",))   # fast to build
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "in" / "a.png")
    command = ["canny", str(tmp_path / "in"), str(tmp_path / "out")]
    args = command + ["-q"] if argv == ["after"] else argv + command
    assert cli_main.main(args) == 0
    assert logging.getLogger(LOGGER).level == level


def test_no_bars_under_quiet(images, capsys):
    configure_logging()
    scan_folder(DataConfig(root=str(images)))
    assert re.search(r"scan: 100%.*16/16", capsys.readouterr().err)
    configure_logging(logging.WARNING)
    scan_folder(DataConfig(root=str(images)))
    assert bar(total=3, desc="x").disable and capsys.readouterr().err == ""


def test_log_records_reach_stderr_in_our_format(capsys):
    configure_logging(logging.INFO)
    configure_logging()                                   # a second call adds no second handler
    log = logging.getLogger("adapterkit.train.data.cache")
    log.info("cached %d", 3)
    log.warning("odd %s", "thing")
    log.debug("hidden")
    assert capsys.readouterr().err == "cached 3\nwarning: odd thing\n"


def test_the_quality_run_has_one_bar_for_every_row(pipeline, capsys):
    from adapterkit.train.pipeline.base import load_base
    from adapterkit.train.world.quality import evaluate

    base = load_base(pipeline)
    capsys.readouterr()
    ev = evaluate(base, 2, steps=1, size=32, progress=True)
    err = capsys.readouterr().err
    assert len(ev.samples) == 1 and re.search(r"quality: 100%.*\| 2/2 ", err), err
    assert "sampling" not in err                          # generate counted on the run's bar
    evaluate(base, 2, steps=1, size=32)
    assert capsys.readouterr().err == ""


# --- the real wandb, where it is installed (offline: nothing reaches a network) ---------------------

def test_a_run_with_the_real_wandb_logs_every_loss_and_the_recipe_offline_under_out(pipeline, images,
                                                                                   tmp_path, monkeypatch):
    """wandb itself (skipped where it is not installed): an offline run under out/wandb/ whose event log
    holds each step's loss as loss.jsonl has it, and the recipe's keys. wandb 0.2x+ writes its event log
    from its own service (wandb-core), with no Python reader: the values are read as the JSON text that
    the log stores for each history item."""
    pytest.importorskip("wandb")
    import json

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = main(recipe(pipeline, images, tmp_path / "run", **{"output.trackers": "[wandb]", "train.steps": 3}))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (out / "wandb").iterdir())
    (events,) = runs[0].glob("run-*.wandb")
    log = events.read_bytes()
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 3
    for loss in losses:
        assert json.dumps(loss).encode() in log, (loss, len(log))
    assert b"lora.rank" in log and b"train.steps" in log
