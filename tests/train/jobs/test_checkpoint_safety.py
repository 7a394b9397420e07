"""Checkpoints and the run's own files as untrusted input, and under crashes.

1. Nothing in a checkpoint runs: a pickle whose unpickling calls os.system, planted under each file name
   of accelerate's old save_state layout and in every file of ours, is never executed (a marker file it
   would create stays absent) and the run says why it stops.
2. Damage is named (which file, which checkpoint) and passed over for the newest intact checkpoint;
   when none is intact, exit 2 with the reasons, never a traceback.
3. The job's own state round-trips exactly: AdamW (for-loop, foreach, fused) over fp32 masters, the LR
   schedule, the loss scaler, every generator; a LoRA with dropout (which draws from the global RNG)
   resumes to the uninterrupted run, and would not without the restored generators.
4. One run per output folder (the lock), loss.jsonl lines written whole and a torn last one left out.
5. kill -9 at random moments of the checkpoint writes: the resumed run equals the uninterrupted one.
"""
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import adapterkit.train.jobs.lora as lt
import adapterkit.train.jobs.progress as progress
from adapterkit.train.cli.main import main as cli
from adapterkit.train.config import load_config
from adapterkit.train.jobs.checkpoints import MARKER, file_sums
from adapterkit.train.jobs.lock import LOCK_FILE
from adapterkit.train.jobs.optimizer import lr_lambda
from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.progress import JsonlLog
from adapterkit.train.jobs.recipe import OptimConfig
from adapterkit.train.jobs.state import STATE_FILE, RandomStates, TrainingState
from support import REPO
from support.fixtures import alias

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")

# accelerate's save_state file names (custom objects, RNG per process, optimizer, schedulers, samplers,
# its GradScaler): the layout adapterkit checkpoints had before they were safetensors and JSON.
ACCELERATE_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                    "random_states_1.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin", "scaler.pt")


def recipe(pipeline: Path, images: Path, out: Path, **train) -> dict:
    return {"model": {"base": str(pipeline)},
            "data": {"root": str(images), "resolution": 32, "bucket_step": 8, "min_side": 32},
            "lora": {"rank": 2, "alpha": 2, "targets": "attn"},
            "optim": {"lr": 1e-2},
            "train": {"steps": 2, "batch_size": 4} | train,
            "output": {"dir": str(out), "checkpoint_every": 1, "log_every": 1}}


def train(cfg: dict, folder: Path, *overrides: str, capsys) -> tuple[int, str, str]:
    """`adapterkit train lora` in this process: (exit code, stdout, stderr)."""
    path = folder / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = cli(["train", "lora", str(path), *overrides])
    said = capsys.readouterr()
    return code, said.out, said.err


@pytest.fixture(scope="module")
def trained(pipeline, images, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step, to copy and spoil."""
    root = tmp_path_factory.mktemp("trained")
    return lt.main(load_config(recipe(pipeline, images, root / "run"), lt.LoraRecipe))


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to spoil (output.dir may change between a run and its resume)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def rows(out: Path) -> list[dict]:
    """loss.jsonl without its wall-clock seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "loss.jsonl").read_text().splitlines()]


def reseal(ckpt: Path) -> None:
    """Rewrite the marker's checksums for the folder as it is now (an attacker's consistent checkpoint)."""
    step = int(ckpt.name.removeprefix("step-"))
    (ckpt / MARKER).write_text(json.dumps({"step": step, "files": file_sums(ckpt)}))


