"""train.graphs: when a step is replayed from CUDA graphs, and that it computes the eager step.

CPU: the switch's conditions and its plain path. GPU (marked): a LoRA'd U-Net's step graphed vs eager,
the weights an optimizer updates between replays, the shape limit. The training jobs' own graphed
runs are tested in test_lora_train.py and test_controlnet_train.py.
"""
from __future__ import annotations

import pytest
import torch

from adapterkit.train.jobs.checkpoints import MUTABLE
from adapterkit.train.jobs.graphs import GraphedStep
from adapterkit.train.jobs.recipe import LoopConfig
from adapterkit.train.pipeline.graphed import channels_last
from adapterkit.unet import PRESETS, UNet

CPU = torch.device("cpu")


def test_graphs_are_on_by_default_and_may_change_on_resume():
    assert LoopConfig().cuda_graphs is True
    assert "train.cuda_graphs" in MUTABLE


@pytest.mark.parametrize("wanted, device, processes, checkpointing, reason", [
    (False, "cuda", 1, False, "train.cuda_graphs is off"),
    (True, "cpu", 1, False, "the device is cpu, not CUDA"),
    (True, "cuda", 2, False, "2 processes"),
    (True, "cuda", 1, True, "gradient checkpointing"),
])
def test_graphs_say_why_they_are_off(wanted, device, processes, checkpointing, reason):
    step = GraphedStep.for_training(torch.nn.Identity(), wanted, torch.device(device), processes,
                                    checkpointing)
    assert not step.enabled and reason in step.why_not and reason in step.describe()


def test_a_disabled_step_is_the_plain_call():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    step = GraphedStep.for_training(model, True, CPU, 1, False)
    x = torch.randn(4, 3)
    assert torch.equal(step(x), model(x)) and not step.graphs


def test_captures_copies_per_shape_and_stops_at_the_limit(monkeypatch, capsys):
    """The wrapper's bookkeeping, with the capture replaced by a recorder (CPU): one capture per input
    shape, on copies of the inputs (a replay copies each batch into the captured tensors: they must
    not be the caller's), then plain calls past `max_graphs`, said once."""
    captured = []

    pools = []

    warmups = []

    def fake_capture(module, args, num_warmup_iters=3, allow_unused_input=False, pool=None):
        captured.append(args)
        pools.append(pool)
        warmups.append(num_warmup_iters)
        return module
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    model = torch.nn.Linear(3, 2)
    step = GraphedStep(model, enabled=True, max_graphs=2)
    a, b, c = torch.randn(4, 3), torch.randn(5, 3), torch.randn(6, 3)
    for x in (a, a.clone(), b, c, c):
        assert torch.equal(step(x), model(x))
    assert len(captured) == 2 and len(step.graphs) == 2
    assert pools[0] is not None and pools[0] is pools[1]                      # one pool for all shapes
    assert captured[0][0] is not a and torch.equal(captured[0][0], a)          # a copy of the input
    assert warmups == [3, 1]                        # lazy initialisation once, then a shape's workspaces
    assert "more than 2 input shapes" in step.why_not
    out = capsys.readouterr().out
    assert out.count("more than 2 input shapes") == 1
    assert out.count("CUDA graphs: captured input shape") == 2 and len(step.capture_seconds) == 2


