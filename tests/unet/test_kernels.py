"""The Triton kernels of unet/kernels.py against PyTorch's own ops (GPU only: CPU torch has no Triton).

Oracles: F.group_norm (+ F.silu) and h * F.gelu(gate) computed in fp32 by autograd, on the same
inputs; the whole tiny U-Net channels-last with the kernels against NCHW without them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapterkit.unet import kernels

pytestmark = pytest.mark.gpu
if not kernels.available():
    pytest.skip("needs CUDA and Triton", allow_module_level=True)

CUDA = torch.device("cuda")


def reference_norm(x, w, b, groups, eps, silu):
    y = F.group_norm(x.float(), groups, w.float(), b.float(), eps)
    return F.silu(y) if silu else y


def tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]


# (N, C, H, W, groups): SD1.5 widths, odd spatial sizes and channel counts that are not multiples
# of the 64 x 64 tile, one group per channel, one group for all.
SHAPES = [(2, 320, 16, 16, 32), (3, 96, 7, 9, 32), (1, 1280, 8, 8, 32), (2, 40, 5, 3, 40), (2, 24, 4, 4, 1),
          (1, 640, 33, 31, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_matches_torch(shape, silu, dtype):
    N, C, H, W, G = shape
    g = torch.Generator(CUDA).manual_seed(0)
    # An offset mean: E[x^2] - E[x]^2 would lose digits here; the kernel's centred sums do not.
    x = (torch.randn(N, C, H, W, device=CUDA, generator=g) * 3 + 20).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, device=CUDA, generator=g).to(dtype)
    b = torch.randn(C, device=CUDA, generator=g).to(dtype)
    grad = torch.randn(N, C, H, W, device=CUDA, generator=g).to(dtype)

    xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = kernels.group_norm(xs, ws, bs, G, 1e-5, silu)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    y.backward(grad)

    xr, wr, br = (t.detach().float().requires_grad_(True) for t in (x, w, b))
    yr = reference_norm(xr, wr, br, G, 1e-5, silu)
    yr.backward(grad.float())

    scale = lambda r: r.abs().max().item() + 1e-6
    assert (y.float() - yr).abs().max().item() <= tol(dtype) * scale(yr)
    assert (xs.grad.float() - xr.grad).abs().max().item() <= tol(dtype) * scale(xr.grad)
    assert (ws.grad.float() - wr.grad).abs().max().item() <= tol(dtype) * scale(wr.grad)
    assert (bs.grad.float() - br.grad).abs().max().item() <= tol(dtype) * scale(br.grad)


def test_group_norm_is_deterministic():
    x = torch.randn(4, 320, 32, 32, device=CUDA).to(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.randn(320, device=CUDA), torch.randn(320, device=CUDA)
    grad = torch.randn_like(x)
    runs = []
    for _ in range(2):
        x.grad = None
        y = kernels.group_norm(x, w, b, 32, 1e-6, True)
        y.backward(grad)
        runs.append((y.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_group_norm_rejects_bad_groups():
    x = torch.randn(1, 30, 4, 4, device=CUDA).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="30 channels do not split into 4 groups"):
        kernels.group_norm(x, torch.ones(30, device=CUDA), torch.zeros(30, device=CUDA), 4, 1e-5, True)


@pytest.mark.parametrize("shape", [(2, 64, 2 * 1280), (3, 77, 2 * 300), (5, 2 * 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_matches_torch(shape, dtype):
    g = torch.Generator(CUDA).manual_seed(1)
    p = (torch.randn(*shape, device=CUDA, generator=g) * 2).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device=CUDA, generator=g).to(dtype)
    ps = p.detach().clone().requires_grad_(True)
    out = kernels.geglu(ps)
    out.backward(grad)
    pr = p.detach().float().requires_grad_(True)
    h, gate = pr.chunk(2, dim=-1)
    ref = h * F.gelu(gate)
    ref.backward(grad.float())
    assert (out.float() - ref).abs().max().item() <= tol(dtype) * ref.abs().max().item()
    assert (ps.grad.float() - pr.grad).abs().max().item() <= tol(dtype) * pr.grad.abs().max().item()


def test_unet_channels_last_with_kernels_matches_nchw():
    """The tiny U-Net, fp32: channels-last through the kernels == NCHW through PyTorch's ops."""
    import adapterkit.unet.ops as unet_ops
    from adapterkit.unet import PRESETS, UNet
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"]).to(CUDA)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 32, 32, device=CUDA)
    ctx = torch.randn(2, 7, cfg.context_dim, device=CUDA)
    t = torch.tensor([10, 700], device=CUDA)

    def run(channels_last: bool):
        model.zero_grad(set_to_none=True)
        with unet_ops.use_ops(unet_ops.OpsOptions(kernels=channels_last)):
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            out = model(xi, t, ctx)
            out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out_cl, grads_cl = run(True)
        out_ref, grads_ref = run(False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (out_cl - out_ref).abs().max().item() < 1e-4
    for name, g in grads_ref.items():
        assert (grads_cl[name] - g).abs().max().item() <= 1e-4 * (g.abs().max().item() + 1e-3), name


def test_a_new_picture_shape_compiles_no_new_variant():
    # The warm-up of an aspect-ratio bucket (issue 21 item 3): the sizes that change with the
    # picture's shape are not specialised on, so 64x64 latents and then 72x56 ones (whose 18x14 and
    # 9x7 levels are not multiples of 16) use the kernels the first shape compiled.
    def run(h, w):
        for c in (320, 640):
            x = torch.randn(2, c, h, w, device=CUDA, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last).requires_grad_(True)
            weight = torch.ones(c, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
            bias = torch.zeros(c, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
            kernels.group_norm(x, weight, bias, 32, 1e-5, True).sum().backward()
            p = torch.randn(2, h * w, 2 * c, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
            kernels.geglu(p).sum().backward()
        torch.cuda.synchronize()

    def compiled() -> int:                  # Triton's own count of compiled variants (its JIT caches)
        jits = [k for k in vars(kernels).values() if hasattr(k, "device_caches")]
        if not jits:
            pytest.skip("this Triton keeps no device_caches to count")
        return sum(len(cache[0]) for k in jits for cache in k.device_caches.values())

    run(16, 16)
    before, (variants, _) = compiled(), kernels.compile_stats()
    for h, w in ((18, 14), (9, 7), (1, 1), (33, 31)):
        run(h, w)
    assert compiled() == before
    assert kernels.compile_stats()[0] == variants
