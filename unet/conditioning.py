"""The conditioning record: everything the U-Net sees besides the noisy sample and the timestep.

SD1.x/SD2.x condition on text hidden states alone; SDXL adds the pooled text embedding of its second
encoder and six size/crop ids. One record carries them through caches, batches, samplers and the
ControlNet, so that a family with more conditioning adds a field here instead of an argument to every
function on the way:

    cond = Conditioning(context)                              # SD1.x / SD2.x
    cond = Conditioning(context, pooled=pooled, time_ids=ids)  # SDXL
    unet(sample, t, cond)                                      # a bare context Tensor works too
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    context: Tensor                   # (B, tokens, context_dim) text hidden states
    pooled: Tensor | None = None      # (B, pooled_dim) pooled text embedding (SDXL `text_embeds`)
    time_ids: Tensor | None = None    # (B, 6) original size, crop top-left, target size (SDXL)

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def __len__(self) -> int:
        return self.batch

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors().items()}

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name (what a cache stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """`fn` applied to every field that is set."""
        return Conditioning(**{name: fn(t) for name, t in self.tensors().items()})

    def to(self, *args: torch.device | str | torch.dtype, non_blocking: bool = False,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved and (floating fields only) cast, called as a Tensor's `to`: `to(dtype)`,
        `to(device)`, `to(device, dtype)` or by keyword; integer-valued ids keep their dtype."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a

        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self.map(move)

    def __getitem__(self, index) -> Conditioning:
        """Rows of the batch: `cond[2:4]`, `cond[mask]`."""
        return self.map(lambda t: t[index])

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated n times in place ([a, b] -> [a, a, b, b]), as samplers batch images."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenated along the batch; every item must set the same fields."""
        names = [tuple(c.tensors()) for c in items]
        if len(set(names)) != 1:
            raise ValueError(f"cannot concatenate conditionings with different fields: {sorted(set(names))}")
        return Conditioning(**{name: torch.cat([c.tensors()[name] for c in items]) for name in names[0]})


def as_conditioning(cond: Conditioning | Tensor) -> Conditioning:
    """A Conditioning from either a Conditioning or a bare (B, tokens, D) context tensor."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)