class Payload:
    """Unpickling this runs `touch <path>`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


@pytest.fixture
def payload(tmp_path) -> tuple[bytes, Path]:
    """A live payload (shown to run when unpickled) and the file it creates, which must never appear."""
    probe = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.is_file(), "the payload does not run: the tests below would prove nothing"
    marker = tmp_path / "payload-ran"
    return pickle.dumps(Payload(marker)), marker


# --- 1. nothing in a checkpoint runs ---------------------------------------------------------------

OLD_LAYOUT = ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl")


def test_a_checkpoint_of_accelerates_old_layout_is_refused_unread(pipeline, images, run, payload, capsys):
    """What earlier versions wrote (the adapter through a save hook, the rest pickled by accelerate, a
    bare marker), each pickle carrying the payload."""
    data, marker = payload
    for ckpt in checkpoints(run):
        for ours in ckpt.iterdir():
            if ours.name.startswith(("optimizer.", "lr_schedule.", "random_states_")):
                ours.unlink()
        for name in OLD_LAYOUT:
            (ckpt / name).write_bytes(data)
        (ckpt / MARKER).write_text(f"step {int(ckpt.name.removeprefix('step-'))}\n")
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert not marker.exists()
    assert code == 2 and "Traceback" not in err
    for ckpt in checkpoints(run):
        assert f"{ckpt} holds pickled state ({', '.join(sorted(OLD_LAYOUT))})" in err
    assert "never unpickles a file (unpickling can run any code in it)" in err
    assert "delete the checkpoint, or checkpoints/, to train again from the start" in err


@pytest.mark.parametrize("name", ACCELERATE_NAMES)
def test_a_pickle_planted_under_any_of_accelerates_names_is_never_read(pipeline, images, run, payload, name,
                                                                       capsys):
    """Next to our own files and listed in the marker (as a tampered folder would have it)."""
    data, marker = payload
    for ckpt in checkpoints(run):
        (ckpt / name).write_bytes(data)
        reseal(ckpt)
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert not marker.exists()
    assert code == 2 and "Traceback" not in err
    assert err.count(f"holds pickled state ({name})") == 2 and "never unpickles" in err


NEW_LAYOUT = ("adapter_state.safetensors", "optimizer.safetensors", "optimizer.json", "lr_schedule.json",
              "random_states_0.safetensors", "random_states_0.json", "trainer_state.json", MARKER)


@pytest.mark.parametrize("name", NEW_LAYOUT + ("lora.safetensors", "lora.peft.safetensors"))
def test_a_payload_in_any_file_of_ours_never_runs(pipeline, images, run, payload, name, capsys):
    """In every checkpoint, with the marker's checksums made to fit (an attacker's whole folder): the
    state files are read as safetensors or JSON only and refused by name; the exported adapter files
    are not read on resume at all."""
    data, marker = payload
    assert {p.name for p in checkpoints(run)[-1].iterdir()} >= set(NEW_LAYOUT)
    for ckpt in checkpoints(run):
        (ckpt / name).write_bytes(data)
        if name != MARKER:
            reseal(ckpt)
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert not marker.exists()
    assert "Traceback" not in err
    if name.startswith("lora"):
        assert code == 0 and "resuming from" in out
        return
    assert code == 2 and "no checkpoint can be resumed" in err
    phrase = (f"{name} is not a readable safetensors file" if name.endswith(".safetensors") else
              f"{name} is not readable JSON" if name.endswith(".json") else
              "COMPLETE marker holds no checksums")
    assert phrase in err, err
    assert err.count(" is damaged: ") == 2                      # both checkpoints, each named


# --- 2. damage: named, passed over, or exit 2 ------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    path.write_bytes(bytes(data))


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def random_torch_state(path: Path) -> None:
    state = load_file(str(path))
    state["cpu"] = torch.randint(0, 256, state["cpu"].shape, dtype=torch.uint8, generator=torch.Generator())
    save_file(state, str(path))


def edit_json(change):
    def edit(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def torn_json(path: Path) -> None:
    path.write_text('{"step": 2, "con')


def wrong_shape(path: Path) -> None:
    state = load_file(str(path))
    state["0.exp_avg"] = torch.zeros(3)
    save_file(state, str(path))


# (file, how it is damaged, reseal the marker afterwards, a phrase of the message)
DAMAGE = [
    ("adapter_state.safetensors", truncate, False, "adapter_state.safetensors is truncated"),
    ("optimizer.safetensors", flip_a_byte, False, "optimizer.safetensors changed after it was written"),
    ("optimizer.safetensors", lambda p: p.write_bytes(b""), False, "optimizer.safetensors is empty"),
    ("optimizer.safetensors", wrong_shape, True, "holds 0.exp_avg as torch.float32 [3] "),
    ("optimizer.json", Path.unlink, True, "optimizer.json missing"),
    ("trainer_state.json", torn_json, True, "trainer_state.json is not readable"),
    ("trainer_state.json", edit_json(lambda s: s | {"step": 7}), True, "does not hold this checkpoint's"),
    ("random_states_0.safetensors", random_bytes, True, "random_states_0.safetensors is not a readable"),
    ("random_states_0.safetensors", random_torch_state, True, "no valid torch generator state under 'cpu'"),
    ("random_states_0.json", edit_json(lambda s: s | {"python": [3, [1] * 7, None]}), True,
     "random_states_0.json holds no valid python/numpy generator state"),
    ("random_states_0.json", random_bytes, True, "random_states_0.json is not readable JSON"),
    ("lr_schedule.json", edit_json(lambda s: s | {"last_epoch": "2"}), True, "lr_schedule.json does not fit"),
    (MARKER, lambda p: p.write_text("step 2\n"), False, "COMPLETE marker holds no checksums"),
]


@pytest.mark.parametrize("name, damage, seal, phrase", DAMAGE, ids=[f"{d[0]}-{i}" for i, d in
                                                                     enumerate(DAMAGE)])
def test_damage_in_every_checkpoint_stops_with_exit_2_naming_each(pipeline, images, run, name, damage, seal,
                                                                  phrase, capsys):
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    for ckpt in checkpoints(run):
        damage(ckpt / name)
        if seal:
            reseal(ckpt)
    spoiled = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "no checkpoint can be resumed" in err and "delete checkpoints/ to start over" in err
    for ckpt in checkpoints(run):
        assert f"{ckpt} is damaged: " in err
    assert err.count(phrase) == 2, err
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == spoiled != before


@pytest.mark.parametrize("name, damage, seal, phrase", [DAMAGE[0], DAMAGE[8]], ids=["truncated", "rng"])
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_repeats_it(pipeline, images, trained, run,
                                                                           name, damage, seal, phrase,
                                                                           capsys):
    newest = checkpoints(run)[-1]
    damage(newest / name)
    if seal:
        reseal(newest)
    code, out, err = train(recipe(pipeline, images, run), run.parent, capsys=capsys)
    assert code == 0, err
    assert f"skipping a checkpoint: {newest} is damaged: {name}" in out and phrase in out
    assert f"resuming from {checkpoints(run)[0]} (step 1)" in out
    # step 2 was trained again from step 1's state: the very checkpoint of the uninterrupted run
    again, straight = load_file(str(newest / STATE_FILE)), load_file(
        str(trained / "checkpoints" / newest.name / STATE_FILE))
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in again)
    assert rows(run) == rows(trained)


# --- 3. the job's own state round-trips exactly -----------------------------------------------------

ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def tiny_job(kernel: dict, masters: bool, seed: int = 0):
    """A few bf16 (with fp32 masters) or fp32 parameters, AdamW with `kernel`, a cosine LR schedule."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 3), (5,))]
    master = None
    if masters:
        for p in params:
            p.data = p.data.bfloat16()
        master = MasterWeights(params)
    trained = master.params if master else params
    cfg = OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=2)
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, 10))
    state = TrainingState(ONE_PROCESS, lambda: {f"p{i}": t.detach() for i, t in enumerate(trained)},
                          optimizer, schedule, master, LossScaler(growth_interval=2))
    return params, master, optimizer, schedule, state


