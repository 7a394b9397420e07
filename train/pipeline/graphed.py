"""A model call replayed from a CUDA graph (`GraphedCall`), the channels-last layout (`channels_last`),
and the flattening of a call's arguments into tensors that both need.

Why: at the batch sizes of sampling (2 x images under guidance) an SD U-Net call is launch-bound:
its few thousand kernels each take less GPU time than Python needs to issue them (issue 21 measured
36 ms a call at batch 2 on the H200, most of it host time). A CUDA graph issues them all in one
launch. `GraphedCall(fn)` is a drop-in for `fn(*args)` under `torch.no_grad()`: on CUDA the first
call per input layout (shapes, dtypes, strides) runs `fn` once eagerly (lazy initialisation, kernel
compiles, workspaces), captures it, and every call then copies its inputs into the captured tensors,
replays, and returns a copy of the output. The captured call must be the same computation every
time apart from its tensor inputs: whatever else `fn` reads (a LoRA's scale, a ControlNet's
conditioning scale, a closure's tensors) is frozen at capture, so make one GraphedCall per setting
(train/pipeline/generate.py makes one per `generate` call, whose settings are fixed) and pass
changing tensors as arguments. Off CUDA, with grad enabled, or past `max_graphs` layouts it is the
plain call.

The training step's graphs (forward and backward) are train/jobs/graphs.py's GraphedStep.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from adapterkit.unet import Conditioning, kernels


def channels_last(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module` in channels-last layout where it pays (CUDA with the NHWC kernels of unet/kernels.py);
    else unchanged."""
    if torch.device(device).type == "cuda" and kernels.available():
        module.to(memory_format=torch.channels_last)
    return module


def flatten(args: tuple) -> tuple[tuple[Tensor, ...], tuple]:
    """The tensors of `args` and how to rebuild the arguments (`unflatten`): per argument None (a
    tensor), ("cond", field names) for a Conditioning, ("seq", count) for a list/tuple of tensors, or
    ("none",) for None."""
    flat, spec = [], []
    for a in args:
        if isinstance(a, Conditioning):
            fields = a.tensors()
            flat += fields.values()
            spec.append(("cond", tuple(fields)))
        elif isinstance(a, (list, tuple)):
            flat += a
            spec.append(("seq", len(a)))
        elif a is None:
            spec.append(("none",))
        else:
            flat.append(a)
            spec.append(None)
    return tuple(flat), tuple(spec)


def unflatten(flat: tuple[Tensor, ...], spec: tuple) -> list:
    args, i = [], 0
    for s in spec:
        if s is None:
            args.append(flat[i])
            i += 1
        elif s[0] == "cond":
            args.append(Conditioning(**dict(zip(s[1], flat[i:i + len(s[1])]))))
            i += len(s[1])
        elif s[0] == "seq":
            args.append(list(flat[i:i + s[1]]))
            i += s[1]
        else:
            args.append(None)
    return args


def layout_key(flat: tuple[Tensor, ...], spec: tuple) -> tuple:
    """What a captured graph is specific to: the arguments' structure and each tensor's shape, dtype,
    strides and device (and requires_grad, for the training step's graphs)."""
    return spec, tuple((tuple(a.shape), a.dtype, a.stride(), a.device, a.requires_grad) for a in flat)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[Tensor, ...], output: Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class GraphedCall:
    """`fn(*args)` (no grad), replayed from a CUDA graph per input layout after its first call."""

    def __init__(self, fn: Callable[..., Tensor], enabled: bool = True, max_graphs: int = 4):
        self.fn, self.enabled, self.max_graphs = fn, enabled, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def __call__(self, *args) -> Tensor:
        flat, spec = flatten(args)
        if not (self.enabled and flat and all(a.is_cuda for a in flat)) or torch.is_grad_enabled():
            return self.fn(*args)
        key = layout_key(flat, spec)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*args)
            captured = self.graphs[key] = self._capture(flat, spec)
        for static, a in zip(captured.inputs, flat):
            if static.data_ptr() != a.data_ptr():
                static.copy_(a)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, flat: tuple[Tensor, ...], spec: tuple) -> _Captured:
        # Captured on copies of the first inputs: each replay copies its inputs into them.
        static = tuple(a.clone() for a in flat)
        side = torch.cuda.Stream(device=flat[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                  # one eager pass first, off the capture
            self.fn(*unflatten(static, spec))
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.fn(*unflatten(static, spec))
        return _Captured(graph, static, output)
