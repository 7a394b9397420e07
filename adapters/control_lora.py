"""Control-LoRA: a ControlNet stored as low-rank differences from its base U-Net's encoder.

File layout (Stability's, formats.md §4.5: written by stability-ComfyUI-nodes `control_lora_create.py`,
read by ComfyUI `ControlLora` and diffusers >= 0.37 `load_lora_adapter`). Names are lllyasviel
ControlNet names without `control_model.`:

    lora_controlnet                          empty tensor: the marker readers detect the format by
    <name without .weight>.up / .down        for a >= 2-D encoder weight W: W_cn - W_base ~= up @ down,
                                             up [out, r] | [out, r, 1, 1], down [r, in] | [r, in, kh, kw]
    <name>                                   every 1-D encoder tensor (biases, norms), in full
    input_hint_block.*, zero_convs.*, middle_block_out.*   the layers a ControlNet adds, in full

SDXL files are the same with SDXL's LDM names: `label_emb.0.{0,2}` (the text_time added embedding) is
factorised like any other Linear, and there are 9 zero convs. ComfyUI's rules (comfy/controlnet.py,
`ControlLora.pre_run` and `ControlLoraOps`): the control model is built from the base's own U-Net
config, every base weight is copied in under its LDM name, then each file key but the marker is set by
its attribute path, `.up`/`.down` onto a Linear/Conv2d whose forward adds
(up.flatten(1) @ down.flatten(1)).reshape(weight.shape); layers the base lacks get no weight unless the
file has it. tests/adapters/test_sdxl_controlnet_files.py rebuilds our SDXL file by these rules.
A file without our metadata (Stability's) is checked against the U-Net by what its keys show
(`_check_layout`: label_emb, the cross-attention width, conv or linear proj_in): an SD1.x file on an
SDXL base fails naming both families.

Reading follows ComfyUI (the reference consumer): start from the base U-Net's encoder, then
W = W_base + (up.flatten(1) @ down.flatten(1)).reshape(W.shape), and full tensors replace the
base's. (diffusers drops the biases of LoRA-adapted layers, formats.md §4.5 [V] deviation.)

Where this writer deviates from Stability's extractor, on purpose, so that full rank is exact:
- rank cap min(rank, out, in*kh*kw), the matrix rank; Stability caps at min(rank, in, out), which
  loses part of every 3x3 conv that raises the channel count;
- no clamping of the factors to their 0.99 quantile;
- weights equal to the base's are left out (no up/down pair): both readers use the base for them.
Factors come from the SVD of the flattened difference: up = U_r diag(S_r), down = Vh_r.

Training as a Control-LoRA (`train_as_low_rank`): each >= 2-D encoder weight is frozen at the base's
value and trained as W_base + up @ down through a parametrization, so the optimizer holds only the
factors, the encoder's 1-D tensors and the added layers (what the file stores in full); the export's
SVD of the then exactly rank-r difference gives the file without loss (`merged_controlnet` first
computes the weights at full precision from the fp32 base).
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from adapterkit.unet import FAMILIES, PRESETS, CheckpointError, UNetConfig, read_weights, write_safetensors

from .controlnet import (
    _ENCODER_PARTS,
    ControlNet,
    base_encoder_state,
    check_base,
    family_mismatch,
    same_architecture,
)
from .controlnet_keys import attach_metadata, controlnet_key_map, controlnet_metadata, hint_geometry
from .lora_files import base_fingerprint
from .lora_keys import describe_config

MARKER = "lora_controlnet"


@dataclass
class ControlLoraReport:
    """What a Control-LoRA holds and what it lost, per layer and in total."""
    rank: int
    parameters: int                 # tensors written (factors + full tensors)
    full_parameters: int            # the full ControlNet's
    bytes: int                      # of the tensors at the written dtype
    full_bytes: int                 # of the full ControlNet at the same dtype
    low_rank: int = 0               # weights stored as up/down
    unchanged: int = 0              # weights equal to the base: not stored
    errors: dict[str, float] = field(default_factory=dict)   # ||ΔW - up@down|| / ||ΔW|| per weight

    @property
    def ratio(self) -> float:
        """How many times smaller than the full ControlNet."""
        return self.full_bytes / max(self.bytes, 1)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def control_lora_tensors(cn: ControlNet, unet: nn.Module, rank: int, dtype: torch.dtype | None = torch.float16
                         ) -> tuple[dict[str, Tensor], ControlLoraReport]:
    """The Control-LoRA tensors of `cn` relative to `unet`'s base encoder, and the report.

    `unet` must be the base `cn` was made from (`check_base`). dtype: of the stored tensors
    (Stability's files are fp16); None keeps fp32 factors and the ControlNet's dtype.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    check_base(cn, unet)
    base = base_encoder_state(unet)
    names = controlnet_key_map(cn.config, cn.hint_widths)
    out: dict[str, Tensor] = {MARKER: torch.tensor([])}
    report = ControlLoraReport(rank, 0, 0, 0, 0)
    for key, w in cn.state_dict().items():
        w = w.detach()
        report.full_parameters += w.numel()
        report.full_bytes += w.numel() * _itemsize(dtype or w.dtype)
        name = names[key]
        if not key.startswith(_ENCODER_PARTS) or w.ndim < 2:
            out[name] = w.to("cpu", dtype or w.dtype).contiguous()   # new layers, biases, norms: in full
            continue
        delta = w.float() - base[key].to(w.device).float()
        if not delta.any():
            report.unchanged += 1
            continue
        up, down, err = _factors(delta, rank)
        stem = name.removesuffix(".weight")
        for part, t in (("up", up), ("down", down)):
            out[f"{stem}.{part}"] = t.to("cpu", dtype or t.dtype).contiguous()
        report.low_rank += 1
        report.errors[key] = err
    for t in out.values():
        report.parameters += t.numel()
        report.bytes += t.numel() * t.element_size()
    return out, report


def _factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """up [out, r(, 1, 1)], down [r, in(, kh, kw)] with up @ down ~= delta (flattened), rel. error."""
    flat = delta.flatten(1)                                             # [out, in*kh*kw]
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, *flat.shape)
    up, down = U[:, :r] * S[:r], Vh[:r].clone()                         # [out, r], [r, in*kh*kw]
    err = float(S[r:].norm() / S.norm().clamp_min(1e-30))
    if delta.ndim == 4:
        return up[:, :, None, None], down.reshape(r, *delta.shape[1:]), err
    return up, down, err


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def save_control_lora(cn: ControlNet, unet: nn.Module, path: str | os.PathLike, rank: int = 128,
                      dtype: torch.dtype | None = torch.float16, metadata: dict | None = None,
                      title: str | None = None) -> ControlLoraReport:
    """Write `cn` as a Control-LoRA relative to its base `unet` (one .safetensors, atomic)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a Control-LoRA is one .safetensors file, got {path.name!r}")
    reserved = sorted(k for k in (metadata or {}) if k.startswith("adapterkit."))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are written by adapterkit itself")
    tensors, report = control_lora_tensors(cn, unet, rank, dtype)
    md = controlnet_metadata(cn, "control-lora", title)
    md["modelspec.architecture"] = md["modelspec.architecture"].replace("/controlnet", "/control-lora")
    md["modelspec.implementation"] = "https://github.com/Stability-AI/stability-ComfyUI-nodes"
    md["adapterkit.adapter"] = json.dumps({**json.loads(md["adapterkit.adapter"]), "type": "control-lora",
                                           "rank": rank})
    md |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    write_safetensors(tensors, path, md)
    return report


def load_control_lora(path: str | os.PathLike, unet: nn.Module, allow_other_base: bool = False) -> ControlNet:
    """Read a Control-LoRA (ours or Stability's) onto the base `unet`; returns a full ControlNet (fp32)."""
    path = Path(path)
    tensors, metadata = read_weights(path)
    if MARKER not in tensors:
        raise CheckpointError(f"{path} is not a Control-LoRA: it lacks the {MARKER!r} marker tensor")
    return control_lora_from_tensors(tensors, metadata, unet, path, allow_other_base)


def control_lora_from_tensors(tensors: dict[str, Tensor], metadata: dict[str, str], unet: nn.Module,
                              label: Path | str, allow_other_base: bool = False) -> ControlNet:
    """Rebuild the full ControlNet from Control-LoRA tensors and the base `unet` (ComfyUI semantics).

    Every file key must find its place and every layer the ControlNet adds must be in the file;
    otherwise CheckpointError, naming the keys. Fails, naming both, on another base.
    """
    cfg: UNetConfig = unet.config
    if "adapterkit.base_config" in metadata:
        try:
            made_for = UNetConfig.from_dict(json.loads(metadata["adapterkit.base_config"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{label}: metadata adapterkit.base_config is not a valid U-Net config: "
                                  f"{e}") from e
        if not same_architecture(made_for, cfg):
            raise CheckpointError(f"{label} is a Control-LoRA for {describe_config(made_for)}, but the U-Net "
                                  f"is {describe_config(cfg)}"
                                  f"{family_mismatch(made_for, cfg, 'Control-LoRA')}")
    else:
        _check_layout(tensors, cfg, label)
    hint_channels, widths = hint_geometry(tensors, "lllyasviel", label)
    cn = ControlNet.from_unet(unet, hint_channels, widths)
    attach_metadata(cn, metadata, label)             # hint contract, recorded base, carried keys
    check_base(cn, unet, allow_other_base)
    if cn.base_fingerprint is None:
        cn.base_fingerprint = base_fingerprint(unet)     # it is a delta from this base, whatever it was

    names = controlnet_key_map(cfg, widths)                          # ours -> lllyasviel
    to_ours = {ldm: ours for ours, ldm in names.items()}
    state = {k: v.detach().clone() for k, v in cn.state_dict().items()}
    pairs: dict[str, dict[str, Tensor]] = {}
    unplaced, wrong, full = [], [], set()
    for key, t in tensors.items():
        if key == MARKER:
            continue
        stem, _, part = key.rpartition(".")
        if part in ("up", "down") and f"{stem}.weight" in to_ours:
            pairs.setdefault(to_ours[f"{stem}.weight"], {})[part] = t
        elif key in to_ours:
            ours = to_ours[key]
            if tuple(t.shape) != tuple(state[ours].shape):
                wrong.append(f"{key}: expected {list(state[ours].shape)}, found {list(t.shape)}")
            else:
                state[ours] = t.float()
                full.add(ours)
        else:
            unplaced.append(key)
    for ours, d in pairs.items():
        name = names[ours].removesuffix(".weight")
        w = state[ours]
        if set(d) != {"up", "down"}:
            wrong.append(f"{name}: has only .{next(iter(d))}")
            continue
        up, down = d["up"].float().flatten(1), d["down"].float().flatten(1)    # [out, r], [r, in*kh*kw]
        if up.shape[1] != down.shape[0] or up.shape[0] != w.shape[0] or down.shape[1] != w[0].numel():
            wrong.append(f"{name}: up {list(d['up'].shape)} / down {list(d['down'].shape)} do not fit "
                         f"a weight of shape {list(w.shape)}")
            continue
        state[ours] = w.float() + (up @ down).reshape(w.shape)
    added = [k for k in state if not k.startswith(_ENCODER_PARTS) and k not in full]
    problems = [f"{len(items)} {what} ({', '.join(items[:5])}{' ...' if len(items) > 5 else ''})"
                for what, items in (("keys that name no ControlNet tensor", unplaced),
                                    ("malformed or wrong-shape tensors", wrong),
                                    ("ControlNet layers missing from the file",
                                     [names[k] for k in added])) if items]
    if problems:
        raise CheckpointError(f"{label} does not fit a ControlNet on this U-Net: {'; '.join(problems)}")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{label} gives NaN/inf weights in {len(bad)} tensors: {', '.join(bad[:5])}")
    cn.load_state_dict(state, strict=True)
    return cn


def _check_layout(tensors: dict[str, Tensor], cfg: UNetConfig, label: Path | str) -> None:
    """For a file without our metadata (Stability's own): refuse it, naming both families, when its keys
    show another family's layout than `cfg`'s. What the keys show: SDXL's added embedding
    (`label_emb.*`), the cross-attention's context width (attn2.to_k's input) and whether proj_in is a
    1x1 conv (SD1.x: a 4-D weight or factor) or a linear layer (SD2.x, SDXL)."""
    added = any(k.startswith("label_emb.") for k in tensors)
    width = next((t.shape[1] for k, t in tensors.items()
                  if k.endswith(("attn2.to_k.down", "attn2.to_k.weight")) and t.ndim == 2), None)
    proj = next((t.ndim for k, t in tensors.items() if k.endswith(("proj_in.down", "proj_in.weight"))), None)
    shown = []
    if added != (cfg.addition_embed is not None):
        shown.append("an added embedding (label_emb.*)" if added else "no added embedding (label_emb.*)")
    if width is not None and width != cfg.context_dim:
        shown.append(f"cross-attention over {width}-wide text (the U-Net's: {cfg.context_dim})")
    if not shown:
        return
    if added:
        made_for = FAMILIES["sdxl"]
    else:
        made_for = FAMILIES["sd1"] if proj == 4 else FAMILIES["sd2"]
    raise CheckpointError(
        f"{label} is a Control-LoRA whose keys show {' and '.join(shown)}: it was made for another base "
        f"than this U-Net, {describe_config(cfg)}"
        f"{family_mismatch(PRESETS[made_for.unet_preset], cfg, 'Control-LoRA')}")


# --- training the encoder as a low-rank difference from the base --------------------------------------

class LowRankDelta(nn.Module):
    """The parametrization W = W_base + up @ down of a frozen weight. `up` starts at zero, so a fresh
    ControlNet is still the plain encoder copy; `down` starts like a LoRA's A (Kaiming uniform)."""

    def __init__(self, weight: Tensor, rank: int):
        super().__init__()
        out, fan_in = weight.shape[0], weight[0].numel()
        r = min(rank, out, fan_in)
        self.up = nn.Parameter(torch.zeros(out, r, device=weight.device))
        self.down = nn.Parameter(torch.empty(r, fan_in, device=weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, base: Tensor) -> Tensor:
        return base + (self.up @ self.down).view(base.shape).to(base.dtype)


def train_as_low_rank(cn: ControlNet, rank: int) -> list[str]:
    """Control-LoRA training: freeze each >= 2-D weight of `cn`'s encoder copy at its value (the base's)
    and train it as W_base + up @ down of rank `rank` (capped by the weight's matrix rank). The added
    layers and the encoder's biases and norms keep training in full. Returns the wrapped weights'
    names. Call before the ControlNet is cast or wrapped for training."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    wrapped = [k for k, w in cn.named_parameters() if k.startswith(_ENCODER_PARTS) and w.ndim >= 2]
    for key in wrapped:
        module_name, _, attr = key.rpartition(".")
        module = cn.get_submodule(module_name)
        getattr(module, attr).requires_grad_(False)
        parametrize.register_parametrization(module, attr, LowRankDelta(getattr(module, attr), rank))
    return wrapped


def merged_controlnet(cn: ControlNet, base: dict[str, Tensor] | None = None) -> ControlNet:
    """A plain ControlNet (a copy) with each low-rank weight of `cn` computed as W_base + up @ down.
    `base`: the fp32 base encoder state by ControlNet key (`base_encoder_state` of the fp32 U-Net);
    then the weights are computed in fp32 from it and the factors, not from the frozen low-precision
    copy the training step uses. Without low-rank weights: the copy as is."""
    plain = copy.deepcopy(cn)
    for name, module in list(plain.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        weights = {}
        for attr, chain in module.parametrizations.items():
            with torch.no_grad():
                if base is not None:
                    chain.original.data = base[f"{name}.{attr}"].to(chain.original.device, torch.float32)
                    for p in chain.parameters():
                        p.data = p.data.float()
                weights[attr] = chain()
        # By hand, not parametrize.remove_parametrizations: that deletes the weight property from the
        # module's class, which the copy shares with the original (whose training would then fail).
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for attr, w in weights.items():
            module.register_parameter(attr, nn.Parameter(w))
    return plain
