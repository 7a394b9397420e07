"""LyCORIS adapters on the U-Net through peft (LoHa, LoKr, DoRA) and the `Lycoris` record.

A module's tensors are named and shaped as in a LyCORIS/kohya file, and mean what the clients make
of them (ComfyUI comfy/weight_adapter/{lora,loha,lokr}.py and base.py `weight_decompose`; A1111
extensions-builtin/Lora/network_{lora,hada,lokr}.py and network.py `finalize_updown`):

    kind  tensors                                            raw ΔW                      scale
    lora  lora_down.weight [r, in(,k,k)],                    up @ down                   alpha / r
          lora_up.weight [out, r(,1,1)]                                                  (r: lora_down rows)
    loha  hada_w1_a [out, r], hada_w1_b [r, in·k·k], w2 alike (w1a @ w1b) ⊙ (w2a @ w2b)   alpha / r
          Tucker conv: hada_t1/t2 [r, r, k, k],              einsum(t, wb, wa) each      (r: hada_w1_b rows)
          hada_w*_a [r, out], hada_w*_b [r, in]
    lokr  lokr_w1 [a, c] | lokr_w1_a [a, r] @ lokr_w1_b [r, c] w1 ⊗ w2 (out = a·b,        alpha / r where a
          lokr_w2 [b, d(,k,k)] | lokr_w2_a [b, r] @            in = c·d; w1 spans        half is factored
          lokr_w2_b [r, d·k·k]; Tucker: lokr_t2 [r, r, k, k],  the kernel)               (r: its _b rows,
          lokr_w2_a [r, b], lokr_w2_b [r, d]                                             w2's if both); else 1
    + dora_scale (DoRA is lora + dora_scale; LyCORIS also puts it on loha/lokr), V = W + scale·raw:
          W' = V · dora_scale / ‖V‖;  ΔW = W' − W
          (1, in(,1,1))   ‖·‖ per input column (A1111, ComfyUI, LyCORIS wd_on_output=False)
          (out, 1(,1,1))  per output row (LyCORIS's default wd_on_output=True, peft)
    no alpha: scale 1 in all three clients.

A merge adds ratio·ΔW (A1111 multiplies the decomposed update; ComfyUI the same, `strength`).

peft holds the same tensors under the same names (LoHaConfig/LoKrConfig; LoraConfig(use_dora=True)
for DoRA) but always scales by alpha/r. The conversion is exact: LoHa and factored LoKr are
identical; a LoKr with both halves full has alpha/r folded into lokr_w1 and alpha 1 (the clients
ignore it). DoRA for clients is column-wise (lycoris_dora.py, magnitude [in] -> dora_scale
(1, in(,1,1))); peft's row-wise DoRA (magnitude [out]) has no client form and is kept for the
peft/diffusers layout (lycoris_files.py).

Loading a record into a model injects peft layers of the file's ranks and then sets each adapter's
tensors to exactly the file's (peft's own shape choices, e.g. LoKr's factorisation, play no part).

One coherent thing over 450 lines: the LyCORIS adapter record and its peft layers (attach,
read out, remove), whose conversions must agree with each other exactly.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.functional import cast_adapter_dtype, delete_adapter, set_adapter
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from . import lora_fused, lycoris_dora
from .lora import (
    _KXK,
    TARGET_PRESETS,
    AdapterWeights,
    Lora,
    LoraModule,
    _active,
    _exact,
    _list,
    _restore_grads,
    all_or_nothing,
    check_shape_settings,
    load_lora,
    lora_names,
)
from .lora_keys import layer_paths

KINDS = ("loha", "lokr", "dora")                 # what a LycorisSpec trains
DORA_AXES = ("input", "output")                  # input: the clients' DoRA; output: peft's
PARTS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_TUCKER = "i j k l, j r, i p -> p r k l"         # core t, wb [r, in], wa [r, out] -> [out, in, k, l]
# Tucker LoCon (LyCORIS locon use_tucker): lora_down a 1x1 conv in -> r, lora_mid the k x k conv r -> r,
# lora_up a 1x1 conv r -> out, applied in that order: ΔW[o, i] = up[o, a] · mid[a, b] · down[b, i] per tap
# (A1111 lyco_helpers.rebuild_cp_decomposition; ComfyUI weight_adapter/lora.py folds mid into down).
_MID = "a b k l, b i -> a i k l"                 # mid [r, r, k, l], down [r, in] -> folded down [r, in, k, l]


def kind_of_part(part: str) -> str | None:
    """'lora' | 'loha' | 'lokr' for a tensor name of a module, None for alpha/dora_scale/unknown."""
    return next((k for k, names in PARTS.items() if part in names), None)


# One module -----------------------------------------------------------------------------------------------

@dataclass
class LycorisModule:
    """One adapted layer in the client convention (module docstring): tensors by file name."""
    kind: str
    tensors: dict[str, Tensor]
    alpha: float | None = None
    dora_scale: Tensor | None = None

    @property
    def rank(self) -> int | None:
        """The r of alpha / r (None: a LoKr of two full halves, scale 1)."""
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        # ComfyUI and A1111 take w1's rank, then w2's over it
        return next((t[h].shape[0] for h in ("lokr_w2_b", "lokr_w1_b") if h in t), None)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank

    @property
    def dora_axis(self) -> str | None:
        if self.dora_scale is None:
            return None
        s = self.dora_scale.shape
        return "output" if len(s) >= 2 and s[1] == 1 and s[0] != 1 else "input"

    @property
    def label(self) -> str:
        """'lora', 'loha', 'lokr', 'dora' (lora + dora_scale), 'loha+dora', ...; '(row)' for peft's axis."""
        if self.dora_scale is None:
            return self.kind
        row = " (row)" if self.dora_axis == "output" else ""
        return ("dora" if self.kind == "lora" else f"{self.kind}+dora") + row

    def raw(self) -> Tensor:
        """Unscaled ΔW from the factors, fp32: [out, in·k·k] or [out, in, k, k]."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            down, up = self.lora_factors()
            raw = up.float().flatten(1) @ down.float().flatten(1)
            return raw.reshape(up.shape[0], *down.shape[1:]) if "lora_mid.weight" in t else raw
        if self.kind == "loha":
            if "hada_t1" in t:
                return (torch.einsum(_TUCKER, t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                        * torch.einsum(_TUCKER, t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"]))
            return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum(_TUCKER, t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]                                   # [a, c, 1, 1]: w1 spans the kernel
        return torch.kron(w1, w2.contiguous())

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """(lora_down, lora_up) of a lora-kind module; a Tucker LoCon's mid folded into down exactly
        ([r, in, k, k]: the same ΔW as a plain LoCon of rank r, which is what peft can hold)."""
        t = self.tensors
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            down = torch.einsum(_MID, mid.float(), down.float().flatten(1)).to(down.dtype)
        return down, up

    def delta(self, weight: Tensor) -> Tensor:
        """ΔW for base weight `weight`, fp32, shaped like it (DoRA's depends on its values; computed in
        fp64, as V·m/‖V‖ − W cancels most of W)."""
        d = (self.scale * self.raw().to(weight.device)).reshape(weight.shape)
        if self.dora_scale is None:
            return d
        w = weight.detach().double()
        v = w + d.double()
        if self.dora_axis == "output":                                  # per output row (LyCORIS, peft)
            norm, shape = v.flatten(1).norm(dim=1), (-1, *[1] * (w.ndim - 1))
        else:                                                           # per input column (the clients)
            norm, shape = v.transpose(0, 1).flatten(1).norm(dim=1), (1, -1, *[1] * (w.ndim - 2))
        return (v * (self.dora_scale.double().to(w.device).reshape(shape) / norm.reshape(shape)) - w).float()

    def problem(self, weight: torch.Size) -> str | None:
        """Why these tensors cannot adapt a layer of weight shape `weight`, or None."""
        try:
            with torch.device("meta"):
                raw = LycorisModule(self.kind, {k: v.to("meta") for k, v in self.tensors.items()}).raw()
        except RuntimeError:
            return f"{self.kind} factors do not multiply: {self.shapes()}"
        want = weight if raw.ndim == 4 else torch.Size((weight[0], weight[1:].numel()))
        down = self.tensors.get("lora_down.weight")
        if "lora_mid.weight" in self.tensors:
            down = None if self.tensors["lora_down.weight"].shape[2:] == (1, 1) else down   # the 1x1 half
        if raw.shape != want or (down is not None and down.ndim == 4 and down.shape[1:] != weight[1:]):
            return f"{self.kind} factors {self.shapes()} do not fit a layer of weight {tuple(weight)}"
        if self.dora_scale is not None:
            ones = [1] * (len(weight) - 2)
            fits = {(1, weight[1], *ones), (weight[0], 1, *ones)}
            if tuple(self.dora_scale.shape) not in fits:
                return (f"dora_scale {tuple(self.dora_scale.shape)} fits neither axis of weight "
                        f"{tuple(weight)} (expected {(1, weight[1], *ones)} per input column)")
        return None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def all_tensors(self) -> dict[str, Tensor]:
        extra = {"dora_scale": self.dora_scale} if self.dora_scale is not None else {}
        return {**self.tensors, **extra}


# A whole adapter --------------------------------------------------------------------------------------------

@dataclass
class Lycoris(AdapterWeights):
    """A LyCORIS file's weights (AdapterWeights of LycorisModule)."""
    modules: dict[str, LycorisModule]
    source: str = "LyCORIS adapter"

    def kinds(self) -> Counter:
        return Counter(m.label for m in self.modules.values())

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """LoRA-like (down, up) shapes for lora_keys.guess_base: (r, in[, k, k]), (out, r). Flattened
        1x1 convs (proj_in of a LoHa) are left out: their layout says nothing about the base."""
        out = {}
        for p, m in self.modules.items():
            with torch.device("meta"):
                raw = LycorisModule(m.kind, {k: v.to("meta") for k, v in m.tensors.items()}).raw()
            r = m.rank or 1
            down = m.lora_factors()[0] if m.kind == "lora" else None
            ins = tuple(down.shape[1:]) if down is not None else tuple(raw.shape[1:])
            if len(ins) == 1 and p.endswith(("proj_in", "proj_out")) and down is None:
                continue
            out[p] = ((r, *ins), (raw.shape[0], r))
        return out

    def check_finite(self) -> None:
        """Refuse NaN/inf tensors or alphas, naming each."""
        bad = [f"{self.key(p)}.{part} ({n} non-finite)" for p, m in self.modules.items()
               for part, t in m.all_tensors().items() if (n := int((~torch.isfinite(t)).sum()))]
        bad += [f"{self.key(p)}.alpha ({m.alpha})" for p, m in self.modules.items()
                if m.alpha is not None and not torch.isfinite(torch.tensor(float(m.alpha)))]
        if bad:
            raise ValueError(f"{self.source} has NaN/inf weights; it is broken (re-export or retrain it): "
                             f"{_list(bad)}")

    def fit(self, model: nn.Module, allow_unmatched: bool = False) -> dict[str, nn.Module]:
        """The model layer each module adapts (as `lora.fit`): raises before anything changes on
        non-finite values, shape mismatches, or (unless allow_unmatched) keys that place nowhere."""
        self.check_finite()
        layers = layer_paths(model)
        missing = [self.key(p) for p in self.modules if p not in layers]
        wrong = [f"{self.key(p)}: {why}" for p, m in self.modules.items()
                 if p in layers and (why := m.problem(layers[p].weight.shape))]
        unplaced = [f"{k} ({why})" for k, why in self.unplaced.items()]
        self.check_placement(model, wrong, missing, unplaced, len(missing), allow_unmatched)
        return {p: layers[p] for p in self.modules if p in layers}


