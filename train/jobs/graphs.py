"""The GPU layout and launch path of a training step: channels-last tensors and CUDA graphs.

Two things make a small-batch step on a fast GPU slower than its kernels:

- layout: cuDNN convolves in NHWC and transposes NCHW tensors in and out of every convolution.
  `channels_last(module, device)` (train/pipeline/graphed.py) keeps a U-Net (or ControlNet)
  channels-last on CUDA, where unet/kernels.py normalises NHWC tensors without the copy PyTorch's
  GroupNorm makes.
- launches: an SD1.5 step issues several thousand kernels, and Python spends ~0.1 s issuing them
  (measured on the H200's host: a batch-2 16x16 LoRA step takes 0.12 s, almost all of it host
  time). At batch 8 that is as long as the GPU work, so the GPU idles half the step.
  `GraphedStep` captures the forward and backward once per input shape as CUDA graphs
  (torch.cuda.make_graphed_callables) and replays them: one launch each.

`GraphedStep(module, enabled)` is a drop-in for `module(*args)` in a training step. The graphed pair
computes what the module computes (its kernels, replayed; libraries may pick other algorithms while
capturing, so sums can round differently); the capture takes copies of the first inputs, and each
replay copies its inputs into them. Gradients still accumulate into
`.grad` through autograd, so gradient accumulation, clipping, the optimizer and the gradient checks
are unchanged. It falls back to the plain call (and says why, once) when graphs cannot work: not
CUDA, several processes (DDP hooks run per step), gradient checkpointing, no grad, or more input
shapes than `max_graphs`. The graphs of all shapes share one memory pool: a step runs one graph's
forward and backward to completion before another graph runs, so their activations may occupy the
same memory, and aspect-ratio buckets cost about the largest bucket's activations, not their sum.

Gradient accumulators. Autograd routes a parameter's gradient through its AccumulateGrad node, and
torch (2.11) remembers the stream that node was made on: a backward pass on another stream first
synchronises with it. A node made on the default stream (the first eager forward of the module) and
kept alive by any autograd graph still around (a retained loss, the previous micro-batch's output)
makes a later capture wait on the default stream, which invalidates the capture ("operation failed
due to a previous error during capture", raised by the next kernel launch, often the Triton GEGLU).
So a GraphedStep makes the accumulators of the trained parameters itself, on a side stream, before
anything else can, and keeps them for its lifetime: captures then only ever wait on that stream.

The caller keeps the rules of CUDA graphs: parameters are updated in place (optimizers, and
`train.precision.MasterWeights` do) and never replaced; the module has no data-dependent control
flow or host synchronisation in its forward (our U-Net has none; the ControlNet's hint check skips
its value test while a graph is being captured).
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from adapterkit.train.pipeline.graphed import flatten, layout_key, unflatten
from adapterkit.unet import Conditioning, kernels


class _Call(nn.Module):
    """A fresh module around `inner` for each captured shape (make_graphed_callables patches the
    forward of the module it is given). It takes the flat tensors of `flatten` and calls `inner`
    with the arguments they came from (a Conditioning rebuilt from its fields)."""

    def __init__(self, inner: nn.Module, spec: tuple):
        super().__init__()
        self.inner, self.spec = inner, spec

    def forward(self, *flat: Tensor) -> Tensor:
        return self.inner(*unflatten(flat, self.spec))


def _pinned_accumulators(module: nn.Module) -> list:
    """The AccumulateGrad nodes of `module`'s trained parameters, made on a side stream (see the module
    docstring); holding their gradient edges keeps them alive. Parameters already holding one keep it."""
    trained = [p for p in module.parameters() if p.requires_grad]
    if not any(p.is_cuda for p in trained):
        return []
    with torch.cuda.stream(torch.cuda.Stream(device=trained[0].device)):
        return [torch.autograd.graph.get_gradient_edge(p) for p in trained]


class GraphedStep:
    """`module(*args)` for a training step, replayed from CUDA graphs after the first call per shape."""

    def __init__(self, module: nn.Module, enabled: bool = True, max_graphs: int = 8):
        self.module, self.max_graphs = module, max_graphs
        self.enabled = enabled
        self.graphs: dict[tuple, nn.Module] = {}
        self.why_not: str | None = None
        self.reserved_bytes = 0       # device memory the captures reserved (their pool and static tensors)
        self.capture_seconds: list[float] = []     # per captured shape: its warm-up passes and capture
        self._pool = None             # the memory pool all captures share (made at the first capture)
        self._hooks: list = []        # gradient-cloning hooks on the trained parameters (see __call__)
        self._accumulators = _pinned_accumulators(module) if enabled else []

    @classmethod
    def for_training(cls, module: nn.Module, wanted: bool, device: torch.device, processes: int,
                     checkpointing: bool) -> GraphedStep:
        """Enabled when `wanted` and the run allows it; otherwise `why_not` says what prevents it."""
        reason = None
        if not wanted:
            reason = "train.cuda_graphs is off"
        elif device.type != "cuda":
            reason = f"the device is {device.type}, not CUDA"
        elif processes > 1:
            reason = f"{processes} processes (DDP runs its hooks every step)"
        elif checkpointing:
            reason = "gradient checkpointing recomputes the forward inside the backward"
        step = cls(module, enabled=reason is None)
        step.why_not = reason
        return step

    @classmethod
    def for_job(cls, module: nn.Module, train, accelerator) -> GraphedStep:
        """`for_training` with a job's LoopConfig and Accelerator; on CUDA the main process says
        whether graphs are on and, if not, why."""
        step = cls.for_training(module, train.cuda_graphs, accelerator.device, accelerator.num_processes,
                                train.gradient_checkpointing)
        if accelerator.is_main_process and accelerator.device.type == "cuda":
            print(step.describe(), flush=True)
        return step

    def __call__(self, *args: Tensor | Conditioning) -> Tensor:
        if not self.enabled or not torch.is_grad_enabled():
            return self.module(*args)
        flat, spec = flatten(args)
        key = layout_key(flat, spec)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                if self.why_not is None:
                    self.why_not = (f"more than {self.max_graphs} input shapes; the others run without "
                                    "graphs")
                    print(f"CUDA graphs: {self.why_not}", flush=True)
                return self.module(*args)
            # Capturing empties the allocator's cache first (torch.cuda.graph does); empty it here too
            # so that `before` holds live memory only and the difference is what the capture keeps.
            t0, (_, compile_s) = time.perf_counter(), kernels.compile_stats()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved()
            # Captured on copies: each replay copies its inputs into the captured tensors, which must
            # not be the caller's (the first batch would be overwritten by every later one).
            static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in flat)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # Warm-up passes before the capture: three for the first shape (lazy initialisation of
            # cuBLAS/cuDNN, the Triton kernels' compiles), one for each later one, which only has its
            # own workspaces to allocate (the kernels take any shape: unet/kernels.py).
            graphed = torch.cuda.make_graphed_callables(_Call(self.module, spec), static,
                                                        num_warmup_iters=1 if self.graphs else 3,
                                                        allow_unused_input=True, pool=self._pool)
            torch.cuda.synchronize()
            self.reserved_bytes += torch.cuda.memory_reserved() - before
            self.graphs[key] = graphed
            seconds, kernel_s = time.perf_counter() - t0, kernels.compile_stats()[1] - compile_s
            self.capture_seconds.append(seconds)
            print(f"CUDA graphs: captured input shape {tuple(flat[0].shape)} in {seconds:.2f} s (Triton "
                  f"kernels compiled or loaded in {kernel_s:.2f} s of it)", flush=True)
            if not self._hooks:
                # A replay hands out the parameters' gradients in the graph's own buffers, and autograd
                # keeps such a tensor as `.grad` instead of copying it: the next replay (the next
                # micro-batch of an accumulated step) would overwrite it. Each gradient is cloned first.
                self._hooks = [p.register_hook(torch.clone) for p in self.module.parameters()
                               if p.requires_grad]
        return graphed(*flat)

    def describe(self) -> str:
        return "CUDA graphs: on (forward and backward replayed per input shape)" if self.enabled \
            else f"CUDA graphs: off ({self.why_not})"
