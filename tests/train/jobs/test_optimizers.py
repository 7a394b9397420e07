"""Optimizers and LR schedules of `optim:`: schedules against transformers' get_scheduler, each optimizer
is the one named and trains differently, optional ones name their extra when missing, and every
optimizer's state (Adafactor's factored moments, Prodigy's estimate) resumes exactly (no pickle)."""
import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

import adapterkit.train.jobs.lora as lt
import adapterkit.train.jobs.optimizer as opt
from adapterkit.train.config import ConfigError, load_config
from adapterkit.train.jobs.lora import main
from adapterkit.train.jobs.optimizer import lr_lambda, make_optimizer
from adapterkit.train.jobs.recipe import OptimConfig
from adapterkit.train.jobs.state import TrainingState
from support.fixtures import alias
from support.recipes import crash_then_resume, last_adapter_state
from support.recipes import lora_recipe as recipe

pipeline = alias("pipeline", "lora_pipeline")
images = alias("images", "lora_images")
ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def factors(cfg: OptimConfig, total: int) -> list[float]:
    f = lr_lambda(cfg, total)
    return [f(s) for s in range(total + 1)]           # the steps a run of `total` steps takes, and one


def transformers_factors(name: str, cfg: OptimConfig, total: int, **kw) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=cfg.lr)
    s = get_scheduler(name, o, num_warmup_steps=cfg.warmup_steps, num_training_steps=total,
                      scheduler_specific_kwargs=kw)
    out = []
    for _ in range(total + 1):
        out.append(o.param_groups[0]["lr"] / cfg.lr)
        o.step()
        s.step()
    return out


SCHEDULES = [
    ("constant", {}, {}),
    ("constant_with_warmup", {}, {}),
    ("cosine", {}, {}),
    ("linear", {}, {}),
    ("cosine_with_restarts", {"restarts": 3}, {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-4}, {"power": 2.0, "lr_end": 1e-4}),
]


@pytest.mark.parametrize("name,ours,theirs", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedules_are_transformers_after_the_warmup(name, ours, theirs, warmup):
    cfg = OptimConfig(lr=1e-2, schedule=name, warmup_steps=warmup, **ours)
    total = 40
    got, want = factors(cfg, total), transformers_factors(name, cfg, total, **theirs)
    assert got[warmup:] == pytest.approx(want[warmup:], abs=1e-12)
    assert got[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])   # ours: never 0
    if name not in ("constant", "constant_with_warmup"):
        assert min(got[warmup:]) < 0.5                      # the schedule is not a constant in disguise


def test_restarts_restart():
    f = factors(OptimConfig(schedule="cosine_with_restarts", restarts=2), 20)
    assert f[0] == 1.0 and f[10] == 1.0 and f[9] < 0.05 and f[20] == 0.0


def tiny_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((6, 5), (3, 4, 2), (5,))]


def train(params, optimizer, schedule, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


def installed(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


OPTIMIZERS = ["adamw", "adafactor",
              pytest.param("prodigy", marks=pytest.mark.skipif(not installed("prodigyopt"),
                                                               reason="prodigyopt not installed"))]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_the_one_named_and_trains_its_own_way(name):
    cfg = OptimConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2, schedule="cosine")
    params = tiny_params()
    optimizer, schedule = make_optimizer(cfg, params, 10)
    cls = {"adamw": "AdamW", "adafactor": "Adafactor", "prodigy": "Prodigy"}[name]
    assert type(optimizer).__name__ == cls
    train(params, optimizer, schedule, 5)
    reference = tiny_params()
    ref_opt = torch.optim.AdamW(reference, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train(reference, ref_opt, torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda(cfg, 10)), 5)
    same = all(torch.equal(a, b) for a, b in zip(params, reference))
    assert same == (name == "adamw")                     # today's AdamW on the CPU, bit for bit
    if name == "adafactor":
        assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= optimizer.state[params[0]].keys()   # factored
    if name == "prodigy":
        assert optimizer.param_groups[0]["d"] > 1e-6      # the step size moved from d0


@pytest.mark.parametrize("name,module,extra", [("adamw8bit", "bitsandbytes.optim", "bnb"),
                                               ("prodigy", "prodigyopt", "prodigy")])
def test_a_missing_optional_optimizer_names_its_extra(name, module, extra, monkeypatch):
    real = importlib.import_module

    def absent(mod, *a, **k):
        if mod.split(".")[0] == module.split(".")[0]:
            raise ModuleNotFoundError(f"No module named '{mod}'")
        return real(mod, *a, **k)

    monkeypatch.setattr(opt.importlib, "import_module", absent)
    with pytest.raises(ImportError, match=rf"optim\.optimizer={name} needs the {module.split('.')[0]}.*"
                                          rf"adapterkit\[{extra}\]"):
        make_optimizer(OptimConfig(optimizer=name), tiny_params(), 10)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizers_state_resumes_exactly(name, tmp_path):
    cfg = OptimConfig(optimizer=name, lr=1.0 if name == "prodigy" else 1e-2, schedule="cosine_with_restarts",
                      restarts=2, warmup_steps=2)

    def job(seed):
        params = tiny_params(seed)
        optimizer, schedule = make_optimizer(cfg, params, 12)
        state = TrainingState(ONE_PROCESS, lambda: {f"p{i}": p.detach() for i, p in enumerate(params)},
                              optimizer, schedule)
        return params, optimizer, schedule, state

    straight = job(0)
    train(*straight[:3], 5, seed=1)
    straight[3].save(tmp_path, straight[3].random_states())
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".json", ".safetensors")]
    train(*straight[:3], 6, seed=2)
    resumed = job(7)
    resumed[3].apply(resumed[3].read(tmp_path, processes=1))
    train(*resumed[:3], 6, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(straight[0], resumed[0]))
    a, b = straight[1].state_dict(), resumed[1].state_dict()
    assert json.dumps(a["param_groups"], default=str) == json.dumps(b["param_groups"], default=str)


