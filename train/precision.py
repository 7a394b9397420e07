"""fp32 master weights for adapter parameters that compute in bf16/fp16.

Mixed-precision training (Micikevicius et al. 2018, "Mixed Precision Training", §3.1): the model's
copies of the trainable tensors are low precision, so the adapter branch runs at the base's speed
and keeps its saved activations in bf16; the optimizer sees fp32 copies, so small updates are not
rounded away (a bf16 weight cannot move by less than 2^-8 of itself). After each step the fp32
weights are rounded back into the model.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter]):
        self.model_params = list(params)
        self.params = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]

    def grads_to_master(self) -> None:
        # One foreach copy (casting) for all tensors, not a cast per tensor: a LoRA has hundreds.
        pairs = [(m, p) for m, p in zip(self.params, self.model_params) if p.grad is not None]
        for m, p in zip(self.params, self.model_params):
            m.grad = None if p.grad is None else torch.empty_like(m)
        if pairs:
            torch._foreach_copy_([m.grad for m, _ in pairs], [p.grad for _, p in pairs])
        for p in self.model_params:
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        if self.params:
            torch._foreach_copy_(self.model_params, self.params)

    @contextmanager
    def full_precision(self):
        """Inside, the model's adapter tensors are the fp32 masters (for exporting them exactly)."""
        saved = [p.data for p in self.model_params]
        for m, p in zip(self.params, self.model_params):
            p.data = m.data
        try:
            yield
        finally:
            for p, data in zip(self.model_params, saved):
                p.data = data

    def wrap(self, optimizer: torch.optim.Optimizer) -> _MasterOptimizer:
        return _MasterOptimizer(self, optimizer)


class _MasterOptimizer:
    """An optimizer over the master weights that reads the model's gradients and writes its weights."""

    def __init__(self, master: MasterWeights, optimizer: torch.optim.Optimizer):
        self.master, self.optimizer = master, optimizer

    def step(self) -> None:
        self.master.grads_to_master()
        self.optimizer.step()
        self.master.master_to_model()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.master.model_params:
            p.grad = None
