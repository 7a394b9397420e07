"""The activation-lean ops compute exactly what the plain ops compute, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from adapterkit.unet.ops import geglu, group_norm_silu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("trainable_norm", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_matches_plain_ops(dtype, tol, trainable_norm, channels_last):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm.requires_grad_(trainable_norm)
    x = torch.randn(3, 16, 5, 7, dtype=dtype) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 16, 5, 7, dtype=dtype)
    results = []
    for fn in (lambda v: F.silu(norm(v)), lambda v: group_norm_silu(v, norm)):
        xi = x.clone().requires_grad_(True)
        norm.zero_grad(set_to_none=True)
        out = fn(xi)
        out.backward(g)
        results.append((out, xi.grad, norm.weight.grad, norm.bias.grad))
    (o1, dx1, dw1, db1), (o2, dx2, dw2, db2) = results
    assert torch.equal(o1, o2)
    assert torch.allclose(dx1.float(), dx2.float(), atol=tol, rtol=tol)
    if trainable_norm:
        assert torch.allclose(dw1.float(), dw2.float(), atol=tol * 10, rtol=tol)
        assert torch.allclose(db1.float(), db2.float(), atol=tol * 10, rtol=tol)
    else:
        assert dw2 is None and db2 is None


def test_group_norm_silu_saves_less_than_plain_ops():
    norm = torch.nn.GroupNorm(4, 16).requires_grad_(False)
    x = torch.randn(2, 16, 32, 32, requires_grad=True)

    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(x)
        return sum(sizes)

    assert saved_bytes(lambda v: group_norm_silu(v, norm)) < 0.6 * saved_bytes(lambda v: F.silu(norm(v)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_geglu_matches_plain_ops(dtype, tol):
    torch.manual_seed(0)
    p = torch.randn(2, 9, 24, dtype=dtype)
    g = torch.randn(2, 9, 12, dtype=dtype)
    results = []
    for fn in (lambda v: v.chunk(2, -1)[0] * F.gelu(v.chunk(2, -1)[1]), geglu):
        pi = p.clone().requires_grad_(True)
        out = fn(pi)
        out.backward(g)
        results.append((out, pi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1].float(), results[1][1].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded"])
def test_geglu_in_place_is_bitwise_the_allocating_version(dtype, grad_layout, monkeypatch):
    import adapterkit.unet.ops as unet_ops
    torch.manual_seed(0)
    p = torch.randn(2, 9, 24, dtype=dtype)
    g = torch.randn(2, 9, 12, dtype=dtype) if grad_layout == "contiguous" else \
        torch.randn(1, 1, 12, dtype=dtype).expand(2, 9, 12)
    results = []
    for in_place in (False, True):
        with unet_ops.use_ops(unet_ops.OpsOptions(in_place=in_place)):
            pi = p.clone().requires_grad_(True)
            out = geglu(pi)
            out.backward(g)
            with torch.no_grad():
                no_grad = geglu(p)
        results.append((out, pi.grad, no_grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
