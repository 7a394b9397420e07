"""Column-wise DoRA as a peft LoRA variant: the DoRA that ComfyUI, A1111 and LyCORIS files hold.

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a magnitude. With the LoRA
update ΔW = s·B A (s = alpha / rank) and V = W + ΔW, the clients compute (A1111
extensions-builtin/Lora/network.py `apply_weight_decompose`, ComfyUI comfy/weight_adapter/base.py
`weight_decompose`, LyCORIS `weight_decompose(..., wd_on_out=False)`):

    W' = V · diag(m / ‖V‖_col)          ‖V‖_col[j] = norm of input column j over (out, kh, kw)
    file: dora_scale = m, shape (1, in) | (1, in, 1, 1)

peft's `use_dora` keeps one magnitude per *output row* instead (m / ‖V‖_row scales the rows), and no
exact conversion between the two exists. So a DoRA meant for clients is trained here: a peft
`lora.Linear` / `lora.Conv2d` whose `use_dora` variant is `ColumnDoraVariant` (registered with peft
like lora_fused.py's layer). Everything else (set_adapter, scales, deletion, plain LoRA adapters on
the same layer) is peft's.

A column scale is a scale of the layer's input channels, so the forward never forms W':

    W' x = (W + s·B A)(c ⊙ x),   c = m / ‖V‖_col     one base pass on c ⊙ x (Linear: lora_fused's kernel)

The norm is detached from the graph as in the DoRA paper §4.3 (peft does the same); m gets its
gradient through c. At weight w ≠ 1 (the `<lora:name:w>` multiplier) the layer adds w·(W' − W) x, the
clients' rule (the multiplier scales the decomposed update), not peft's (w inside the norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Conv2d as PeftConv2d
from peft.tuners.lora.layer import LoraVariant
from torch import Tensor, nn

from . import lora_fused


class ColumnMagnitude(nn.Module):
    """m of one column-wise DoRA adapter: one magnitude per input channel, shape [in]."""

    def __init__(self, magnitude: Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def column_norms(weight: Tensor) -> Tensor:
    """‖W‖ per input column: over the output axis and the kernel, shape [in]."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1)


def _base_scale(layer, name: str) -> float:
    """alpha / rank: the scale the file's alpha gives, before the weight multiplier."""
    return layer.lora_alpha[name] / layer.r[name]


def _lora_weight(layer, name: str) -> Tensor:
    """B A shaped like the base weight, in the adapter's dtype."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    w = layer.get_base_layer().weight
    return (B.flatten(1) @ A.flatten(1)).reshape(w.shape)


def column_scale(layer, name: str) -> Tensor:
    """c = m / ‖W + s·B A‖_col in the adapter's dtype, the norm detached (DoRA §4.3)."""
    A = layer.lora_A[name].weight
    w = layer.get_base_layer().weight.to(A.dtype)
    norm = column_norms(w + _base_scale(layer, name) * _lora_weight(layer, name)).detach()
    return layer.lora_magnitude_vector[name].weight / norm


def dora_delta(layer, name: str, weight: Tensor | None = None) -> Tensor:
    """W' − W for the base weight `weight` (default: the layer's), in the adapter's dtype."""
    A = layer.lora_A[name].weight
    w = (layer.get_base_layer().weight if weight is None else weight).to(A.dtype)
    v = w + _base_scale(layer, name) * _lora_weight(layer, name)
    c = layer.lora_magnitude_vector[name].weight / column_norms(v)
    return v * _channels(c, w.ndim) - w


def _channels(c: Tensor, ndim: int) -> Tensor:
    """c [in] broadcast over a weight's input axis ([1, in] or [1, in, 1, 1])."""
    return c.view(1, -1, *([1] * (ndim - 2)))


def _scale_input(x: Tensor, c: Tensor, conv: bool) -> Tensor:
    """c ⊙ x over the input channels: the last axis of a Linear's input, axis 1 of a conv's."""
    return x * (c.view(1, -1, 1, 1) if conv else c).to(x.dtype)


