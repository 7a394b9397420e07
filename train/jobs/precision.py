"""fp32 master weights for adapter parameters that compute in bf16/fp16, and loss scaling for fp16.

Mixed-precision training (Micikevicius et al. 2018, "Mixed Precision Training", §3.1): the model's
copies of the trainable tensors are low precision, so the adapter branch runs at the base's speed
and keeps its saved activations in bf16; the optimizer sees fp32 copies, so small updates are not
rounded away (a bf16 weight cannot move by less than 2^-8 of itself). After each step the fp32
weights are rounded back into the model. An fp16 backward pass also needs its loss scaled (§3.2:
`LossScaler`), or small gradients underflow to zero; bf16 has fp32's exponent range and needs none.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter]):
        self.model_params = list(params)
        self.params = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        self._grads: list[torch.Tensor | None] = [None] * len(self.params)   # the masters' .grad buffers

    def grads_to_master(self) -> None:
        # One foreach copy (casting) for all tensors, not a cast per tensor: a LoRA has hundreds. Into
        # buffers made once and lent to `.grad` each step (zero_grad(set_to_none) only drops the
        # reference): no allocations per step.
        pairs = [(m, p) for m, p in zip(self.params, self.model_params) if p.grad is not None]
        for i, (m, p) in enumerate(zip(self.params, self.model_params)):
            if p.grad is not None and self._grads[i] is None:
                self._grads[i] = torch.empty_like(m)
            m.grad = None if p.grad is None else self._grads[i]
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


@dataclass
class LossScaler:
    """Dynamic loss scaling for a backward pass in fp16 (Micikevicius et al. 2018, §3.2).

    fp16 flushes magnitudes below 2^-24 to zero, and the gradients of a fine-tune (an adapter's, its
    activations', through a frozen U-Net) sit largely there: unscaled, whole LoRA tensors get exactly zero.
    The loss is multiplied by `scale` before backward, which shifts every gradient up into fp16's range;
    the gradients are divided by it again (in fp32, on the masters) before clipping and the optimizer.
    A scale too large overflows to inf/NaN: that step's gradients are thrown away and the scale is
    multiplied by `backoff_factor`; after `growth_interval` clean steps it is multiplied by
    `growth_factor`, so it stays near the largest scale that does not overflow. bf16 has fp32's range
    and needs none. Powers of two keep scaling exact (only the exponent changes)."""
    scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0          # overflowing below this is not a scale problem (see `too_small`)
    clean_steps: int = 0            # since the last overflow or growth
    overflows: int = 0              # over the whole run, for the logs

    def __post_init__(self):
        if not (self.scale > 0 and self.growth_factor > 1 and 0 < self.backoff_factor < 1
                and self.growth_interval >= 1):
            raise ValueError(f"a loss scaler needs scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                             f"growth_interval >= 1, got {self}")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: Sequence[nn.Parameter]) -> bool:
        """Divide the gradients of `params` by the scale, in place; False when any of them holds an
        inf or NaN (the step overflowed: its gradients are garbage and must not be applied)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        found, inv = torch.zeros(1, device=grads[0].device), torch.full((1,), 1 / self.scale,
                                                                        device=grads[0].device)
        # One fused pass (the kernel torch.amp.GradScaler uses) over hundreds of LoRA tensors.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        return not found.item()

    def update(self, finite: bool) -> None:
        """After a step: back off on an overflow, grow after `growth_interval` clean steps."""
        if not finite:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.overflows += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    @property
    def too_small(self) -> bool:
        """The gradients overflow fp16 even (almost) unscaled: a diverging model, not a scale to tune."""
        return self.scale < self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values; ValueError for anything else (a checkpoint's JSON is input)."""
        if not isinstance(state, dict) or state.keys() != {"scale", "clean_steps", "overflows"}:
            raise ValueError(f"a loss scaler state is {{scale, clean_steps, overflows}}, got {state!r:.80}")
        scale, clean, overflows = state["scale"], state["clean_steps"], state["overflows"]
        counts = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (clean, overflows))
        if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0 and counts):
            raise ValueError(f"a loss scaler state needs a finite scale > 0 and counts >= 0, got {state}")
        self.scale, self.clean_steps, self.overflows = scale, clean, overflows


