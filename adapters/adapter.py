"""The adapter interface: what a training job trains on a frozen U-Net, whatever its kind.

    adapter = attach_layers(unet, spec)          # LoRA, LoCon, LoHa, LoKr, DoRA: inside the U-Net's layers
    adapter = beside(controlnet, "ControlNet")   # a ControlNet or Control-LoRA: a module next to the U-Net
    adapter.module                               # what the accelerator prepares and the step runs through
    adapter.trainable()                          # {name: parameter} the optimizer updates
    adapter.state()                              # {name: tensor} a checkpoint holds

The kinds differ in where they live and in their files (lora_files.py, lycoris_files.py,
controlnet_files.py, control_lora.py), not in how they train: a job asks an adapter these three
things and nothing else, so a new kind is a new spec and a file module, not a new job.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .lora import ADAPTER_PARAM, LoraSpec, add_lora
from .lycoris import LycorisSpec, add_lycoris


@dataclass(frozen=True)
class Adapter:
    """`module` holds the adapter's tensors; `owns(name)` says which of its parameters are the
    adapter's (all of them for a module of its own); `what` names it in messages; `keeps_frozen`:
    whether a checkpoint also holds its frozen tensors (a frozen second LoRA has no other source; a
    Control-LoRA's frozen encoder is the base's copy, rebuilt on resume)."""
    module: nn.Module
    what: str
    owns: Callable[[str], bool] = lambda name: True
    keeps_frozen: bool = False

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad and self.owns(n)}

    def state(self) -> dict[str, Tensor]:
        """The tensors a checkpoint holds, by name, as the live tensors: the trainable ones, and the
        frozen ones too with `keeps_frozen`."""
        return {n: p for n, p in self.module.named_parameters()
                if self.owns(n) and (p.requires_grad or self.keeps_frozen)}


def attach_layers(unet: nn.Module, spec: LoraSpec | LycorisSpec, name: str = "default") -> Adapter:
    """A fresh LoRA/LoCon (LoraSpec) or LoHa/LoKr/DoRA (LycorisSpec) injected into `unet`'s layers
    through peft; its init leaves the U-Net's output unchanged."""
    (add_lora if isinstance(spec, LoraSpec) else add_lycoris)(unet, spec, name)
    return Adapter(unet, "LoRA config", lambda n: ADAPTER_PARAM.search(n) is not None, keeps_frozen=True)


def beside(module: nn.Module, what: str) -> Adapter:
    """A module of its own next to the frozen U-Net (a ControlNet, a Control-LoRA's ControlNet)."""
    return Adapter(module, what)