def steps(params, master, optimizer, schedule, state, n: int) -> None:
    for _ in range(n):
        noise = torch.randn(())                                   # the global generator, as dropout would
        for p in params:
            p.grad = (p.detach().float() * noise).to(p.dtype)
        if master:
            master.grads_to_master()
        optimizer.step()
        if master:
            master.master_to_model()
        schedule.step()
        state.scaler.update(finite=True)
        draw()


@pytest.mark.parametrize("kernel", [{}, {"foreach": True}, {"fused": True}],
                         ids=["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("masters", [False, True], ids=["fp32", "bf16-masters"])
def test_optimizer_schedule_scaler_and_generators_round_trip_exactly(tmp_path, kernel, masters):
    job = tiny_job(kernel, masters)
    steps(*job, 3)
    job[-1].save(tmp_path, job[-1].random_states())
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".json", ".safetensors")]
    steps(*job, 4)                                                # the uninterrupted run
    resumed = tiny_job(kernel, masters, seed=1)                   # other weights, fresh state
    resumed[-1].apply(resumed[-1].read(tmp_path, processes=1))
    steps(*resumed, 4)
    for a, b in zip(job[0], resumed[0]):
        assert torch.equal(a, b)
    if masters:
        assert all(torch.equal(a, b) for a, b in zip(job[1].params, resumed[1].params))
    assert job[-1].scaler == resumed[-1].scaler != LossScaler(growth_interval=2)
    assert job[3].state_dict() == resumed[3].state_dict()
    a, b = job[2].state_dict(), resumed[2].state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def draw() -> tuple:
    """One draw from each global generator (torch, python, numpy)."""
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_restored_generators_continue_the_same_draws(tmp_path):
    seed_all(5)
    draw()
    job = tiny_job({}, False)
    job[-1].save(tmp_path, job[-1].random_states())
    straight = draw()
    seed_all(9)
    assert draw() != straight
    job[-1].apply(job[-1].read(tmp_path, processes=1))
    assert draw() == straight


