"""The optimizer side of a step: AdamW and its LR schedule, fp32 master weights for a bf16/fp16
adapter, the fp16 loss scale, clipping, and `optimizer_step` (unscale -> clip -> step -> schedule)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.recipe import OptimConfig


def lr_lambda(cfg: OptimConfig, total: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def make_optimizer(cfg: OptimConfig, params: Sequence[torch.nn.Parameter], steps: int):
    """AdamW over `params` and its LR schedule (warmup, then constant / cosine / linear)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))


def adapter_master_weights(params: list[torch.nn.Parameter], base_dtype: torch.dtype,
                           compute: str) -> MasterWeights | None:
    """With a bf16/fp16 base and adapter_compute="base": the adapter tensors drop to the base dtype
    (no fp32 copies of every activation in the adapter branch) and fp32 masters go to the optimizer."""
    if compute == "fp32" or base_dtype == torch.float32:
        return None
    for p in params:
        p.data = p.data.to(base_dtype)
    return MasterWeights(params)


def use_loss_scaling(base_dtype: torch.dtype) -> LossScaler | None:
    """With an fp16 base: a `LossScaler` for this job (hand it to the job's TrainingState, which keeps it
    in the checkpoints).

    The backward pass runs through the frozen fp16 U-Net whatever train.adapter_compute is, so its
    gradients underflow there either way. bf16 and fp32 get None and train exactly as without it."""
    return LossScaler() if base_dtype == torch.float16 else None


def scale_loss(scaler: LossScaler | None, loss: Tensor) -> Tensor:
    """The loss to backpropagate: `loss` times the loss scale, or `loss` itself without a scaler."""
    return loss if scaler is None else scaler.scale_loss(loss)


def full_precision_state(named: dict[str, torch.nn.Parameter],
                         master: MasterWeights | None) -> dict[str, Tensor]:
    """The trained tensors by name at full precision (the fp32 masters when there are some), as
    detached views of the live tensors (copy_ into them to load)."""
    if master:
        by_id = {id(p): m for p, m in zip(master.model_params, master.params)}
        named = {n: by_id.get(id(p), p) for n, p in named.items()}
    return {n: p.detach().contiguous() for n, p in named.items()}


def optimizer_step(accelerator: Accelerator, optimizer, lr_schedule, params: Sequence[torch.nn.Parameter],
                   master: MasterWeights | None, max_grad_norm: float,
                   scaler: LossScaler | None = None) -> bool:
    """Gradients to the masters, unscale (with a scaler), clip, step, masters back into the model,
    schedule, zero_grad. Returns False when the scaled fp16 gradients overflowed: then only the scaler
    changed (backed off) and the gradients are cleared; weights, optimizer and LR schedule are as before."""
    if master:
        master.grads_to_master()
    grads = master.params if master else params
    if scaler:
        finite = scaler.unscale_(grads)
        if accelerator.num_processes > 1:       # the same decision everywhere (DDP's gradients agree anyway)
            finite = accelerator.reduce(torch.tensor(float(not finite), device=accelerator.device),
                                        reduction="sum").item() == 0
        scaler.update(finite)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            return False
    clip(accelerator, grads, max_grad_norm)
    optimizer.step()
    if master:
        master.master_to_model()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def clip(accelerator: Accelerator, params, max_norm: float) -> None:
    if max_norm > 0:
        accelerator.clip_grad_norm_(params, max_norm)

