"""The optimizer side of a step: the optimizer and its LR schedule, fp32 master weights for a
bf16/fp16 adapter, the fp16 loss scale, clipping, and `optimizer_step` (unscale -> clip -> step -> schedule).

Optimizers (`optim.optimizer`), the ones LoRA trainers offer (kohya sd-scripts `--optimizer_type`):

    adamw       torch.optim.AdamW; the fused kernel when the parameters are on CUDA (one launch for all
                tensors), the for-loop/foreach default elsewhere (the CPU runs of today, bit for bit)
    adamw8bit   bitsandbytes.optim.AdamW8bit: block-wise 8-bit moments (Dettmers et al. 2022), the
                `[bnb]` extra; the same hyper-parameters as adamw
    prodigy     prodigyopt.Prodigy: AdamW that estimates its own step size d (Mishchenko & Defazio 2023);
                optim.lr is a multiplier of d and should stay near 1.0 (the authors' advice); the
                `[prodigy]` extra
    adafactor   transformers.optimization.Adafactor (Shazeer & Stern 2018) with factored second moments,
                at optim.lr (relative_step, scale_parameter and warmup_init off: the LR schedule here is
                the recipe's, as kohya's docs advise for LoRAs); betas/eps are AdamW's and do not apply

Schedules (`optim.schedule`), each a factor of optim.lr per step, transformers' `get_scheduler`
formulas (transformers/optimization.py) after the warm-up: constant, cosine (half a cosine to 0),
cosine_with_restarts (`restarts` hard restarts), polynomial (to lr_end with `power`; 1 = linear),
linear. The warm-up is this project's since its first version: (step + 1) / warmup_steps, so step 0
trains at lr / warmup_steps (transformers starts at 0, a step that changes nothing), and it applies to
every schedule, constant too (transformers' "constant" ignores warm-up; "constant_with_warmup" is here
the same as "constant", for the name people look for).
"""
from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor

from adapterkit.train.jobs.precision import LossScaler, MasterWeights
from adapterkit.train.jobs.recipe import OptimConfig

logger = logging.getLogger(__name__)


def lr_lambda(cfg: OptimConfig, total: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        if cfg.schedule == "cosine_with_restarts":
            # transformers' get_cosine_with_hard_restarts_schedule_with_warmup: 0 once the run is over
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1 + math.cos(math.pi * ((cfg.restarts * progress) % 1.0)))
        if cfg.schedule == "polynomial":
            # transformers' get_polynomial_decay_schedule_with_warmup: from lr to lr_end as (1 - p)^power
            if cfg.lr == 0:
                return 1.0
            if step > total:
                return cfg.lr_end / cfg.lr
            remaining = 1 - (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
            return ((cfg.lr - cfg.lr_end) * remaining ** cfg.power + cfg.lr_end) / cfg.lr
        return 1.0                                   # constant, constant_with_warmup
    return factor


# The optional optimizers: (module, class, the pyproject extra that installs it).
OPTIONAL = {"adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb"),
            "prodigy": ("prodigyopt", "Prodigy", "prodigy")}


def optional_optimizer(name: str):
    """The class of an optional optimizer, or an ImportError naming the extra that installs it."""
    module, cls, extra = OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ImportError(f"optim.optimizer={name} needs the {module.split('.')[0]} package ({e}): install "
                          f"it with `pip install \"adapterkit[{extra}]\"` (or `pip install "
                          f"{module.split('.')[0]}`), or choose optim.optimizer=adamw") from None


def make_optimizer(cfg: OptimConfig, params: Sequence[torch.nn.Parameter | dict], steps: int):
    """`cfg.optimizer` over `params` (tensors, or parameter groups: dicts with "params") and its LR
    schedule (warm-up, then `cfg.schedule`)."""
    params = list(params)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if cfg.optimizer == "adamw":
        fused = {"fused": True} if tensors and all(t.is_cuda for t in tensors) else {}
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay, **fused)
    elif cfg.optimizer == "adamw8bit":
        optimizer = optional_optimizer("adamw8bit")(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                     weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "prodigy":
        if not 0.1 <= cfg.lr <= 10:
            logger.warning("optim.lr=%g with Prodigy: it multiplies Prodigy's own step-size estimate and "
                           "is meant to stay near 1.0", cfg.lr)
        optimizer = optional_optimizer("prodigy")(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                   weight_decay=cfg.weight_decay)
    else:
        from transformers.optimization import Adafactor
        optimizer = Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                              relative_step=False, warmup_init=False)
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

