"""Training on an fp16 base: the loss is scaled for backward (train.precision.LossScaler), so small
gradients do not underflow to zero; an overflowing step is redone at half the scale; the scaler's
state resumes exactly; bf16 and fp32 runs are untouched (their exact tests live in
test_lora_train.py and test_controlnet_train.py)."""
import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import adapterkit.train.jobs.controlnet as ct
import adapterkit.train.jobs.loop as loop
import adapterkit.train.jobs.lora as lt
import adapterkit.train.jobs.optimizer as optim
from adapterkit.train.config import load_config
from adapterkit.train.jobs.controlnet import ControlNetRecipe
from adapterkit.train.jobs.guards import TrainingDiverged
from adapterkit.train.jobs.lora import LoraRecipe
from adapterkit.train.jobs.precision import LossScaler
from adapterkit.unet import PRESETS
from support.pipelines import build_tiny_pipeline, build_tiny_pipeline_8x_vae

COLORS = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (230, 210, 40)]
NAMES = ["red", "blue", "green", "yellow"]


def shapes(root: Path, n: int, size=(64, 64)) -> Path:
    """`n` captioned pictures of coloured shapes on light or dark ground."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (240, 240, 240) if i % 2 else (20, 20, 20))
        d = ImageDraw.Draw(img)
        x = 8 + 3 * i
        (d.ellipse if i % 3 else d.rectangle)((x, 12, x + 30, 42), fill=COLORS[i % 4], outline=(0, 0, 0),
                                              width=3)
        img.save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a {NAMES[i % 4]} shape")
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("base"), PRESETS["tiny"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return shapes(tmp_path_factory.mktemp("images"), 16)


def recipe(pipeline, images, out, **overrides) -> LoraRecipe:
    """test_lora_train's recipe on an fp16 base, two micro-batches a step: unscaled, the mid block's
    cross-attention LoRA gets exactly zero gradient at step 2 (the defect this file guards)."""
    cfg = {
        "model": {"base": str(pipeline), "dtype": "fp16"},
        "data": {"root": str(images), "resolution": 32, "bucket_step": 8, "min_side": 32, "trigger": "sks"},
        "lora": {"rank": 4, "alpha": 4, "targets": "attn"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 4, "grad_accum": 2, "min_snr_gamma": 5.0},
        "output": {"dir": str(out), "checkpoint_every": 2, "log_every": 1},
    }
    return load_config(cfg, LoraRecipe, [f"{k}={v}" for k, v in overrides.items()])


def rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "loss.jsonl").read_text().splitlines()]


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def adapter(out: Path, step: int = 4) -> dict:
    return load_file(str(checkpoint(out, step) / "adapter_state.safetensors"))


def scaler_state(out: Path, step: int = 4) -> dict:
    """The LossScaler in a checkpoint (its state_dict as JSON)."""
    return json.loads((checkpoint(out, step) / "loss_scaler.json").read_text())


class Grads:
    """Records the gradients `optimizer_step` clips (the unscaled fp32 masters') at each applied step."""

    def __init__(self, monkeypatch):
        self.steps = []
        real = optim.clip

        def clip(accelerator, params, max_norm):
            params = list(params)
            self.steps.append([p.grad.detach().clone() for p in params])
            return real(accelerator, params, max_norm)

        monkeypatch.setattr(optim, "clip", clip)

    def flat(self, step: int) -> torch.Tensor:
        return torch.cat([g.flatten() for g in self.steps[step]])


@pytest.fixture(scope="module")
def straight(pipeline, images, tmp_path_factory):
    """An uninterrupted 4-step fp16 run, and the master gradients of its steps."""
    with pytest.MonkeyPatch.context() as mp:
        grads = Grads(mp)
        out = lt.main(recipe(pipeline, images, tmp_path_factory.mktemp("straight")))
    return out, grads


def test_unscaled_fp16_gradients_underflow_and_the_check_names_the_cause(pipeline, images, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(loop, "use_loss_scaling", lambda *args: None)    # the old behaviour
    with pytest.raises(RuntimeError, match=r"got no gradient at step 2.*lora_A.*fp16 underflow"):
        lt.main(recipe(pipeline, images, tmp_path / "run", **{"train.steps": 2}))


def test_an_fp16_base_trains_and_its_masters_get_the_fp32_gradient(pipeline, images, tmp_path, monkeypatch,
                                                                   straight):
    out, fp16 = straight
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert all(0 < r["loss"] < 10 for r in rows(out))
    before, after = adapter(out, 2), adapter(out, 4)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert all(not torch.equal(before[k], after[k]) for k in after)          # every tensor moves
    assert scaler_state(out) == {"scale": 2.0 ** 16, "clean_steps": 4, "overflows": 0}

    reference = Grads(monkeypatch)                      # the same steps in fp32, nothing scaled
    lt.main(recipe(pipeline, images, tmp_path / "fp32", **{"model.dtype": "fp32", "train.steps": 2}))
    for step in (0, 1):                                 # step 1: the B's; step 2: the A's too
        assert len(fp16.steps[step]) == len(reference.steps[step])
        a, b = fp16.flat(step), reference.flat(step)
        assert (a - b).norm() / b.norm() < 2e-2, step
    # The tensors that got exactly zero unscaled (all of them in the mid block's attn2.to_k.lora_A).
    assert all(g.any() for g in fp16.steps[1])


def test_an_overflowing_step_is_redone_at_half_the_scale(pipeline, images, tmp_path, monkeypatch, straight):
    """An inf in one gradient of step 2's first attempt: nothing but the scale changes, step 2 is run
    again (same batch) and training continues to what the clean run trains."""
    real_step, calls = lt.train_step, []

    def inf_in_step_2(cfg, accelerator, model, base, *args, **kwargs):
        loss = real_step(cfg, accelerator, model, base, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            next(p for p in base.unet.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss

    real_opt, seen = loop.optimizer_step, []

    def watched(accelerator, optimizer, lr_schedule, params, master, max_norm, scaler):
        weights = [m.detach().clone() for m in master.params]
        scale, epoch = scaler.scale, lr_schedule.last_epoch
        applied = real_opt(accelerator, optimizer, lr_schedule, params, master, max_norm, scaler)
        unchanged = all(torch.equal(w, m) for w, m in zip(weights, master.params))
        seen.append((applied, scale, scaler.scale, unchanged, lr_schedule.last_epoch == epoch,
                     all(p.grad is None for p in params + master.params)))
        return applied

    monkeypatch.setattr(lt, "train_step", inf_in_step_2)
    monkeypatch.setattr(loop, "optimizer_step", watched)
    grads = Grads(monkeypatch)
    out = lt.main(recipe(pipeline, images, tmp_path / "run"))

    assert [s[0] for s in seen] == [True, False, True, True, True]
    _, scale, backed_off, unchanged, same_lr, cleared = seen[1]
    assert (scale, backed_off) == (2.0 ** 16, 2.0 ** 15)
    assert unchanged and same_lr and cleared
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert scaler_state(out) == {"scale": 2.0 ** 15, "clean_steps": 3, "overflows": 1}
    # The redone step 2 gets the clean run's gradient (at half the scale: only the rounding of
    # activation gradients in fp16's subnormal range differs), after the identical step 1.
    clean = straight[1]
    assert torch.equal(grads.flat(0), clean.flat(0))
    a, b = grads.flat(1), clean.flat(1)
    assert (a - b).norm() / b.norm() < 1e-2
    assert rows(out)[1]["loss"] == rows(straight[0])[1]["loss"]                # the same batch and noise


def test_resume_equals_the_uninterrupted_run_with_the_scaler_state(pipeline, images, tmp_path, monkeypatch):
    """The scale grows every step here (growth_interval=1; it overflows and backs off on the way), so
    a resume that restarted the scaler would train differently."""
    monkeypatch.setattr(optim, "LossScaler", functools.partial(LossScaler, growth_interval=1))
    over = {"train.grad_accum": 1}
    straight = lt.main(recipe(pipeline, images, tmp_path / "straight", **over))
    real_step = lt.train_step

    def crash_at_step_3(*args, **kwargs):
        if args[-2] == 2:                       # (the step index) steps 1-2 done, step 2's checkpoint written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(lt, "train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        lt.main(recipe(pipeline, images, tmp_path / "resumed", **over))
    assert scaler_state(tmp_path / "resumed", 2) == scaler_state(straight, 2) != {
        "scale": 2.0 ** 16, "clean_steps": 0, "overflows": 0}
    monkeypatch.setattr(lt, "train_step", real_step)
    resumed = lt.main(recipe(pipeline, images, tmp_path / "resumed", **over))

    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert scaler_state(resumed) == scaler_state(straight)
    assert [r["step"] for r in rows(resumed)] == [1, 2, 3, 4]
    for x, y in zip(rows(straight), rows(resumed)):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)


def test_the_loss_scaler_grows_backs_off_and_round_trips():
    s = LossScaler(scale=8.0, growth_interval=3)
    assert s.scale_loss(torch.tensor(1.5)).item() == 12.0
    for _ in range(2):
        s.update(True)
    assert s.scale == 8.0 and s.clean_steps == 2
    s.update(True)                                          # the third clean step: grow
    assert s.scale == 16.0 and s.clean_steps == 0
    s.update(True)
    s.update(False)                                         # an overflow: back off, count again
    assert (s.scale, s.clean_steps, s.overflows) == (8.0, 0, 1)

    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p.grad, q.grad = torch.tensor([8.0, -16.0, 0.0]), torch.tensor([4.0, 2.0])
    assert s.unscale_([p, q]) and p.grad.tolist() == [1.0, -2.0, 0.0] and q.grad.tolist() == [0.5, 0.25]
    q.grad = torch.tensor([1.0, float("nan")])
    assert not s.unscale_([p, q])
    h = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))            # fp16 model gradients too
    h.grad = torch.tensor([float("-inf"), 1.0], dtype=torch.float16)
    assert not s.unscale_([h])
    assert s.unscale_([torch.nn.Parameter(torch.zeros(1))])         # no gradient at all: nothing to say

    restored = LossScaler(growth_interval=3)
    restored.load_state_dict(s.state_dict())
    assert restored == s
    s.scale = 0.5
    assert s.too_small and not restored.too_small
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)