# What to train ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LycorisSpec:
    """A LoHa, LoKr or DoRA to train through peft's layers.

    rank/alpha, conv_rank/conv_alpha (3x3 convs of `full`) and targets as `lora.LoraSpec`.
    tucker: LoHa/LoKr 3x3 convs as a Tucker core + two matrices (hada_t1/t2, lokr_t2).
    factor: LoKr's split of each dim, w1's side (-1: near square, as LyCORIS); must divide every dim.
    decompose_both: LoKr also factors w1 where rank < its size / 2. full_matrix: LoKr halves both full.
    dora_axis: "input" (one magnitude per input column: the DoRA ComfyUI/A1111/LyCORIS files hold) or
        "output" (peft's own, one per output row; written in the peft layout only).
    dropout: DoRA's input dropout. rank_dropout/module_dropout: peft's LoHa/LoKr dropouts.
    """
    kind: str = "loha"
    rank: int = 8
    alpha: float = 8.0
    targets: str = "attn-ff"
    conv_rank: int | None = None
    conv_alpha: float | None = None
    tucker: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    dora_axis: str = "input"
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown LyCORIS kind {self.kind!r}; choose one of {list(KINDS)} "
                             "(plain LoRA/LoCon: adapters.lora.LoraSpec)")
        check_shape_settings(self)
        if self.dora_axis not in DORA_AXES:
            raise ValueError(f"dora_axis must be one of {list(DORA_AXES)}, got {self.dora_axis!r}")
        if self.factor != -1 and self.factor < 1:
            raise ValueError(f"LoKr factor must be -1 (near square) or >= 1, got {self.factor}")
        wrong = [name for name, kinds in (("tucker", ("loha", "lokr")), ("factor", ("lokr",)),
                                          ("decompose_both", ("lokr",)), ("full_matrix", ("lokr",)),
                                          ("dropout", ("dora",)), ("rank_dropout", ("loha", "lokr")),
                                          ("module_dropout", ("loha", "lokr")))
                 if getattr(self, name) != LycorisSpec.__dataclass_fields__[name].default
                 and self.kind not in kinds]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do not apply to {self.kind}")
        if self.decompose_both and self.full_matrix:
            raise ValueError("decompose_both and full_matrix contradict each other (w1 factored vs full)")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def peft_config(self):
        """The peft config of this adapter (LoKr's full_matrix ranks are set per layer by add_lycoris)."""
        convs = [t for t in _KXK if t in TARGET_PRESETS[self.targets]]
        common = dict(target_modules=list(TARGET_PRESETS[self.targets]),
                      rank_pattern={t: self.conv_rank for t in convs} if self.conv_rank else {},
                      alpha_pattern={t: self.conv_alpha for t in convs} if self.conv_alpha else {})
        if self.kind == "dora":
            return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=True,
                              init_lora_weights=True, **common)
        drops = dict(rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)
        if self.kind == "loha":
            return LoHaConfig(r=self.rank, alpha=self.alpha, use_effective_conv2d=self.tucker,
                              init_weights=True, **drops, **common)
        return LoKrConfig(r=self.rank, alpha=self.alpha, use_effective_conv2d=self.tucker,
                          decompose_factor=self.factor, decompose_both=self.decompose_both,
                          init_weights=True, **drops, **common)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Adapters on a model ------------------------------------------------------------------------------------