def test_adafactor_state_of_another_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from adapterkit.train.jobs.state import OPTIMIZER_TENSORS, StateFileError
    params = tiny_params()
    optimizer, schedule = make_optimizer(OptimConfig(optimizer="adafactor"), params, 10)
    state = TrainingState(ONE_PROCESS, lambda: {f"p{i}": p.detach() for i, p in enumerate(params)},
                          optimizer, schedule)
    train(params, optimizer, schedule, 2)
    state.save(tmp_path, state.random_states())
    tensors = load_file(str(tmp_path / OPTIMIZER_TENSORS))
    tensors["0.exp_avg_sq_row"] = torch.zeros(5)            # the parameter is 6 x 5: rows are 6
    save_file(tensors, str(tmp_path / OPTIMIZER_TENSORS))
    with pytest.raises(StateFileError, match=r"0\.exp_avg_sq_row as torch\.float32 \[5\]"):
        state.read(tmp_path, processes=1)


def test_optimizer_options_are_checked_in_the_recipe(pipeline, images, tmp_path):
    with pytest.raises(ConfigError, match=r"optim: betas do not apply to optimizer adafactor"):
        recipe(pipeline, images, tmp_path, **{"optim.optimizer": "adafactor", "optim.betas": "[0.8, 0.99]"})
    with pytest.raises(ConfigError, match=r"lr_end .* must not exceed lr"):
        recipe(pipeline, images, tmp_path, **{"optim.schedule": "polynomial", "optim.lr_end": 1.0})
    with pytest.raises(ConfigError, match=r"optim\.optimizer"):
        load_config({"model": {"base": "x"}, "data": {"root": "y"}, "optim": {"optimizer": "sgd"}},
                    type(recipe(pipeline, images, tmp_path)))


def test_a_lora_trained_with_adafactor_resumes_to_the_uninterrupted_run(pipeline, images, tmp_path,
                                                                        monkeypatch):
    options = {"optim.optimizer": "adafactor", "optim.schedule": "cosine_with_restarts",
               "optim.restarts": 2, "optim.warmup_steps": 1}
    straight = main(recipe(pipeline, images, tmp_path / "straight", **options))
    resumed = crash_then_resume(
        monkeypatch, lt, lambda: lt.main(recipe(pipeline, images, tmp_path / "resumed", **options)),
        at_call=4)
    a, b = last_adapter_state(straight), last_adapter_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda out: [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(straight)] == [r["loss"] for r in rows(resumed)]


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda_and_8bit_adamw_resumes_exactly(tmp_path):
    params = [torch.nn.Parameter(torch.randn(64, 128, device="cuda")),
              torch.nn.Parameter(torch.randn(8, device="cuda"))]
    optimizer, _ = make_optimizer(OptimConfig(), params, 10)
    assert optimizer.defaults["fused"] is True
    pytest.importorskip("bitsandbytes")
    cfg = OptimConfig(optimizer="adamw8bit", lr=1e-2)

    def job(seed):
        g = torch.Generator().manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(shape, generator=g).cuda()) for shape in ((64, 128), (8,))]
        o, s = make_optimizer(cfg, ps, 10)
        return ps, o, s, TrainingState(ONE_PROCESS, lambda: {f"p{i}": p.detach() for i, p in enumerate(ps)},
                                       o, s)

    def train_cuda(ps, o, s, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).cuda()
            o.step()
            s.step()
            o.zero_grad()

    straight = job(0)
    train_cuda(*straight[:3], 3, 1)
    straight[3].save(tmp_path, straight[3].random_states())
    train_cuda(*straight[:3], 3, 2)
    resumed = job(5)
    resumed[3].apply(resumed[3].read(tmp_path, processes=1))
    train_cuda(*resumed[:3], 3, 2)
    assert type(straight[1]).__name__ == "AdamW8bit"
    assert straight[1].state[straight[0][0]]["state1"].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(straight[0], resumed[0]))