def test_channels_last_leaves_cpu_models_alone():
    model = UNet(PRESETS["tiny"])
    channels_last(model, CPU)
    assert model.conv_in.weight.is_contiguous()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _lora_unet(dtype=torch.float32):
    from adapterkit.adapters.lora import LoraSpec, add_lora
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"]).cuda().to(dtype).requires_grad_(False)
    channels_last(model, torch.device("cuda"))
    add_lora(model, LoraSpec(rank=4, alpha=4, targets="attn-ff"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float().normal_(0, 0.02).to(dtype)   # B != 0: outputs depend on A and B
    return model


@pytest.mark.gpu
@needs_cuda
def test_graphed_steps_follow_the_optimizer(monkeypatch):
    """Three SGD steps, graphed and eager, from the same start: same losses, same weights (fp32, no
    TF32: the two differ only by the order of floating-point sums)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = PRESETS["tiny"]
    g = torch.Generator("cuda").manual_seed(0)
    batches = [(torch.randn(2, cfg.in_channels, 16, 16, device="cuda", generator=g),
                torch.randint(0, 1000, (2,), device="cuda", generator=g),
                torch.randn(2, 7, cfg.context_dim, device="cuda", generator=g))
               for _ in range(3)]

    def train(graphs: bool):
        model = _lora_unet()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        fwd = GraphedStep(model, enabled=graphs)
        losses = []
        for x, t, c in batches:
            loss = fwd(x, t, c).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, [p.detach().float().clone() for p in params], fwd

    kept = [tuple(t.clone() for t in b) for b in batches]
    (l_graph, w_graph, fwd), (l_eager, w_eager, _) = train(True), train(False)
    assert all(torch.equal(a, b) for x, y in zip(kept, batches) for a, b in zip(x, y))   # inputs untouched
    assert len(fwd.graphs) == 1 and fwd.reserved_bytes > 0
    assert l_graph == pytest.approx(l_eager, rel=1e-4)
    assert len(set(l_graph)) == 3
    assert max((a - b).abs().max().item() for a, b in zip(w_graph, w_eager)) <= 1e-5


@pytest.mark.gpu
@needs_cuda
def test_more_shapes_than_the_limit_run_eagerly():
    model = _lora_unet()
    cfg = model.config
    fwd = GraphedStep(model, max_graphs=1)
    for side in (16, 24):
        x = torch.randn(1, cfg.in_channels, side, side, device="cuda")
        c = torch.randn(1, 5, cfg.context_dim, device="cuda")
        out = fwd(x, torch.tensor([5], device="cuda"), c)
        out.float().mean().backward()
    assert len(fwd.graphs) == 1 and "more than 1 input shapes" in fwd.why_not


@pytest.mark.gpu
@needs_cuda
def test_shapes_share_one_pool_and_alternate_like_the_eager_step(monkeypatch):
    """Three input layouts (32x32, the same channels-last, 16x16), replayed out of capture order, graphed
    vs eager (SGD, fp32, no TF32): same losses and weights. The second capture has the first's
    activation sizes: sharing the pool, it reserves less than half of what the first did."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = PRESETS["tiny"]
    g = torch.Generator("cuda").manual_seed(0)

    def batch(side, layout=torch.contiguous_format):
        return (torch.randn(16, cfg.in_channels, side, side, device="cuda", generator=g)
                .contiguous(memory_format=layout),
                torch.randint(0, 1000, (16,), device="cuda", generator=g),
                torch.randn(16, 7, cfg.context_dim, device="cuda", generator=g))
    a, b, c = batch(32), batch(32, torch.channels_last), batch(16)
    batches = [a, b, c, batch(32), batch(16), batch(32, torch.channels_last)]

    def train(graphs: bool):
        model = _lora_unet()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        fwd = GraphedStep(model, enabled=graphs)
        losses, reserved = [], []
        for x, t, c in batches:
            loss = fwd(x, t, c).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            reserved.append(fwd.reserved_bytes)
        return losses, [p.detach().float().clone() for p in params], fwd, reserved

    l_graph, w_graph, fwd, reserved = train(True)
    l_eager, w_eager, _, _ = train(False)
    print("reserved after each step (MB):", [r >> 20 for r in reserved])
    assert len(fwd.graphs) == 3 and reserved[3:] == reserved[2:3] * 3       # no capture after the third
    assert l_graph == pytest.approx(l_eager, rel=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(w_graph, w_eager)) <= 1e-5
    assert reserved[1] - reserved[0] < reserved[0] / 2


@pytest.mark.gpu
@needs_cuda
def test_accumulated_micro_batches_sum_like_the_eager_step(monkeypatch):
    """Two micro-batches per step, one backward each, then SGD (fp32, no TF32): the graphed gradients
    add up like the eager ones (a replay must not overwrite the `.grad` the previous one left)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = PRESETS["tiny"]
    g = torch.Generator("cuda").manual_seed(0)
    batches = [(torch.randn(2, cfg.in_channels, 16, 16, device="cuda", generator=g),
                torch.randint(0, 1000, (2,), device="cuda", generator=g),
                torch.randn(2, 7, cfg.context_dim, device="cuda", generator=g))
               for _ in range(4)]

    def train(graphs: bool):
        model = _lora_unet()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        fwd = GraphedStep(model, enabled=graphs)
        grads = []
        for first, second in (batches[:2], batches[2:]):
            for x, t, c in (first, second):
                (fwd(x, t, c).float().square().mean() / 2).backward()
            grads.append([p.grad.clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=True)
        return grads, [p.detach().clone() for p in params]

    (g_graph, w_graph), (g_eager, w_eager) = train(True), train(False)
    for a, b in zip(g_graph, g_eager):
        assert max((x - y).abs().max().item() / y.abs().max().clamp_min(1e-12).item()
                   for x, y in zip(a, b)) <= 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(w_graph, w_eager)) <= 1e-5


@pytest.mark.gpu
def test_a_capture_after_an_eager_step_whose_graph_is_still_alive(monkeypatch):
    """An eager forward + backward of the module first, its loss (and so its autograd graph) kept
    alive, then graphed steps of a new shape: the capture must not wait on the default stream (torch
    2.11 invalidated it: "operation failed due to a previous error during capture"), and the graphed
    gradients equal the eager ones."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = PRESETS["tiny"]
    g = torch.Generator("cuda").manual_seed(0)
    x, c = (torch.randn(2, cfg.in_channels, 16, 16, device="cuda", generator=g),
            torch.randn(2, 7, cfg.context_dim, device="cuda", generator=g))
    t = torch.tensor([10, 500], device="cuda")

    def grads(graphs: bool):
        model = _lora_unet()
        params = [p for p in model.parameters() if p.requires_grad]
        fwd = GraphedStep(model, enabled=graphs)
        kept = model(x[:1], t[:1], c[:1]).square().mean()           # eager, on the default stream
        kept.backward(retain_graph=True)
        for p in params:
            p.grad = None
        for _ in range(2):                                          # capture, then a replay
            fwd(x, t, c).float().square().mean().backward()
        assert kept.grad_fn is not None                             # the eager graph was alive throughout
        return [p.grad.clone() for p in params], len(fwd.graphs)

    (graphed, n), (eager, _) = grads(True), grads(False)
    assert n == 1
    assert max((a - b).abs().max().item() / b.abs().max().clamp_min(1e-12).item()
               for a, b in zip(graphed, eager)) <= 1e-4