# -- whose precision: the recipe's ------------------------------------------------------------------
#
# `accelerate launch --mixed_precision bf16`, or the default file `accelerate config` writes (which
# `accelerate launch` reads), reach a script as ACCELERATE_MIXED_PRECISION; an Accelerator built
# without `mixed_precision=` takes it and wraps the prepared model's forward in autocast (fp16 adds
# its GradScaler), so an fp32 recipe would silently train in bf16. The jobs manage precision
# themselves (the base's dtype, fp32 masters, the loss scale above) and always pass
# mixed_precision="no" (loop.make_accelerator); an outside request is mapped onto the recipe where
# the recipe left the choice open, and refused where it says otherwise.

OUTSIDE_PRECISION = "ACCELERATE_MIXED_PRECISION"


class PrecisionConflict(ValueError):
    """An outside precision request that contradicts the recipe (a ValueError: exit status 2)."""


def outside_precision() -> str | None:
    """What accelerate was asked for from outside the recipe ("bf16", "fp16", "fp8"), None for none
    ("no", accelerate's default, or unset)."""
    value = os.environ.get(OUTSIDE_PRECISION, "").strip().lower()
    return None if value in ("", "no") else value


def _where(field: str) -> str:
    return (f"accelerate asks for mixed precision {outside_precision()!r} ({OUTSIDE_PRECISION}, from "
            f"`accelerate launch --mixed_precision` or the `accelerate config` default file), but the "
            f"recipe's {field}")


def settle_precision(cfg):
    """`cfg` with an outside request mapped onto it, and the line that says so (None: nothing to say);
    a PrecisionConflict when the recipe says otherwise. Adapter jobs: model.dtype "auto" takes bf16 or
    fp16 (the base in that dtype, fp32 adapter masters); an explicit dtype must agree. Pretrain
    (train.mixed_precision bf16 | no): bf16 must agree; "no" and fp16 are refused."""
    asked = outside_precision()
    if asked is None:
        return cfg, None
    fix = ("run without --mixed_precision (or with --mixed_precision no; `accelerate config` can set "
           "its default to no), or")
    model = getattr(cfg, "model", None)
    if hasattr(model, "dtype"):
        if asked not in ("bf16", "fp16"):
            raise PrecisionConflict(f"{_where('model.dtype')} cannot be {asked}: {fix} set model.dtype to "
                                    "bf16, fp16 or fp32")
        if model.dtype == asked:
            return cfg, None
        if model.dtype == "auto":
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(model, dtype=asked))
            return cfg, (f"precision: model.dtype auto -> {asked}, as accelerate was asked "
                         f"({OUTSIDE_PRECISION}={asked}); the adapter keeps fp32 master weights")
        raise PrecisionConflict(f"{_where('model.dtype')} is {model.dtype}: adapterkit trains at the "
                                f"recipe's precision; {fix} set model.dtype={asked} to train in {asked}")
    train = getattr(cfg, "train", None)
    if hasattr(train, "mixed_precision"):
        if asked == train.mixed_precision:
            return cfg, None
        raise PrecisionConflict(f"{_where('train.mixed_precision')} is {train.mixed_precision}: {fix} set "
                                f"train.mixed_precision={'bf16' if asked == 'bf16' else 'no'}")
    raise PrecisionConflict(f"accelerate asks for mixed precision {asked!r} ({OUTSIDE_PRECISION}), and "
                            "this recipe has no precision key to take it: run without --mixed_precision")


def check_outside_precision(cfg) -> None:
    """Refuse an outside request that `cfg` does not already follow (settle_precision mapped nothing)."""
    settled, note = settle_precision(cfg)
    if note is not None:
        raise PrecisionConflict(f"{_where('model.dtype')} is auto: set model.dtype={outside_precision()} to "
                                "train in it (the command line maps it for you), or run without "
                                "--mixed_precision")
