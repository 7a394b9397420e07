"""LoRA on the U-Net through peft: target presets, named adapters with weights, and the `Lora` record.

Injection is peft's (`LoraConfig` + `inject_adapter_in_model`); nothing here re-implements a LoRA
layer's state. Linear targets get peft's `lora.Linear` subclass `FusedLinear` (lora_fused.py), whose
forward folds the adapter into the GEMMs. For one adapted layer with base weight W (formats.md §3):

    y = W x + weight · (alpha / rank) · B(A x)      A = lora_A = kohya lora_down: [r, in] or [r, in, kh, kw]
                                                    B = lora_B = kohya lora_up:   [out, r] or [out, r, 1, 1]

B starts at zero, so an adapter at init changes nothing (tested). Only adapter tensors require grad.

`Lora` is an adapter's weights detached from any model, keyed by canonical module path
(lora_keys.py; text-encoder modules as `text_encoder.<path>` / `text_encoder_2.<path>`). Files are
read into it and written from it (lora_files.py); merge/extract/resize work on it (merge.py); `fit`
checks it against a model before anything is changed.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.functional import cast_adapter_dtype, delete_adapter, set_adapter
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from . import lora_fused
from .lora_keys import describe_config, guess_base, is_text_path, layer_paths, text_layer_paths

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")

# Target presets, also the CLI's choices. Entries are peft `target_modules` suffixes.
# `attn-ff` is every Linear/Conv of a transformer (attention, GEGLU feed-forward and proj_in/out):
# exactly kohya's default module set (UNET_TARGET_REPLACE_MODULE = Transformer2DModel, 192 modules
# on SD1.5), so an `attn-ff` file is what the rest of the ecosystem calls "a LoRA". `full` adds the
# ResNet convs, time projections, shortcuts and resamplers: kohya's conv_dim set ("LoCon", 278 on SD1.5).
# conv_in/conv_out/time_embedding are never targeted: older diffusers rejects them (formats.md P6).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": _ATTN,
    "attn-ff": _ATTN + _FF,
    "full": _ATTN + _FF + _RESNET,
}
_KXK = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")  # 3x3 convs: conv_rank applies
# An adapter tensor's parameter name, group 2 the adapter: LoRA, DoRA's magnitude, LoHa, LoKr (lycoris.py).
ADAPTER_PARAM = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|hada_\w+|lokr_\w+)\.([^.]+)(\.|$)")


def check_shape_settings(spec, what: str = "") -> None:
    """The checks every adapter spec shares: `targets` a preset, ranks >= 1, alphas > 0 (`what`
    prefixes the messages, e.g. "LoRA ")."""
    if spec.targets not in TARGET_PRESETS:
        raise ValueError(f"unknown {what}targets {spec.targets!r}; choose one of {list(TARGET_PRESETS)}")
    if spec.rank < 1 or (spec.conv_rank is not None and spec.conv_rank < 1):
        raise ValueError(f"{what}rank must be >= 1, got rank={spec.rank} conv_rank={spec.conv_rank}")
    if not spec.alpha > 0 or (spec.conv_alpha is not None and not spec.conv_alpha > 0):
        raise ValueError(f"{what}alpha must be > 0, got alpha={spec.alpha} conv_alpha={spec.conv_alpha}")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to train. alpha/rank is the scale; conv_rank/conv_alpha apply to the 3x3 convs of
    `full` (kohya's conv_dim/conv_alpha) and default to rank/alpha."""
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Literal["attn", "attn-ff", "full"] = "attn-ff"     # TARGET_PRESETS
    conv_rank: int | None = None
    conv_alpha: float | None = None

    def __post_init__(self):
        check_shape_settings(self, "LoRA ")

    def peft_config(self) -> LoraConfig:
        convs = [t for t in _KXK if t in TARGET_PRESETS[self.targets]]
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(TARGET_PRESETS[self.targets]),
            rank_pattern={t: self.conv_rank for t in convs} if self.conv_rank else {},
            alpha_pattern={t: self.conv_alpha for t in convs} if self.conv_alpha else {},
            init_lora_weights=True)     # A kaiming-uniform, B zeros (as kohya)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class LoraModule:
    """One adapted layer: ΔW = (alpha / rank) · up @ down (flattened), shaped like the base weight."""
    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """ΔW in fp32, shaped like the base weight ([out, in] or [out, in, kh, kw])."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)     # [out, r], [r, in*kh*kw]
        return (self.scale * (up @ down)).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class AdapterWeights:
    """An adapter file's weights, keyed by canonical module path (U-Net paths; text-encoder modules
    under `text_encoder.` / `text_encoder_2.`, placed only where the text encoders are given). The
    modules are the kind's own records (LoraModule here, lycoris.LycorisModule), each with a rank and
    an alpha.

    names: canonical path -> the key stem it had in its file (error messages name file keys).
    unplaced: file keys that name no U-Net layer, with the reason (text-encoder part, unknown key
        family, LDM names without a base config, ...). Never dropped silently: `fit` refuses them.
    notes: things a reader should know (e.g. alpha defaulted to rank on request).
    """
    modules: dict
    metadata: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    source: str = "adapter"
    notes: list[str] = field(default_factory=list)
    format: str = ""

    def key(self, path: str) -> str:
        return self.names.get(path, path)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter:
        return Counter(m.alpha for m in self.modules.values())

    def check_placement(self, model: nn.Module, wrong: list[str], missing: list[str], unplaced: list[str],
                        unloaded: int, allow_unmatched: bool) -> None:
        """Refuse (ValueError naming every problem and the base the file was made for) an adapter with
        shape mismatches, with keys that place nowhere unless `allow_unmatched`, or of which nothing
        loads (`unloaded` of its modules stay out); otherwise warn about what is skipped."""
        nothing_fits = unloaded == len(self.modules)
        if wrong or ((missing or unplaced) and not allow_unmatched) or nothing_fits:
            cfg = getattr(model, "config", None)
            parts = [f"{self.source} does not fit this U-Net"
                     + (f" ({describe_config(cfg)})" if cfg is not None and hasattr(cfg, "stages") else "")]
            if made_for := guess_base(self.shapes(), self.metadata, self.unplaced):
                parts.append(f"it was made for: {made_for}")
            if wrong:
                parts.append(f"{len(wrong)} shape mismatches: {_list(wrong, 6)}")
            if missing:
                parts.append(f"{len(missing)} keys match no layer: {_list(missing)}")
            if unplaced:
                parts.append(f"{len(unplaced)} keys could not be placed: {_list(unplaced)}")
            if not self.modules:
                parts.append("it holds no U-Net modules")
            if not wrong and not nothing_fits:
                parts.append("pass allow_unmatched=True (--allow-unmatched) to load the part that fits")
            raise ValueError("; ".join(parts))
        if missing or unplaced:
            warnings.warn(f"{self.source}: loading {len(self.modules) - unloaded} modules, skipping "
                          f"{len(missing) + len(unplaced)} keys: {_list(missing + unplaced)}", stacklevel=3)


@dataclass
class Lora(AdapterWeights):
    """A LoRA/LoCon file's weights (AdapterWeights of LoraModule)."""
    modules: dict[str, LoraModule]
    source: str = "LoRA"

    def shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        return {p: (m.down.shape, m.up.shape) for p, m in self.modules.items()}