def _base_op(layer, x: Tensor) -> Tensor:
    """The base layer without its bias."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, base.weight)


class ColumnDoraVariant(LoraVariant):
    """peft LoRA variant for column-wise DoRA (see the module docstring)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        base = module.get_base_layer()
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("column-wise DoRA needs ungrouped convolutions; this conv has "
                             f"groups={base.groups}")
        if "lora_magnitude_vector" not in module.adapter_layer_names:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        A = module.lora_A[adapter_name].weight
        with torch.no_grad():
            s = _base_scale(module, adapter_name)
            v = base.weight.to(A.dtype) + s * _lora_weight(module, adapter_name)
            module.lora_magnitude_vector[adapter_name] = ColumnMagnitude(column_norms(v))

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        delta = ColumnDoraVariant._merge_delta(module, active_adapter, orig_weight)
        return (orig_weight + delta).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: Tensor) -> None:
        delta = ColumnDoraVariant._merge_delta(module, active_adapter, orig_weight)
        orig_weight.data = (orig_weight.data + delta).to(orig_weight.dtype)

    @staticmethod
    def _merge_delta(module, name: str, weight: Tensor) -> Tensor:
        """w·(W' − W) of the weight being merged into, kept for unmerge."""
        w = module.scaling[name] / _base_scale(module, name)
        delta = (w * dora_delta(module, name, weight.detach())).to(weight.dtype)
        module._cache_store(f"{name}-column-dora-delta", delta)
        return delta

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight.data - module._cache_pop(f"{active_adapter}-column-dora-delta")

    @staticmethod
    def forward(module, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        """result + w·(W' − W) x = result + w·[W((c − 1) ⊙ x) + s·B A (c ⊙ drop(x))]."""
        conv = isinstance(module.get_base_layer(), nn.Conv2d)
        c = column_scale(module, active_adapter)
        w = module.scaling[active_adapter] / _base_scale(module, active_adapter)
        base_x = _scale_input(x, c - 1, conv).to(module.get_base_layer().weight.dtype)
        lora_x = _scale_input(module.lora_dropout[active_adapter](x), c, conv)
        A, B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        s = _base_scale(module, active_adapter)
        update = _base_op(module, base_x).to(result.dtype) + s * B(A(lora_x))
        return result + w * update


class _ColumnDoraForward:
    """The common case in one base pass: a single active column-DoRA adapter at weight 1."""

    def _single_column_dora(self, x: Tensor, args, kwargs) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        if len(names) != 1 or not isinstance(self.lora_variant.get(names[0]), ColumnDoraVariant):
            return None
        name = names[0]
        return name if self.scaling[name] == _base_scale(self, name) else None

    def _column_dora_forward(self, x: Tensor, name: str, conv: bool) -> Tensor:
        """base(c ⊙ x) + s·B A (c ⊙ drop(x))."""
        xs = _scale_input(x, column_scale(self, name), conv)
        base = self.get_base_layer()
        A, B, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if not conv and _fusable(self, xs, name):
            Bs = B.weight * self.scaling[name]
            return lora_fused._LoraLinear.apply(xs, base.weight, base.bias, A.weight, Bs)
        y = base(xs)
        lx = self._cast_input_dtype(drop(xs), A.weight.dtype)
        return y + (B(A(lx)) * self.scaling[name]).to(y.dtype)


def _fusable(layer, x: Tensor, name: str) -> bool:
    """Whether lora_fused's kernel computes what the plain ops would (its own conditions)."""
    base, drop = layer.get_base_layer(), layer.lora_dropout[name]
    options = lora_fused.fused_lora_options()
    if not options.enabled or layer.fan_in_fan_out or torch.is_autocast_enabled(x.device.type):
        return False
    if torch.compiler.is_compiling() and not options.compiled:
        return False
    if drop.training and not isinstance(drop, nn.Identity):
        return False
    dtypes = {x.dtype, base.weight.dtype, layer.lora_A[name].weight.dtype, layer.lora_B[name].weight.dtype}
    return type(base) is nn.Linear and len(dtypes) == 1


class _ColumnDoraLayer(_ColumnDoraForward):
    """A peft LoRA layer whose `use_dora` builds column-wise DoRA; `_conv` says which kind of layer."""
    _conv = False

    @property
    def lora_variants(self):
        return {**super().lora_variants, ("use_dora",): ColumnDoraVariant}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        name = self._single_column_dora(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        return self._column_dora_forward(x, name, conv=self._conv)


class ColumnDoraLinear(_ColumnDoraLayer, lora_fused.FusedLinear):
    """lora_fused's peft Linear whose `use_dora` builds column-wise DoRA."""


class ColumnDoraConv2d(_ColumnDoraLayer, PeftConv2d):
    """peft's LoRA Conv2d whose `use_dora` builds column-wise DoRA."""
    _conv = True


def register(config) -> None:
    """Make peft build the column-wise DoRA layers for the Linear/Conv2d targets of this LoraConfig."""
    config._register_custom_module({nn.Linear: ColumnDoraLinear, nn.Conv2d: ColumnDoraConv2d})


def is_column_dora(layer, name: str) -> bool:
    return isinstance(getattr(layer, "lora_variant", {}).get(name), ColumnDoraVariant)