def test_a_lora_with_dropout_resumes_exactly_because_the_generators_are_restored(pipeline, images, tmp_path,
                                                                                monkeypatch, capsys):
    """Dropout draws from the global generator: a resume that started it from the seed again would
    drop other activations (checked: with RandomStates.restore disabled, the result differs)."""
    cfg = lambda out: recipe(pipeline, images, out, steps=4) | {             # noqa: E731
        "lora": {"rank": 2, "alpha": 2, "targets": "attn", "dropout": 0.5},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1}}
    assert train(cfg(tmp_path / "straight"), tmp_path, capsys=capsys)[0] == 0
    real = lt.train_step

    def crash_at_step_3(*args, **kwargs):
        if args[8] == 2:                                 # steps 1-2 done, step 2's checkpoint written
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    for restore in (True, False):
        out = tmp_path / f"resumed-{restore}"

        with monkeypatch.context() as m:
            m.setattr(lt, "train_step", crash_at_step_3)
            assert train(cfg(out), tmp_path, capsys=capsys)[0] == 130      # the CLI: one line, exit 130
        with monkeypatch.context() as m:
            if not restore:
                m.setattr(RandomStates, "restore", lambda self: [])
            assert train(cfg(out), tmp_path, capsys=capsys)[0] == 0
        a, b = (load_file(str(o / "lora.safetensors")) for o in (tmp_path / "straight", out))
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == restore, f"restore={restore}"
        if restore:
            assert rows(out) == rows(tmp_path / "straight")


def test_a_payload_in_any_state_file_is_refused_by_its_name(tmp_path, payload):
    """All of the layout, the fp16 loss scaler's file too, read by TrainingState.read itself."""
    data, marker = payload
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    job = tiny_job({}, masters=True)
    job[-1].save(folder, job[-1].random_states())
    names = sorted(p.name for p in folder.iterdir())
    assert "loss_scaler.json" in names and len(names) == 7
    for name in names:
        saved = (folder / name).read_bytes()
        (folder / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"^{name} is not (a readable safetensors file|readable JSON)"):
            job[-1].read(folder, processes=1)
        (folder / name).write_bytes(saved)
    assert not marker.exists()
    job[-1].read(folder, processes=1)                           # intact again


def test_loss_scaler_state_is_checked():
    scaler = LossScaler()
    for bad in ({"scale": -1.0, "clean_steps": 0, "overflows": 0}, {"scale": float("inf"), "clean_steps": 0,
                "overflows": 0}, {"scale": 2.0, "clean_steps": True, "overflows": 0}, {"scale": 2.0},
                ["scale"], {"scale": 2.0, "clean_steps": 0, "overflows": 0, "__class__": "x"}):
        with pytest.raises(ValueError, match="loss scaler state"):
            scaler.load_state_dict(bad)
    assert scaler == LossScaler()


