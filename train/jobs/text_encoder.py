"""The text encoders' LoRA in a LoRA run (recipe `lora.text_encoder:`), kohya's `text_encoder_lr` /
`stop_text_encoder_training` semantics.

    lora:
      rank: 16
      text_encoder: {enabled: true, lr: [5e-5], stop_after_steps: 300}       # SDXL: lr: [5e-5, 2e-5]

Off by default: the U-Net LoRA trains from cached text embeddings, exactly as before. On:
- every text encoder whose learning rate is not 0 gets a fresh LoRA (adapters/lora_text.py: kohya's
  CLIPAttention + CLIPMLP projections; rank/alpha default to the U-Net LoRA's), named like the U-Net's
  ("default"), so the exported file holds both parts (kohya `lora_te_` / `lora_te1_`/`lora_te2_`,
  diffusers `text_encoder[_2].`) and the sample grid's LoRA scales move both;
- `lr`: () every encoder at optim.lr (kohya without --text_encoder_lr), one value for every encoder,
  or one per encoder in the base's order (SDXL: text_encoder, text_encoder_2); 0 = that encoder is
  not trained. Each encoder's LoRA is its own optimizer parameter group under the recipe's schedule
  (warm-up and decay apply to every group, as in kohya);
- captions are encoded every step through the encoders with grad for their LoRA only (the encoders'
  own weights stay frozen); the cached text embeddings are not used (they are of the encoder
  without its LoRA);
- `stop_after_steps` N > 0: from step N on the text encoders' LoRA is frozen (no gradient, so AdamW
  leaves it and its state as they are; it stays in the checkpoints and the files), and each caption
  is encoded once, without grad, and kept in memory (one caption at a time, so the embedding is the
  same whatever came before: resume stays exact), which gives back the cached-embedding speed;
- under several processes the text-encoder LoRA's gradients are averaged by hand (DDP wraps the U-Net
  only);
- the step's CUDA graph (train.cuda_graphs) is off: its captured U-Net takes no gradient for its
  conditioning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from adapterkit.adapters.adapter import Adapter
from adapterkit.adapters.lora import ADAPTER_PARAM
from adapterkit.adapters.lora_text import TextLoraSpec, add_text_lora
from adapterkit.train.pipeline.base import BaseModel
from adapterkit.train.pipeline.encoding import encode_text
from adapterkit.unet import Conditioning


@dataclass(frozen=True)
class TextEncoderConfig:
    """lora.text_encoder: the text encoders' LoRA (module docstring)."""
    enabled: bool = False
    rank: int | None = None                          # default lora.rank
    alpha: float | None = None                       # default lora.alpha
    targets: Literal["attn", "attn-mlp"] = "attn-mlp"     # attn-mlp = kohya's CLIPAttention + CLIPMLP
    lr: tuple[float, ...] = ()                       # () optim.lr; [x] every encoder; [x1, x2] each; 0 = off
    stop_after_steps: int = 0                        # 0 = trains to the end

    def __post_init__(self):
        if len(self.lr) > 2:
            raise ValueError(f"lr: one value for every text encoder or one per encoder (SDXL has 2), got "
                             f"{len(self.lr)}")
        if self.enabled and self.lr and not any(self.lr):
            raise ValueError("every text-encoder lr is 0, so no text encoder would train: set "
                             "enabled: false, or give an lr > 0")
        if not self.enabled and (self.lr or self.stop_after_steps or self.rank or self.alpha):
            raise ValueError("lr, rank, alpha and stop_after_steps apply when enabled: true")

    def spec(self, rank: int, alpha: float) -> TextLoraSpec:
        return TextLoraSpec(rank=self.rank or rank, alpha=self.alpha or alpha, targets=self.targets)


def encoder_lrs(cfg: TextEncoderConfig, base: BaseModel, default: float) -> dict[str, float]:
    """{component: learning rate} of each text encoder of `base` that trains (lr > 0)."""
    folders = [part.spec.folder for part in base.text]
    lrs = list(cfg.lr) or [default]
    if len(lrs) == 1:
        lrs *= len(folders)
    if len(lrs) != len(folders):
        raise ValueError(f"lora.text_encoder.lr has {len(cfg.lr)} values; this base has {len(folders)} text "
                         f"encoder{'s' if len(folders) > 1 else ''} ({', '.join(folders)}): give one value "
                         "for all or one each")
    return {folder: lr for folder, lr in zip(folders, lrs) if lr > 0}