def _exact(path: str) -> str:
    r"""A peft rank/alpha_pattern key matching exactly this module (peft matches r"(.*\.)?(key)$")."""
    return "^" + re.escape(path)


def _list(keys, n: int = 12) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_finite(lora: Lora) -> None:
    """Refuse NaN/inf adapter weights (a broken LoRA renders black images), naming every bad tensor."""
    bad = []
    for path, m in lora.modules.items():
        for part, t in (("lora_down", m.down), ("lora_up", m.up)):
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{lora.key(path)}.{part} ({n} non-finite)")
        if not torch.isfinite(torch.tensor(float(m.alpha))):
            bad.append(f"{lora.key(path)}.alpha ({m.alpha})")
    if bad:
        raise ValueError(f"{lora.source} has NaN/inf weights; it is broken (re-export or retrain it): "
                         f"{_list(bad)}")


def fit(lora: Lora, model: nn.Module, allow_unmatched: bool = False,
        text_encoders: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """The model layer each module of `lora` adapts; raises before anything is changed if any key
    names no layer of this U-Net or any shape differs, naming the keys and the base the file was made for.

    allow_unmatched: place what fits and warn about the rest (counted, named) instead of failing.
    text_encoders: pipeline component -> transformers text encoder ({"text_encoder": ..., "text_encoder_2":
        ...}) to place the file's text-encoder modules in; without it they count as unplaced.
    """
    text_encoders = text_encoders or {}
    layers = layer_paths(model)
    for folder, encoder in text_encoders.items():
        layers |= text_layer_paths(folder, encoder)
    aside = [p for p in lora.modules if is_text_path(p) and p.split(".", 1)[0] not in text_encoders]
    missing = [lora.key(p) for p in lora.modules if p not in layers and p not in aside]
    wrong = []
    for path, m in lora.modules.items():
        if path in layers and (problem := _shape_problem(m, layers[path].weight.shape)):
            wrong.append(f"{lora.key(path)}: {problem}")
    unplaced = [f"{k} ({why})" for k, why in lora.unplaced.items()]
    unplaced += [f"{lora.key(p)} (text-encoder module; no text encoders were given to place it in)"
                 for p in aside]
    lora.check_placement(model, wrong, missing, unplaced, len(missing) + len(aside), allow_unmatched)
    return {p: layers[p] for p in lora.modules if p in layers}


def _shape_problem(m: LoraModule, weight: torch.Size) -> str | None:
    if m.up.ndim != m.down.ndim or m.up.shape[1] != m.down.shape[0]:
        return f"rank mismatch: lora_down {tuple(m.down.shape)} vs lora_up {tuple(m.up.shape)}"
    want_down = (m.rank, *weight[1:])
    want_up = (weight[0], m.rank, *([1] * (len(weight) - 2)))
    if tuple(m.down.shape) != want_down or tuple(m.up.shape) != want_up:
        return (f"lora_down {tuple(m.down.shape)} / lora_up {tuple(m.up.shape)} do not fit a layer of "
                f"weight {tuple(weight)} (expected {want_down} / {want_up})")
    return None


# Adapters on a model -----------------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """Every peft layer: LoRA/DoRA and the LyCORIS kinds (lycoris.py), which share names and weights."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def lora_names(model: nn.Module) -> list[str]:
    return sorted(getattr(model, "peft_config", {}))


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():
        # Expected when a second adapter is injected; diffusers' add_adapter does the same.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def add_lora(model: nn.Module, spec: LoraSpec = LoraSpec(), name: str = "default",
             trainable: bool = True) -> None:
    """Inject a fresh LoRA named `name` (zero-initialised B: the model's output is unchanged).

    All adapters on the model stay active. The base is frozen, the new adapter is trainable (unless
    `trainable=False`), other adapters keep their flag. Adapter weights are fp32 whatever the base dtype.
    """
    if name in lora_names(model):
        raise ValueError(f"the model already has a LoRA named {name!r}; adapters: {lora_names(model)}")
    _inject(model, spec.peft_config(), name, trainable)