def canonical(module_name: str) -> str:
    """A tuner layer's path without peft's `.base_layer` hops (layers wrapped by two tuners)."""
    return module_name.replace(".base_layer", "")


def tuner_layers(model: nn.Module, name: str) -> dict[str, BaseTunerLayer]:
    """The tuner layer holding adapter `name` at each canonical path."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoHaLayer | LoKrLayer) and name in m._available_adapters:
            out[canonical(n)] = m
        elif isinstance(m, LoraLayer) and name in m.lora_A:
            out[canonical(n)] = m
    return out


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _inject(model: nn.Module, config, name: str, trainable: bool, column_dora: bool) -> None:
    if name in lora_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; adapters: {lora_names(model)}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-', and not a torch Module "
                         "attribute name")
    grads = {p: p.requires_grad for p in model.parameters()}
    active = [n for n in lora_names(model) if n in _active(model)]
    if isinstance(config, LoraConfig):
        (lycoris_dora if column_dora else lora_fused).register(config)
    with all_or_nothing(model, name):             # B9: half-way failures leave the model as it was
        with _quiet_peft():
            inject_adapter_in_model(config, model, adapter_name=name)
        cast_adapter_dtype(model, name)
        if column_dora:
            _check_column(model, name)
    set_adapter(model, active + [name])
    _restore_grads(model, grads, new=name, trainable=trainable)


def _check_column(model: nn.Module, name: str) -> None:
    """peft reuses a layer that already has a LoRA adapter, and that layer builds peft's row-wise DoRA."""
    rows = [p for p, layer in tuner_layers(model, name).items()
            if not lycoris_dora.is_column_dora(layer, name)]
    if rows:
        raise ValueError(f"{len(rows)} layers already carry a LoRA adapter, where peft would build its "
                         f"row-wise DoRA, not the clients' column-wise one: {_list(rows, 4)}; add the DoRA "
                         "before the LoRA adapters, or merge them")