def test_two_processes_write_one_state_file_pair_each_and_resume(pipeline, images, tmp_path):
    """`accelerate launch` with two gloo processes: the main one writes the checkpoint with both
    processes' generators; a second launch resumes from it (every process reads and checks it)."""
    import socket
    out, cfg = tmp_path / "ddp", tmp_path / "lora.yaml"
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}

    def launch(steps: int) -> subprocess.CompletedProcess:
        cfg.write_text(yaml.safe_dump(recipe(pipeline, images, out, steps=steps, batch_size=2)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no", "--main_process_port", str(port),
                               "-m", "adapterkit", "train", "lora", str(cfg)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    first = launch(1)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-000001"
    listed = json.loads((ckpt / MARKER).read_text())["files"]
    assert {f"random_states_{p}.{ext}" for p in (0, 1) for ext in ("safetensors", "json")} <= listed.keys()
    assert not [p for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    second = launch(2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count(f"resuming from {ckpt} (step 1)") == 1          # said once, by the main one
    assert [r["step"] for r in rows(out)] == [1, 2] and not (out / LOCK_FILE).exists()


# --- 4. one run per output folder; loss.jsonl ------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from adapterkit.train.jobs.lock import take
take(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        pipeline, images, run, tmp_path, capsys):
    lock = run / LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        code, out, err = train(recipe(pipeline, images, run, steps=3), tmp_path, capsys=capsys)
        assert code == 2 and "Traceback" not in err
        assert f"{run} is in use by another run (pid {holder.pid} on " in err and "another output.dir" in err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before   # nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)                          # dies holding it: the file stays
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid
    code, out, err = train(recipe(pipeline, images, run, steps=3), tmp_path, capsys=capsys)
    assert code == 0, err
    assert f"was left by a run that is no longer running (pid {holder.pid} on " in out
    assert not lock.exists()                                        # given back at the end


def test_the_lock_is_held_while_training_and_given_back_after_an_error(pipeline, images, tmp_path,
                                                                       monkeypatch, capsys):
    out, seen = tmp_path / "run", []
    real = lt.train_step

    def look_then_crash(*args, **kwargs):
        seen.append(json.loads((out / LOCK_FILE).read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(lt, "train_step", look_then_crash)
    assert train(recipe(pipeline, images, out), tmp_path, capsys=capsys)[0] == 130   # one line, exit 130
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] and seen[0]["started"]
    assert not (out / LOCK_FILE).exists()
    monkeypatch.setattr(lt, "train_step", real)
    assert train(recipe(pipeline, images, out), tmp_path, capsys=capsys)[0] == 0     # not held by a ghost


def test_a_torn_last_line_of_loss_jsonl_is_left_out_on_resume(pipeline, images, run, capsys):
    with open(run / "loss.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')                        # a crash in the middle of a write
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert code == 0, err
    assert "loss.jsonl ends in a torn line" in out
    assert [r["step"] for r in rows(run)] == [1, 2, 3]


def test_a_broken_line_inside_loss_jsonl_is_named(pipeline, images, run, capsys):
    lines = (run / "loss.jsonl").read_text().splitlines()
    (run / "loss.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    code, out, err = train(recipe(pipeline, images, run, steps=3), run.parent, capsys=capsys)
    assert code == 2 and "loss.jsonl line 2 is not a log row" in err and "Traceback" not in err


def test_each_log_row_is_one_write_of_its_whole_line(tmp_path, monkeypatch):
    writes, real = [], os.write
    monkeypatch.setattr(progress.os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    log = JsonlLog(tmp_path / "log.jsonl", 0, active=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1 / step})
    assert [json.loads(w)["step"] for w in writes] == [1, 2, 3] and all(w.endswith(b"\n") for w in writes)
    assert JsonlLog(tmp_path / "log.jsonl", 2, active=True).rows == [{"step": 1, "loss": 1.0},
                                                                      {"step": 2, "loss": 0.5}]


# --- 5. kill -9 during checkpoint writes ------------------------------------------------------------

# Imports the job once, then runs it in forked processes, each a fresh run of the recipe in argv[1] into
# its own folder (the latent cache copied from the first). While a checkpoint is written, each counts the
# lines it executes in the checkpoint, state and adapter-file code. The first fork runs to the end (the
# uninterrupted run, into "straight") and lists those lines; then, for a random line in each of argv[3]
# of the functions seen (drawn with seed argv[2]), a fork runs into "killed-<n>" and SIGKILLs itself on
# reaching line n. Writes {"lines": [function of each line], "killed": {n: died of SIGKILL}} to argv[4].
KILLER = """
import json, os, random, shutil, signal, sys
from pathlib import Path
import torch
import adapterkit.train.jobs.loop as loop
import adapterkit.train.jobs.lora as lt
from adapterkit.train.config import load_config
torch.set_num_threads(1)                                    # as the tests' conftest: resumes run there
recipe, root = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[1]).parent
TARGETS = tuple(os.sep + p for p in ("jobs/checkpoints.py", "jobs/state.py", "jobs/lora.py",
                                      "adapters/lora_files.py"))
save_checkpoint = loop.save_checkpoint

def run(out, kill_at):
    lines = []
    def local(frame, event, arg):
        if event == "line":
            lines.append(frame.f_code.co_name)
            if len(lines) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local
    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.endswith(TARGETS) else None
    def traced(*args, **kwargs):
        sys.settrace(tracer)
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            sys.settrace(None)
    loop.save_checkpoint = traced
    lt.main(load_config(recipe | {"output": recipe["output"] | {"dir": str(root / out)}}, lt.LoraRecipe))
    return lines

def forked(out, kill_at):
    if (root / "straight" / "cache").is_dir():               # the latents are the same: encode them once
        shutil.copytree(root / "straight" / "cache", root / out / "cache")
    pid = os.fork()
    if pid == 0:
        lines = run(out, kill_at)
        (root / "lines.json").write_text(json.dumps(lines))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

assert not forked("straight", 0)
lines = json.loads((root / "lines.json").read_text())
by_function = {}
for n, name in enumerate(lines, start=1):
    by_function.setdefault(name, []).append(n)
pick = random.Random(int(sys.argv[2]))
moments = sorted(pick.sample([pick.choice(ns) for ns in by_function.values()],
                             min(int(sys.argv[3]), len(by_function))))
killed = {n: forked(f"killed-{n}", n) for n in moments}
Path(sys.argv[4]).write_text(json.dumps({"lines": lines, "killed": killed}))
"""


@pytest.mark.parametrize("moments", [5, pytest.param(10, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_of_checkpoint_writes_resumes_to_the_uninterrupted_run(pipeline, images,
                                                                                         tmp_path, moments,
                                                                                         capsys):
    """Each kill in another of the functions a checkpoint write runs, at a random line of it (5 in the
    default run, 10 with -m slow; KILL9_SEED=<n> draws other moments)."""
    cfg = recipe(pipeline, images, tmp_path / "straight", steps=2) | {
        "output": {"dir": str(tmp_path / "straight"), "checkpoint_every": 1, "log_every": 1,
                   "keep_checkpoints": 1}}
    (tmp_path / "killer.py").write_text(KILLER)
    (tmp_path / "recipe.json").write_text(json.dumps(cfg))
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    seed = os.environ.get("KILL9_SEED", "19")
    done = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "recipe.json"), seed,
                           str(moments), str(tmp_path / "report.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    lines, killed = report["lines"], {int(n): k for n, k in report["killed"].items()}
    assert {"write_checkpoint", "save", "file_sums", "sha256", "save_lora", "optimizer_files"} <= set(lines)
    assert len(killed) == moments and all(killed.values()), killed             # each died of its SIGKILL
    straight = tmp_path / "straight"
    for n in killed:
        out = tmp_path / f"killed-{n}"
        where = (n, lines[n - 1])
        code, said, err = train(cfg | {"output": cfg["output"] | {"dir": str(out)}}, tmp_path, capsys=capsys)
        assert code == 0, (where, err[-2000:])
        a, b = (load_file(str(o / "lora.safetensors")) for o in (straight, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), where
        assert rows(out) == rows(straight), where
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert left[-1] == "step-000002" and not [n for n in left if n.startswith(".tmp")], (where, left)
        assert not (out / LOCK_FILE).exists()