def _inject(model: nn.Module, config: LoraConfig, name: str, trainable: bool) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or hasattr(nn.ModuleDict(), name):
        # peft keys a ModuleDict by the name: it cannot shadow a Module attribute ("training", "eval").
        raise ValueError(f"LoRA name {name!r}: use letters, digits, '_' and '-', and not a torch Module "
                         "attribute name")
    grads = {p: p.requires_grad for p in model.parameters()}
    active = [n for n in lora_names(model) if n in _active(model)]
    lora_fused.register(config)             # nn.Linear targets become FusedLinear (lora_fused.py)
    with all_or_nothing(model, name):
        with _quiet_peft():
            inject_adapter_in_model(config, model, adapter_name=name)
        cast_adapter_dtype(model, name)
    set_adapter(model, active + [name])
    _restore_grads(model, grads, new=name, trainable=trainable)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, name: str):
    """Adapter `name` goes into `model` whole or not at all (reliability.md B9): if the block raises
    (peft fails on a layer half-way through injection, a tensor copy fails, Ctrl-C), the adapter is
    deleted from every layer, its peft config dropped, every peft wrapper the block added is replaced
    by the layer it wrapped (peft's delete_adapter leaves empty wrappers, so the state dict would read
    `to_q.base_layer.weight`), and the active adapters and grad flags are put back: the model's
    modules, state dict keys and tensors are the ones it had before. Nestable (undoing twice is a no-op).
    A name the model already has is refused on entry: undoing would delete that adapter."""
    if name in lora_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; adapters: {lora_names(model)}")
    before = {id(m) for m in _tuner_layers(model)}
    grads = {p: p.requires_grad for p in model.parameters()}
    active = [n for n in lora_names(model) if n in _active(model)]
    had_config = hasattr(model, "peft_config")
    try:
        yield
    except BaseException:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # peft warns when it picks a new active adapter
            _drop(model, name)
        added = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, BaseTunerLayer) and id(m) not in before and not m._get_available_adapters()]
        for path, wrapper in added:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, wrapper.base_layer)
        if not had_config and not getattr(model, "peft_config", None) and hasattr(model, "peft_config"):
            del model.peft_config
        if _tuner_layers(model):
            set_adapter(model, active)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        raise


