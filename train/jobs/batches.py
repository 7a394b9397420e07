"""Micro-batches: which pictures a (step, micro-batch, process) gets, their noised latents and their
conditioning.

The batch order is a pure function of (seed, epoch) and every random draw of step s comes from a
generator seeded by (seed, s, micro-batch, process): what makes resume exact.

Conditioning: each caption's text from the cache (context, and SDXL's pooled text), and for a U-Net
with size/crop ids (SDXL) each picture's own: its original size, its crop's top-left in the resized
picture and its bucket (`train.data.buckets.size_conditioning`, the SDXL paper's micro-conditioning as
diffusers' and kohya's SDXL scripts compute it), from the crop `describe` gives.

On CUDA a job makes each micro-batch one ahead (`BatchPrefetch`): while the GPU runs micro-batch n,
the host reads n + 1 from the cache and its copies and random draws are queued on a side stream, so
the step finds its inputs on the GPU and the copies overlap the compute."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adapterkit.train.data.buckets import size_conditioning
from adapterkit.train.data.cache import LatentCache
from adapterkit.train.data.folder import CaptionedImageFolder
from adapterkit.train.jobs.recipe import LoopConfig
from adapterkit.train.pipeline.base import BaseModel
from adapterkit.train.pipeline.schedule import NoiseSchedule, offset_noise
from adapterkit.train.pipeline.transfer import to_device
from adapterkit.unet import Conditioning


class BatchPlan:
    """Which dataset keys micro-batch (step, micro) of process `rank` gets: global micro-batch
    n = (step * accum + micro) * world + rank walks the epochs' batch lists in order."""

    def __init__(self, dataset: CaptionedImageFolder, batch_size: int, accum: int, world: int, rank: int):
        self.sampler = dataset.batch_sampler(batch_size)
        self.per_epoch = len(self.sampler)
        self.accum, self.world, self.rank = accum, world, rank
        self._epoch, self._batches = -1, []

    def keys(self, step: int, micro: int) -> list[tuple[int, ...]]:
        n = (step * self.accum + micro) * self.world + self.rank
        epoch, i = divmod(n, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.epoch_batches(epoch)
        return [self.sampler.key(epoch, slot) for slot in self._batches[i]]

    def seed(self, base_seed: int, step: int, micro: int) -> int:
        return int(np.random.SeedSequence([base_seed, step, micro, self.rank]).generate_state(1)[0])


@dataclass
class MicroBatch:
    """One micro-batch, ready for the model: latents are fp32, `noisy` and `cond` in `dtype`."""
    keys: list[tuple[int, ...]]             # dataset keys: (epoch, index) or (epoch, index, copy)
    samples: list[dict]                # dataset.describe(key) of each: caption, crop, identity
    latents: Tensor                    # (B, C, h, w) clean
    cond: Conditioning                 # context (B, L, D); pooled and time ids where the family has them
    noise: Tensor
    t: Tensor                          # (B,) int64
    noisy: Tensor
    weights: Tensor | None = None      # (B,) fp32 per-sample loss factors (reg pictures); None: all 1


def noisy_batch(dataset: CaptionedImageFolder, plan: BatchPlan, cache: LatentCache, base: BaseModel,
                schedule: NoiseSchedule, loop: LoopConfig, step: int, micro: int, device: torch.device,
                dtype: torch.dtype, text: Callable[[list[str]], Conditioning] | None = None) -> MicroBatch:
    """Micro-batch `micro` of `step`: latents and caption embeddings from the cache, then noise and
    timesteps, every draw from the (seed, step, micro, process) generator in a fixed order.
    `text`: the captions' text conditioning from elsewhere than the cache (a text encoder that trains,
    train/jobs/text_encoder.py); it draws nothing from the generator."""
    keys = plan.keys(step, micro)
    samples = [dataset.describe(k) for k in keys]
    batch = {k: [s[k] for s in samples] for k in samples[0]}
    batch["pixel_values"] = lambda keys=keys: torch.stack([dataset[k]["pixel_values"] for k in keys])
    g = torch.Generator(device).manual_seed(plan.seed(loop.seed, step, micro))
    latents = cache.latents(base, batch, dataset.cfg, generator=g, device=device).float()
    text = (text(batch["caption"]).to(device) if text is not None else
            cache.text(base, batch["caption"], device=device, store=not dataset.cfg.varies_captions))
    cond = picture_conditioning(base, text, samples).to(dtype)
    noise = offset_noise(latents.shape, loop.noise_offset, g, device)
    t = schedule.sample_timesteps(len(latents), g, device, loop.timesteps())
    noisy = schedule.add_noise(latents, noise, t).to(dtype)
    return MicroBatch(keys, samples, latents, cond, noise, t, noisy, loss_weights(samples, device))


def loss_weights(samples: list[dict], device: torch.device) -> Tensor | None:
    """The samples' loss factors (`loss_weight`: regularisation pictures of data.datasets, their
    prior_loss_weight), or None when every one is 1 (one dataset, or a batch without reg pictures)."""
    w = [float(s.get("loss_weight", 1.0)) for s in samples]
    return None if all(x == 1.0 for x in w) else to_device(torch.tensor(w, dtype=torch.float32), device)



def picture_conditioning(base: BaseModel, text: Conditioning, samples: list[dict]) -> Conditioning:
    """The captions' text conditioning with each picture's size/crop ids added, where the U-Net takes
    them: (B, 6) int64 (original h, w, crop top, left, target h, w), exact whatever the model's dtype."""
    if not base.time_ids:
        return text
    if base.time_ids != 6:
        raise ValueError(f"the U-Net takes {base.time_ids} size/crop ids per picture; training knows "
                         "SDXL's 6 (original size, crop top-left, target size)")
    ids = torch.tensor([size_conditioning(s["size"], s["crop"]) for s in samples], dtype=torch.int64)
    return dataclasses.replace(text, time_ids=to_device(ids, text.device))


class BatchPrefetch:
    """A job's micro-batches, each made one ahead on a side CUDA stream.

    `make(step, micro)` makes a micro-batch (tensors on the device). A job's step asks for its
    micro-batches in order (`get`) and, once the forward and backward of one are queued, calls
    `prefetch(step, micro)`: the next one (micro + 1, or the next step's first) is made then, under a
    side stream, while the GPU is still busy. `get` makes the current stream wait for that stream's
    event and marks the tensors as used there (`record_stream`, so their memory is not reused early).
    A micro-batch depends on (step, micro) only (every draw comes from its own generator), so making
    it ahead gives the same tensors; a request for another one (the fp16 retry of a step, a resume)
    makes it on the spot. Off CUDA nothing is made ahead: `get` is `make`."""

    def __init__(self, make: Callable[[int, int], Any], accum: int, steps: int, device: torch.device):
        self.make, self.accum, self.steps = make, accum, steps
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[tuple[int, int], Any, torch.cuda.Event] | None = None

    def get(self, step: int, micro: int) -> Any:
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != (step, micro):
            return self.make(step, micro)
        _, batch, ready = ahead
        stream = torch.cuda.current_stream()
        stream.wait_event(ready)
        for t in _tensors(batch):
            if t.is_cuda:
                t.record_stream(stream)
        return batch

    def prefetch(self, step: int, micro: int) -> None:
        """Start making the micro-batch that follows (step, micro), if there is one to make."""
        following = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        if self.stream is None or following[0] >= self.steps:
            return
        with torch.cuda.stream(self.stream):
            batch = self.make(*following)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self._ahead = (following, batch, ready)


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a micro-batch: in its dataclass fields, conditioning records, tuples and lists."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Conditioning):
        yield from value.tensors().values()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
