"""peft's LoRA Linear with the adapter update folded into the GEMMs: fewer passes over the activations.

peft's `lora.Linear` computes, per active adapter,

    result = base(x);  result = result + lora_B(lora_A(dropout(x))) * scaling

as separate kernels: the rank-r product written out at full size, a multiply by `scaling`, an add, and
in the backward pass the same multiply again plus an add that sums the two gradients of x. On a
bf16 U-Net these passes over (tokens x channels) tensors cost as much as the LoRA GEMMs themselves.
`FusedLinear` computes the same function in two GEMMs each way:

    forward:   a = x Aᵀ                      (N, R)    R = sum of the active adapters' ranks
               y = x Wᵀ + b;  y += a (s·B)ᵀ            cuBLAS's beta = 1: the update lands in the epilogue
    backward:  g_a = g (s·B)                 (N, R)
               dx = g W;  dx += g_a A                  one gradient of x, not two to be summed
               dA = g_aᵀ x,  d(s·B) = gᵀ a

`scaling` is folded into the small (out x r) matrix, never into the activation; several active
adapters are one concatenated rank (A stacked, s·B side by side). Gradients of A and B reach the
parameters through autograd on those small tensors, so they are exact (the fused result differs from
peft's only by rounding, and is rounded once instead of four times).

It is peft's layer (a subclass registered through `LoraConfig._register_custom_module`): merge/unmerge,
set_adapter, scales, disable_adapters, deletion and state dicts are peft's own. The fused path runs
only where it computes exactly what peft computes; anything else (merged weights, disabled adapters,
dropout in training, DoRA and other variants, `adapter_names` batches, mixed dtypes, autocast,
fan_in_fan_out) goes to peft's forward unchanged.

Switches, for ablations (benchmarks/lora_step.py), through `FusedLoraOptions` for a block of code
(`with use_fused_lora(FusedLoraOptions(enabled=False)): ...`): `enabled` (the command line reads
ADAPTERKIT_PEFT_LORA=1 at its entry point to turn the fused path off) and `compiled` (use the fused
path inside torch.compile too; off by default, because inductor already fuses peft's elementwise ops
into its GEMM epilogues).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import Tensor, nn

from adapterkit.unet.ops import Scoped


@dataclass(frozen=True)
class FusedLoraOptions:
    enabled: bool = True     # the fused path (off: peft's own forward everywhere)
    compiled: bool = False   # the fused path inside torch.compile too

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FusedLoraOptions:
        return cls(enabled=env.get("ADAPTERKIT_PEFT_LORA", "") != "1")


_FUSED = Scoped(FusedLoraOptions())


def fused_lora_options() -> FusedLoraOptions:
    return _FUSED.current


def use_fused_lora(options: FusedLoraOptions):
    """`options` in force for the block (and for what it calls)."""
    return _FUSED.use(options)


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + (x Aᵀ) Bsᵀ over the last dim of x; Bs is the adapter's up matrix times its scale."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, Bs: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])                                     # (N, in)
        a = x2 @ A.t()                                                      # (N, R)
        y = F.linear(x2, weight, bias)                                      # (N, out)
        y.addmm_(a, Bs.t())
        need_x, need_w, _, need_A, need_B = ctx.needs_input_grad
        # Keep only what the wanted gradients read (a frozen base under a frozen input needs no W).
        ctx.save_for_backward(x2 if need_w or need_A else None, weight if need_x else None,
                              A if need_x else None, Bs if need_x or need_A else None,
                              a if need_B else None)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, A, Bs, a = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])                                # (N, out)
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad
        dx = dw = db = dA = dB = None
        g_a = g @ Bs if (need_x or need_A) else None                        # (N, R)
        if need_x:
            dx = (g @ weight).addmm_(g_a, A).view(ctx.in_shape)
        if need_w:
            dw = g.t() @ x2
        if need_b and ctx.has_bias:
            db = g.sum(0)
        if need_A:
            dA = g_a.t() @ x2
        if need_B:
            dB = g.t() @ a
        return dx, dw, db, dA, dB


class FusedLinear(PeftLinear):
    """peft `lora.Linear` whose unmerged forward runs `_LoraLinear` (see the module docstring)."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapters = self._fusable_adapters(x, args, kwargs)
        if adapters is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if not adapters:
            return base(x)
        if len(adapters) == 1:
            A = self.lora_A[adapters[0]].weight
            Bs = _scaled(self.lora_B[adapters[0]].weight, self.scaling[adapters[0]])
        else:
            A = torch.cat([self.lora_A[n].weight for n in adapters])
            Bs = torch.cat([_scaled(self.lora_B[n].weight, self.scaling[n]) for n in adapters], dim=1)
        return _LoraLinear.apply(x, base.weight, base.bias, A, Bs)

    def _fusable_adapters(self, x: Tensor, args, kwargs) -> list[str] | None:
        """The active adapters, in order, when the fused path computes what peft would; else None."""
        options = fused_lora_options()
        if not options.enabled or args or kwargs:
            return None
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        if torch.compiler.is_compiling() and not options.compiled:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        base = self.get_base_layer()
        if type(base) is not nn.Linear or x.dtype != base.weight.dtype:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        for n in names:
            drop = self.lora_dropout[n]
            if n in self.lora_variant or (drop.training and not isinstance(drop, nn.Identity)):
                return None
            if self.lora_A[n].weight.dtype != x.dtype or self.lora_B[n].weight.dtype != x.dtype:
                return None
        return names


def _scaled(B: Tensor, scale: float) -> Tensor:
    return B if scale == 1.0 else B * scale


def register(config) -> None:
    """Make peft build `FusedLinear` for the nn.Linear targets of this LoraConfig."""
    config._register_custom_module({nn.Linear: FusedLinear})