def test_only_an_fp16_base_gets_a_scaler_and_the_others_backpropagate_the_loss_itself(tmp_path):
    loss = torch.tensor(0.25)
    for dtype in (torch.float32, torch.bfloat16):
        assert optim.use_loss_scaling(dtype) is None
        assert optim.scale_loss(None, loss) is loss                        # bit for bit the old step
    scaler = optim.use_loss_scaling(torch.float16)
    assert isinstance(scaler, LossScaler)
    assert optim.scale_loss(scaler, loss).item() == 0.25 * 2 ** 16


def test_overflowing_even_unscaled_stops_as_diverged(pipeline, images, tmp_path, monkeypatch):
    real_step = lt.train_step

    def always_inf(cfg, accelerator, model, base, *args, **kwargs):
        loss = real_step(cfg, accelerator, model, base, *args, **kwargs)
        next(p for p in base.unet.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(lt, "train_step", always_inf)
    monkeypatch.setattr(optim, "LossScaler", functools.partial(LossScaler, scale=4.0))
    with pytest.raises(TrainingDiverged, match=r"step 1 overflow .*backed off to 0\.5.*bf16"):
        lt.main(recipe(pipeline, images, tmp_path / "run", **{"train.grad_accum": 1}))
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_scaled_fp16_step(pipeline, images, tmp_path, capsys):
    """The scaled loss's gradient flows into the captured backward (train.graphs): graphed and eager fp16
    steps train the same, over two micro-batches a step (the scaled gradients accumulate). eps = 1 keeps
    AdamW's step ~ lr * gradient (no sign-like steps from noise)."""
    over = {"train.steps": 4, "train.grad_accum": 2, "optim.lr": 1.0, "optim.eps": 1.0,
            "optim.weight_decay": 0.0, "output.checkpoint_every": 0}
    graphed = lt.main(recipe(pipeline, images, tmp_path / "graphs", **over, **{"train.cuda_graphs": True}))
    assert "CUDA graphs: on" in capsys.readouterr().out
    eager = lt.main(recipe(pipeline, images, tmp_path / "eager", **over, **{"train.cuda_graphs": False}))
    assert [r["loss"] for r in rows(graphed)] == pytest.approx([r["loss"] for r in rows(eager)], rel=1e-3)
    assert scaler_state(graphed) == scaler_state(eager)
    a, b = adapter(graphed), adapter(eager)
    delta = lambda d: torch.cat([v.flatten() for k, v in sorted(d.items()) if "lora_B" in k])  # noqa: E731
    assert (delta(a) - delta(b)).norm() / delta(b).norm() <= 2e-2       # B starts at 0: B is what trained


# --- the ControlNet job -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cn_pipeline(tmp_path_factory):
    """test_controlnet_train's base: the tiny pipeline with an 8x VAE (the hint encoder needs it)."""
    return build_tiny_pipeline_8x_vae(tmp_path_factory.mktemp("cn_base"))


def test_an_fp16_controlnet_trains_three_steps(cn_pipeline, tmp_path):
    images = shapes(tmp_path / "images", 8)
    cfg = load_config({
        "model": {"base": str(cn_pipeline), "dtype": "fp16"},
        "data": {"root": str(images), "resolution": 64, "bucket_step": 16, "min_side": 32},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run"), "checkpoint_every": 0, "log_every": 1},
    }, ControlNetRecipe)
    out = ct.main(cfg)            # its gradient checks of steps 1-3 pass on the scaled gradients
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    trained = load_file(str(checkpoint(out, 3) / "adapter_state.safetensors"))
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert trained["controlnet_mid_block.weight"].any()
    assert scaler_state(out, 3)["scale"] <= 2.0 ** 16