def _restore_grads(model: nn.Module, before: dict, new: str | None = None, trainable: bool = False) -> None:
    """Only adapter tensors may require grad: the base is frozen, existing adapters keep their flag,
    adapter `new` gets `trainable`. (peft's set_adapter turns grads on for every active adapter.)"""
    for pname, p in model.named_parameters():
        match = ADAPTER_PARAM.search(pname)
        if match:
            p.requires_grad_(trainable if match.group(2) == new else before.get(p, False))
        else:
            p.requires_grad_(False)


def _active(model: nn.Module) -> set[str]:
    for layer in _tuner_layers(model):
        return set(layer.active_adapters)
    return set()


def _drop(model: nn.Module, name: str) -> None:
    delete_adapter(model, name, prefix="lora_")
    getattr(model, "peft_config", {}).pop(name, None)


def remove_lora(model: nn.Module, name: str) -> None:
    """Delete an adapter and its weights; the other adapters keep their weights and activity."""
    if name not in lora_names(model):
        raise ValueError(f"no LoRA named {name!r}; adapters: {lora_names(model)}")
    grads = {p: p.requires_grad for p in model.parameters()}
    active = [n for n in lora_names(model) if n in _active(model) and n != name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # peft warns when it picks a new active adapter
        _drop(model, name)
    set_adapter(model, active)
    _restore_grads(model, grads)


def set_lora_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate exactly the named adapters, each at its weight (the `<lora:name:w>` multiplier).

    weight 0 keeps an adapter active at no effect; leaving it out deactivates it.
    """
    unknown = set(weights) - set(lora_names(model))
    if unknown:
        raise ValueError(f"no LoRA named {sorted(unknown)}; adapters: {lora_names(model)}")
    grads = {p: p.requires_grad for p in model.parameters()}
    set_adapter(model, list(weights))
    for layer in _tuner_layers(model):
        for name, w in weights.items():
            layer.set_scale(name, float(w))
    _restore_grads(model, grads)


def lora_weights(model: nn.Module) -> dict[str, float]:
    """Active adapters and their weights."""
    out = {}
    for layer in _tuner_layers(model):
        alpha = layer.lora_alpha if isinstance(layer, LoraLayer) else layer.alpha
        for name in layer.active_adapters:
            if name in layer.scaling and name not in out:
                out[name] = layer.scaling[name] * layer.r[name] / alpha[name]
    return out


def enable_loras(model: nn.Module, enabled: bool = True) -> None:
    """Switch every adapter off (the base model's output) or back on, keeping weights and activity."""
    grads = {p: p.requires_grad for p in model.parameters()}
    for layer in _tuner_layers(model):
        layer.enable_adapters(enabled)
    _restore_grads(model, grads)


@contextlib.contextmanager
def folded_loras(model: nn.Module):
    """For inference in the block: the active adapters, at their weights, folded into the base weights
    (peft's `merge`), so a forward pass costs what the plain model's does (peft's separate low-rank
    passes made the demo's `full`-target U-Net 4-6x slower on a CPU). On leaving, peft unmerges and
    the base weights kept before are copied back: restored bit for bit (peft's subtraction alone is
    exact only in real arithmetic). Not for training: the adapters get no gradients while folded."""
    layers = [m for m in _tuner_layers(model)
              if m.active_adapters and not m.merged and not m.disable_adapters]
    kept = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                kept.append((layer, {k: t.detach().clone() for k, t in base.named_parameters(recurse=False)}))
                layer.merge()
        yield model
    finally:
        with torch.no_grad():
            for layer, originals in kept:
                if layer.merged:
                    layer.unmerge()
                base = layer.get_base_layer()
                for k, t in originals.items():
                    getattr(base, k).copy_(t)


def lora_spec(model: nn.Module, name: str = "default") -> LoraSpec | None:
    """The LoraSpec an adapter was created from (None for one loaded from a file: per-module shapes)."""
    c = model.peft_config[name]
    targets = next((k for k, v in TARGET_PRESETS.items() if set(v) == set(c.target_modules or ())), None)
    if targets is None:
        return None
    return LoraSpec(rank=c.r, alpha=c.lora_alpha, dropout=c.lora_dropout, targets=targets,
                    conv_rank=c.rank_pattern.get("conv1"), conv_alpha=c.alpha_pattern.get("conv1"))


def lora_from_model(model: nn.Module, name: str = "default") -> Lora:
    """A copy of the adapter's weights (fp32 as trained), keyed by canonical path."""
    if name not in lora_names(model):
        raise ValueError(f"no LoRA named {name!r}; adapters: {lora_names(model)}")
    modules = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            if layer.use_rslora.get(name) or layer.use_dora.get(name):
                raise ValueError(f"{path}: rsLoRA/DoRA adapters have no kohya/diffusers LoRA file form")
            modules[path] = LoraModule(layer.lora_A[name].weight.detach().clone(),
                                       layer.lora_B[name].weight.detach().clone(),
                                       float(layer.lora_alpha[name]))
    return Lora(modules, source=f"adapter {name!r}")


def load_lora(model: nn.Module, lora: Lora, name: str = "default", weight: float = 1.0,
              trainable: bool = False, allow_unmatched: bool = False) -> None:
    """Inject `lora` as adapter `name` with its own per-module ranks and alphas.

    Everything is checked first (placement, shapes, finite values); on any failure, also one half-way
    through injection, the model is left as it was (`all_or_nothing`). Loaded adapters are frozen
    unless `trainable` (e.g. to continue training).
    """
    if name in lora_names(model):
        raise ValueError(f"the model already has a LoRA named {name!r}; adapters: {lora_names(model)}")
    check_finite(lora)
    placed = fit(lora, model, allow_unmatched)
    ranks = Counter(lora.modules[p].rank for p in placed)
    alphas = Counter(lora.modules[p].alpha for p in placed)
    r, a = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    config = LoraConfig(
        r=r, lora_alpha=a, target_modules=sorted(placed), init_lora_weights=False,
        rank_pattern={_exact(p): lora.modules[p].rank for p in placed if lora.modules[p].rank != r},
        alpha_pattern={_exact(p): lora.modules[p].alpha for p in placed if lora.modules[p].alpha != a})
    with all_or_nothing(model, name):
        _inject(model, config, name, trainable)
        layers = lora_layers(model)
        with torch.no_grad():
            for path in placed:
                m, layer = lora.modules[path], layers[path]
                layer.lora_A[name].weight.copy_(m.down)
                layer.lora_B[name].weight.copy_(m.up)
                if abs(layer.scaling[name] - m.scale) > 1e-12 * max(1.0, m.scale):
                    raise RuntimeError(f"{path}: peft scaling {layer.scaling[name]} != alpha/rank {m.scale}")
        if weight != 1.0:
            set_lora_weights(model, {**lora_weights(model), name: weight})