@dataclass(frozen=True)
class WithTextEncoders(Adapter):
    """The U-Net's adapter plus the text encoders' LoRA, as one adapter for `prepare_training`: its
    trainable tensors and its checkpoint state are the U-Net's and, named `<component>.<parameter>`,
    the encoders' LoRA tensors (frozen ones too: after stop_after_steps they must still resume)."""
    encoders: tuple[tuple[str, nn.Module], ...] = ()

    def _text(self, trainable_only: bool) -> dict[str, nn.Parameter]:
        return {f"{folder}.{n}": p for folder, enc in self.encoders for n, p in enc.named_parameters()
                if ADAPTER_PARAM.search(n) and (p.requires_grad or not trainable_only)}

    def trainable(self) -> dict[str, nn.Parameter]:
        return super().trainable() | self._text(True)

    def state(self) -> dict[str, Tensor]:
        return super().state() | self._text(False)


@dataclass
class TextEncoderTraining:
    """The text encoders' LoRA of one run: built by `attach`, asked by the step for the captions'
    conditioning (`conditioning`), then for its gradients (`after_backward`)."""
    cfg: TextEncoderConfig
    base: BaseModel
    lrs: dict[str, float]                            # component -> lr, the encoders that train
    memo: dict[str, Conditioning] = field(default_factory=dict)

    @classmethod
    def attach(cls, cfg: TextEncoderConfig, base: BaseModel, rank: int, alpha: float, default_lr: float,
               device: torch.device) -> TextEncoderTraining:
        """A fresh LoRA on each encoder that trains (call after the U-Net's, under the same seed: the
        init is drawn from the global generator), the encoders on `device`."""
        lrs = encoder_lrs(cfg, base, default_lr)
        for part in base.text:
            part.model.to(device)
            if part.spec.folder in lrs:
                # read at its penultimate layer with no pooled output (SDXL's first): its last layer's
                # output is never used, so it gets no LoRA (kohya's sdxl_train freezes that layer too)
                unused = part.spec.layer == "penultimate" and not part.spec.pooled
                layers = part.model.config.num_hidden_layers - 1 if unused else None
                add_text_lora(part.model, cfg.spec(rank, alpha), "default", layers=layers)
        return cls(cfg, base, lrs)

    @property
    def encoders(self) -> dict[str, nn.Module]:
        return {part.spec.folder: part.model for part in self.base.text if part.spec.folder in self.lrs}

    def adapter(self, unet_adapter: Adapter) -> WithTextEncoders:
        return WithTextEncoders(unet_adapter.module, unet_adapter.what, unet_adapter.owns,
                                unet_adapter.keeps_frozen, tuple(self.encoders.items()))

    def lr_of(self, name: str) -> float | None:
        """The learning rate of a `WithTextEncoders` parameter name (None: the recipe's optim.lr)."""
        return self.lrs.get(name.split(".", 1)[0])

    def trains_at(self, step: int) -> bool:
        return not self.cfg.stop_after_steps or step < self.cfg.stop_after_steps

    def set_step(self, step: int) -> None:
        """Freeze the encoders' LoRA from stop_after_steps on (a pure function of the step: resume-exact)."""
        on = self.trains_at(step)
        for encoder in self.encoders.values():
            for n, p in encoder.named_parameters():
                if ADAPTER_PARAM.search(n):
                    p.requires_grad_(on)

    def conditioning(self, captions: list[str], step: int, varies: bool) -> Conditioning:
        """The captions' text conditioning through the LoRA'd encoders: with grad while they train, else
        without, one caption at a time, kept in memory unless captions vary from draw to draw."""
        self.set_step(step)
        if self.trains_at(step):
            return encode_text(self.base, list(captions))
        rows = []
        with torch.no_grad():
            for c in captions:
                row = self.memo[c] if c in self.memo else encode_text(self.base, [c])
                if not varies:
                    self.memo[c] = row
                rows.append(row)
        return Conditioning.cat(rows)

    def after_backward(self, accelerator: Accelerator, step: int) -> None:
        """Average the encoders' LoRA gradients over the processes, then (steps 1 and 2) check that
        every one got a gradient (B at step 1, A and B at step 2: B starts at zero)."""
        params = [(f"{f}.{n}", p) for f, enc in self.encoders.items() for n, p in enc.named_parameters()
                  if ADAPTER_PARAM.search(n) and p.requires_grad]
        if accelerator.num_processes > 1:
            for _, p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        if step > 1 or not params:
            return
        checked = [(n, p) for n, p in params if step == 1 or ".lora_B." in n]
        dead = [n for n, p in checked if p.grad is None or not p.grad.any()]
        if dead and all(torch.isfinite(p.grad).all() for _, p in params if p.grad is not None):
            raise RuntimeError(f"{len(dead)} text-encoder LoRA tensors got no gradient at step {step + 1}, "
                               f"e.g. {dead[:3]}: they would never train. This is a bug (a detached "
                               "conditioning); please report it with your config.")
