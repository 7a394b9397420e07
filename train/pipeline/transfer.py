"""Host-to-device copies that do not stall the GPU's queue.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory is a synchronous copy: PyTorch waits
for the copy, which the driver queues behind every kernel already issued on the stream, so the host
waits for the GPU to finish the work in flight before it can issue the next kernel. In a training
loop that is a full GPU->CPU synchronisation per tensor moved, and the GPU then idles while the host
prepares and launches the next step. Copied from page-locked (pinned) memory with
`non_blocking=True`, the copy is queued like a kernel and the host goes on at once; PyTorch's
caching host allocator keeps the pinned block until the copy has run (it records an event on the
copying stream), so the source may be dropped right away.

Elsewhere (CPU, MPS) these are the plain `.to(device)`: same values, same tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from adapterkit.unet import Conditioning


def to_device(t: Tensor, device: torch.device | str | None) -> Tensor:
    """`t` on `device`; a CPU tensor bound for CUDA goes through pinned memory, without a sync."""
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def stack_to_device(tensors: list[Tensor], device: torch.device | str | None) -> Tensor:
    """torch.stack(tensors) on `device` (CPU tensors stacked straight into pinned memory for CUDA)."""
    device = torch.device(device) if device is not None else tensors[0].device
    if device.type != "cuda" or tensors[0].device.type != "cpu":
        return torch.stack(tensors).to(device)
    shape = (len(tensors), *tensors[0].shape)
    pinned = torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True)
    torch.stack(tensors, out=pinned)
    return pinned.to(device, non_blocking=True)


def conditioning_to_device(cond: Conditioning, device: torch.device | str | None) -> Conditioning:
    """Every field of `cond` on `device` (`to_device`)."""
    return cond.map(lambda t: to_device(t, device))
