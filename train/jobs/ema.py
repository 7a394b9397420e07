"""An exponential moving average of trained weights, the copy a diffusion model is sampled from.

    ema = EMA(named_params, decay=0.999)
    ... optimizer.step(); ema.update(step)                 # after every optimizer step
    with ema.applied():                                    # the averaged weights in the live tensors
        export(...)                                        # (swapped back on exit, bit-exact)

The average starts equal to the initial weights and its decay warms up as min(decay, (1 + n) / (10 + n))
after n updates (the schedule of diffusers' EMAModel and of Nichol & Dhariwal's code), so the first
steps' random weights fade quickly; `warmup=False` uses `decay` from the first update (an adapter that
starts at zero, as a LoRA's B does, is then held near its start for ~1/(1 - decay) steps). The average
is kept in fp32 whatever the parameters' dtype. `state()` names the averaged tensors "ema.<name>" for a
checkpoint, as views of the average: a saved state loads by copying into them
(train.jobs.state.TrainingState does).

An adapter job's recipe section is `EmaConfig` (`ema:` of the LoRA recipe); `averaged(ema, master)`
puts the average into a model trained through fp32 master weights (train/jobs/precision.py).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

PREFIX = "ema."


@dataclass(frozen=True)
class EmaConfig:
    """An EMA of the adapter's weights: exported beside the raw file as <name>_ema (same layout and
    metadata), kept in the checkpoints (resume continues it exactly), optionally the weights samples use."""
    decay: float | None = None           # None: no EMA; e.g. 0.999 averages over ~1000 steps
    warmup: bool = True                  # the decay warms up as min(decay, (1 + n) / (10 + n))
    samples: bool = False                # samples drawn with the EMA weights (else the trained ones)


class EMA:
    def __init__(self, named: Mapping[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = list(named)
        self.params = [named[n] for n in self.names]
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay_at(self, updates: int) -> float:
        """The decay of the update that follows `updates` earlier ones."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

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


@contextmanager
def averaged(ema: EMA | None, master=None) -> Iterator[None]:
    """Inside: the model computes with the average (None: with its own weights). `ema` averages the
    fp32 masters where there are some (`master`, a precision.MasterWeights): they get the average and
    the model's low-precision copies follow; on exit both hold their own values again, exactly."""
    if ema is None:
        with nullcontext():
            yield
        return
    try:
        with ema.applied():
            if master:
                master.master_to_model()
            yield
    finally:
        if master:
            master.master_to_model()      # the model's copies of the restored masters: as before
