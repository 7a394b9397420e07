"""An exponential moving average of trained weights, the copy a diffusion model is sampled from.

    ema = EMA(named_params, decay=0.999)
    ... optimizer.step(); ema.update(step)                 # after every optimizer step
    with ema.applied():                                    # the averaged weights in the live tensors
        export(...)                                        # (swapped back on exit, bit-exact)

The average starts equal to the initial weights and its decay warms up as min(decay, (1 + n) / (10 + n))
after n updates (the schedule of diffusers' EMAModel and of Nichol & Dhariwal's code), so the first
steps' random weights fade quickly. The average is kept in fp32 whatever the parameters' dtype.
`state()` names the averaged tensors "ema.<name>" for a checkpoint, as views of the average: a saved
state loads by copying into them (train.jobs.state.TrainingState does).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

PREFIX = "ema."


class EMA:
    def __init__(self, named: Mapping[str, torch.nn.Parameter], decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = list(named)
        self.params = [named[n] for n in self.names]
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_at(self, updates: int) -> float:
        """The decay of the update that follows `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Move the average toward the current weights; `updates` = updates done before this one
        (the optimizer step index), so a resumed run continues the same decay schedule."""
        weight = 1 - self.decay_at(updates)
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)

    def state(self) -> dict[str, Tensor]:
        """The averaged tensors by "ema.<name>", as views of the live average (copy_ into them to load)."""
        return {PREFIX + n: s for n, s in zip(self.names, self.shadow)}

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Inside: the parameters hold the average (in their dtype); on exit their own values, exactly."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, v in zip(self.params, saved):
                p.copy_(v)