def remove_lycoris(model: nn.Module, name: str, strict: bool = True) -> None:
    """Delete adapter `name` (any kind); the others keep their weights, activity and grad flags."""
    if strict and name not in lora_names(model):
        raise ValueError(f"no adapter named {name!r}; adapters: {lora_names(model)}")
    grads = {p: p.requires_grad for p in model.parameters()}
    active = [n for n in lora_names(model) if n in _active(model) and n != name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delete_adapter(model, name, prefix="lora_")      # every tuner layer (LoHa, LoKr too) drops its parts
    getattr(model, "peft_config", {}).pop(name, None)
    set_adapter(model, active)
    _restore_grads(model, grads)


def add_lycoris(model: nn.Module, spec: LycorisSpec, name: str = "default", trainable: bool = True) -> None:
    """Inject a fresh LoHa/LoKr/DoRA named `name`; its init changes nothing (LoHa w2_b, LoKr w1 and
    DoRA's B are zero, DoRA's magnitude is the base's norm). Adapter tensors fp32, the base frozen."""
    config = spec.peft_config()
    if spec.kind == "lokr":
        targets = _targets(model, config)
        _check_factor(targets, spec.factor)
        if spec.full_matrix:        # w1 and w2 full: rank >= every half dim; scale 1, as LyCORIS
            size = {_exact(p): max(layer.weight.shape[:2]) for p, layer in targets.items()}
            config.rank_pattern, config.alpha_pattern = size, dict(size)
    _inject(model, config, name, trainable, column_dora=spec.kind == "dora" and spec.dora_axis == "input")


def _targets(model: nn.Module, config) -> dict[str, nn.Module]:
    suffixes = tuple(config.target_modules)
    return {p: layer for p, layer in layer_paths(model).items()
            if any(p == s or p.endswith("." + s) for s in suffixes)}


def _check_factor(targets: dict[str, nn.Module], factor: int) -> None:
    """peft silently falls back to another split when the factor does not divide a dim: refuse."""
    if factor == -1:
        return
    bad = [f"{p} {tuple(layer.weight.shape[:2])}" for p, layer in targets.items()
           if any(d % factor for d in layer.weight.shape[:2])]
    if bad:
        raise ValueError(f"LoKr factor {factor} does not divide the in/out dims of {len(bad)} layers: "
                         f"{_list(bad, 6)}; choose a factor dividing every targeted dim or -1")


def lycoris_spec(model: nn.Module, name: str = "default") -> LycorisSpec | None:
    """The LycorisSpec adapter `name` was made from (None for a plain LoRA or one loaded from a file)."""
    c = model.peft_config[name]
    targets = next((k for k, v in TARGET_PRESETS.items() if set(v) == set(c.target_modules or ())), None)
    if targets is None or (isinstance(c, LoraConfig) and not c.use_dora):
        return None
    full = any(k.startswith("^") for k in c.rank_pattern)            # add_lycoris's full_matrix ranks
    common = dict(targets=targets, conv_rank=None if full else c.rank_pattern.get("conv1"),
                  conv_alpha=None if full else c.alpha_pattern.get("conv1"))
    if isinstance(c, LoraConfig):
        column = any(lycoris_dora.is_column_dora(layer, name) for layer in tuner_layers(model, name).values())
        return LycorisSpec("dora", c.r, c.lora_alpha, dora_axis="input" if column else "output",
                           dropout=c.lora_dropout, **common)
    drops = dict(rank_dropout=c.rank_dropout, module_dropout=c.module_dropout, tucker=c.use_effective_conv2d)
    if isinstance(c, LoHaConfig):
        return LycorisSpec("loha", c.r, c.alpha, **drops, **common)
    return LycorisSpec("lokr", c.r, c.alpha, factor=c.decompose_factor, decompose_both=c.decompose_both,
                       full_matrix=full, **drops, **common)


def lycoris_from_model(model: nn.Module, name: str = "default") -> Lycoris:
    """A copy of adapter `name` in the client convention (fp32 as trained; conversions exact)."""
    layers = tuner_layers(model, name)
    if not layers:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {lora_names(model)}")
    return Lycoris({p: _module_from(layer, name) for p, layer in layers.items()}, source=f"adapter {name!r}")


def _module_from(layer: BaseTunerLayer, name: str) -> LycorisModule:
    if isinstance(layer, LoraLayer):
        down, up = layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone()
        r, alpha = layer.r[name], float(layer.lora_alpha[name])
        if layer.use_rslora.get(name):                  # alpha/sqrt(r) == (alpha·sqrt(r))/r
            alpha *= r ** 0.5
        tensors = {"lora_down.weight": down, "lora_up.weight": up}
        if name not in layer.lora_magnitude_vector:
            return LycorisModule("lora", tensors, alpha)
        m = layer.lora_magnitude_vector[name].weight.detach().clone().float()
        w = layer.get_base_layer().weight
        ones = [1] * (w.ndim - 2)
        column = lycoris_dora.is_column_dora(layer, name)
        scale = m.reshape(1, -1, *ones) if column else m.reshape(-1, 1, *ones)
        return LycorisModule("lora", tensors, alpha, scale)
    kind = "loha" if isinstance(layer, LoHaLayer) else "lokr"
    tensors = {attr: getattr(layer, attr)[name].detach().clone() for attr in layer.adapter_layer_names
               if name in getattr(layer, attr)}
    module = LycorisModule(kind, tensors, float(layer.alpha[name]))
    if module.rank is None:                             # LoKr, both halves full: clients scale by 1
        s = layer.alpha[name] / layer.r[name]
        tensors["lokr_w1"] = tensors["lokr_w1"] * s
        module.alpha = 1.0
    elif module.rank != layer.r[name]:
        raise RuntimeError(f"{kind} adapter {name!r}: factor rank {module.rank} != peft r {layer.r[name]}")
    return module


def load_lycoris(model: nn.Module, lyco: Lycoris, name: str = "default", weight: float = 1.0,
                 trainable: bool = False, allow_unmatched: bool = False) -> None:
    """Inject `lyco` as adapter `name` with exactly its tensors (each module its own rank and alpha).

    All modules must be of one kind (several kinds: merge instead). Everything is checked first;
    on any failure, also one half-way through injection, the model is left as it was.
    """
    kinds = lyco.kinds()
    if len(kinds) != 1:
        raise ValueError(f"{lyco.source} holds modules of several kinds ({dict(kinds)}); one adapter "
                         "is one peft layer type: load each kind as its own adapter, or merge the file")
    label = next(iter(kinds))
    placed = lyco.fit(model, allow_unmatched)
    if label == "lora":                  # plain LoCon, or Tucker LoCon with its mid folded in (exact)
        plain = {p: LoraModule(*m.lora_factors(), m.alpha if m.alpha is not None else float(m.rank))
                 for p, m in lyco.modules.items()}
        load_lora(model, Lora(plain, lyco.metadata, lyco.unplaced, lyco.names, lyco.source), name, weight,
                  trainable, allow_unmatched)
        return
    if "+dora" in label:
        raise ValueError(f"{lyco.source}: {label} has no peft layer (peft's LoHa/LoKr have no weight "
                         "decomposition); merge it into the base instead")
    modules = {p: lyco.modules[p] for p in placed}
    with all_or_nothing(model, name):
        _inject(model, _load_config(label, modules), name, trainable, column_dora=label == "dora")
        _copy_tensors(model, modules, name, trainable)
        if weight != 1.0:
            for layer in tuner_layers(model, name).values():
                layer.set_scale(name, float(weight))


def _load_config(label: str, modules: dict[str, LycorisModule]):
    """A peft config giving each module the client's scale: r = the module's rank, alpha/r = its scale."""
    rank = {p: m.rank or 1 for p, m in modules.items()}
    alpha = {p: m.alpha if m.alpha is not None and m.rank else float(rank[p]) for p, m in modules.items()}
    r, a = Counter(rank.values()).most_common(1)[0][0], Counter(alpha.values()).most_common(1)[0][0]
    common = dict(target_modules=sorted(modules),
                  rank_pattern={_exact(p): v for p, v in rank.items() if v != r},
                  alpha_pattern={_exact(p): v for p, v in alpha.items() if v != a})
    tucker = any("hada_t1" in m.tensors or "lokr_t2" in m.tensors for m in modules.values())
    if label == "loha":
        return LoHaConfig(r=r, alpha=a, use_effective_conv2d=tucker, **common)
    if label == "lokr":
        return LoKrConfig(r=r, alpha=a, use_effective_conv2d=tucker, **common)
    return LoraConfig(r=r, lora_alpha=a, use_dora=True, init_lora_weights=False, **common)


def _copy_tensors(model: nn.Module, modules: dict[str, LycorisModule], name: str, trainable: bool) -> None:
    layers = tuner_layers(model, name)
    with torch.no_grad():
        for path, m in modules.items():
            layer = layers[path]
            if isinstance(layer, LoraLayer):
                layer.lora_A[name].weight.copy_(m.tensors["lora_down.weight"])
                layer.lora_B[name].weight.copy_(m.tensors["lora_up.weight"])
                magnitude = layer.lora_magnitude_vector[name].weight
                magnitude.copy_(m.dora_scale.reshape(magnitude.shape))
            else:
                _set_parts(layer, name, m.tensors, trainable)
            if abs(layer.scaling[name] - m.scale) > 1e-12 * max(1.0, m.scale):
                raise RuntimeError(f"{path}: peft scaling {layer.scaling[name]} != the file's {m.scale}")


def _set_parts(layer: BaseTunerLayer, name: str, tensors: dict[str, Tensor], trainable: bool) -> None:
    """The adapter's parameters become exactly `tensors` (peft's get_delta_weight branches on which exist)."""
    device = layer.get_base_layer().weight.device
    for attr in layer.adapter_layer_names:
        params = getattr(layer, attr)
        if attr in tensors:
            t = tensors[attr].detach().to(device=device, dtype=torch.float32).clone()
            params[name] = nn.Parameter(t, requires_grad=trainable)
        elif name in params:
            del params[name]
