"""Two activation-lean autograd ops for the U-Net's hot spots.

Plain autograd keeps both the input and the output of a normalisation followed by an activation
(the norm needs its input, the activation its own input). For a frozen base trained through small
adapters, these saved activations dominate memory: the convolutions and linears save nothing when
their weights need no gradient. Each op here saves only its input and recomputes the cheap
elementwise part in the backward pass, the same trade FlashAttention makes for the softmax.

- `group_norm_silu(x)`: GroupNorm then SiLU; saves x (+ per-group mean/rstd), not the normalised x.
- `geglu(p)`: GEGLU on a projection p = [h | gate]; saves p, not gelu(gate).

Forward values are bit-identical to the unfused ops. Without grad they run the plain ops.

On CUDA both go to the Triton kernels of unet/kernels.py instead (same saved tensors, fp32 math,
not bit-identical): GroupNorm for channels-last input (also `group_norm`, without the SiLU), GEGLU
for any contiguous input, with or without grad; torch.compile and autocast always use the PyTorch ops.

`geglu` also writes in place: gelu(gate) is multiplied into its own buffer in the forward pass, and the
backward pass writes both halves of the gradient straight into one (.., 2 * inner) tensor instead of
concatenating two temporaries (two fewer passes over the widest activation of the block, and no
temporaries of its size). Values are unchanged; torch.compile always traces the allocating version.

Ablations (benchmarks/) switch these off through `OpsOptions`, for a block of code:

    with use_ops(OpsOptions(kernels=False)):
        step()

The command line reads the switches from the environment once, at its entry point
(`OpsOptions.from_env`: ADAPTERKIT_PLAIN_OPS=1, ADAPTERKIT_NO_KERNELS=1, ADAPTERKIT_NO_IN_PLACE=1).
A backward pass (which autograd may run on another thread) follows what its forward pass decided.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

T = TypeVar("T")


@dataclass(frozen=True)
class OpsOptions:
    fused: bool = True       # the activation-lean autograd ops (off: plain autograd)
    kernels: bool = True     # the Triton kernels on CUDA
    in_place: bool = True    # geglu's in-place forward and backward

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OpsOptions:
        return cls(fused=env.get("ADAPTERKIT_PLAIN_OPS", "") != "1",
                   kernels=env.get("ADAPTERKIT_NO_KERNELS", "") != "1",
                   in_place=env.get("ADAPTERKIT_NO_IN_PLACE", "") != "1")


class Scoped(Generic[T]):
    """A frozen options record in force for a block of code: `with scoped.use(options): ...`. A plain
    attribute rather than a ContextVar: torch.compile reads it without a graph break, and autograd's
    backward threads see the value the forward saw."""

    def __init__(self, default: T):
        self.current = default

    @contextmanager
    def use(self, options: T) -> Iterator[T]:
        before, self.current = self.current, options
        try:
            yield options
        finally:
            self.current = before


_OPS = Scoped(OpsOptions())


def ops_options() -> OpsOptions:
    """The options in force here."""
    return _OPS.current


def use_ops(options: OpsOptions):
    """`options` in force for the block (and for what it calls)."""
    return _OPS.use(options)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float):
        # CUDA's GroupNorm kernel takes NCHW only (torch.nn.GroupNorm copies channels_last input too).
        cl = not x.is_cuda and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        N, C = x.shape[:2]
        hw = x.numel() // (N * C)
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, N, C, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = (N, C, hw, groups)
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        N, C, hw, groups = ctx.shape
        # Recompute y = x * scale + shift per channel from the saved statistics: one elementwise
        # pass that keeps x's memory format (channels_last stays channels_last).
        shape = (N, C) + (1,) * (x.ndim - 2)
        mean_c = mean.repeat_interleave(C // groups, dim=1)                     # (N, C)
        scale = rstd.repeat_interleave(C // groups, dim=1) * weight             # (N, C)
        shift = bias - mean_c * scale
        y = torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))
        fmt = torch.channels_last if x.ndim == 4 and x.is_contiguous(
            memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
        dy = torch.ops.aten.silu_backward(grad, y).contiguous(memory_format=fmt)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, weight, N, C, hw, groups, mask)
        return dx, dw, db, None, None


def group_norm_silu(x: Tensor, norm: torch.nn.GroupNorm) -> Tensor:
    """SiLU(norm(x)) for an affine `nn.GroupNorm`, keeping only x for the backward pass."""
    if _nhwc_kernel(x, norm):
        return kernels.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=True)
    trains = x.requires_grad or norm.weight.requires_grad
    if not ops_options().fused or not torch.is_grad_enabled() or not trains:
        return F.silu(norm(x))
    if x.dtype != norm.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return F.silu(norm(x))                # autocast runs GroupNorm in fp32: keep its semantics
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


def group_norm(x: Tensor, norm: torch.nn.GroupNorm) -> Tensor:
    """norm(x); channels-last CUDA x goes through the NHWC kernel instead of a copy to NCHW."""
    if _nhwc_kernel(x, norm):
        return kernels.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=False)
    return norm(x)


def _kernels_on(t: Tensor) -> bool:
    """Whether unet/kernels.py may take `t`: a CUDA tensor, kernels on, not compiling (tested first, so
    Dynamo never traces the rest), no autocast."""
    return (not torch.compiler.is_compiling() and ops_options().kernels and t.is_cuda and kernels.available()
            and not torch.is_autocast_enabled("cuda"))


def _nhwc_kernel(x: Tensor, norm: torch.nn.GroupNorm) -> bool:
    return _kernels_on(x) and norm.affine and kernels.supports(x) and x.dtype == norm.weight.dtype


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: Tensor):
        ctx.save_for_backward(p)
        ctx.in_place = _in_place()
        return _geglu(p, ctx.in_place)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        h, gate = p.chunk(2, dim=-1)
        if not ctx.in_place:
            dh = grad * F.gelu(gate)
            dgate = torch.ops.aten.gelu_backward(grad * h, gate)
            return torch.cat([dh, dgate], dim=-1)
        dp = torch.empty_like(p)
        dh, dgate = dp.chunk(2, dim=-1)                  # views: each op below writes its half of dp
        torch.ops.aten.gelu.out(gate, out=dh)
        dh.mul_(grad)                                    # gelu(gate) * grad == grad * gelu(gate), bitwise
        torch.mul(grad, h, out=dgate)
        torch.ops.aten.gelu_backward.grad_input(dgate, gate, grad_input=dgate)
        return dp


def _in_place() -> bool:
    # Dynamo cannot trace `out=` into a strided view (a graph break per block); inductor fuses the
    # allocating version anyway.
    return ops_options().in_place and not torch.compiler.is_compiling()


def _geglu(p: Tensor, in_place: bool) -> Tensor:
    h, gate = p.chunk(2, dim=-1)
    if not in_place:
        return h * F.gelu(gate)
    return F.gelu(gate).mul_(h)                          # gelu(gate) * h == h * gelu(gate), bitwise


def geglu(p: Tensor) -> Tensor:
    """h * gelu(gate) for p = [h | gate] along the last dim, keeping only p for the backward pass."""
    if _kernels_on(p) and p.is_contiguous():
        return kernels.geglu(p)
    if not ops_options().fused or not torch.is_grad_enabled() or not p.requires_grad:
        if torch.is_grad_enabled() and p.requires_grad:
            h, gate = p.chunk(2, dim=-1)
            return h * F.gelu(gate)                       # plain autograd (ablation)
        return _geglu(p, _in_place())
    return _GEGLU.apply(p)
