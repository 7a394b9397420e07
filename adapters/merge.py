"""Merge LoRAs into base weights and back out; merge LoRAs into one; extract and resize by SVD.

Merge (formats.md §5.1, kohya merge_lora / ComfyUI / A1111 agree):

    W' = W + Σ_i ratio_i · (alpha_i / r_i) · (up_i.flatten(1) @ down_i.flatten(1)).reshape(W.shape)

LyCORIS adapters (LoHa, LoKr, DoRA: lycoris.py) merge alike with their own ΔW; each ΔW is taken
against the original base (a DoRA's depends on it), as A1111 sums its networks' updates.

computed in fp32 and written in the base dtype. `unmerge` restores the weights kept by `merge_loras`
bit for bit; it never subtracts a recomputed delta (peft/diffusers unfuse does, which is exact only
in real arithmetic: fp16 error 1e-4, formats.md §5.2).

Low-rank steps use the SVD: ΔW = U S Vᵀ, rank-r factors up = U_r √S_r, down = √S_r V_rᵀ (the
singular values split evenly, so neither factor is large in fp16), alpha = r (scale 1). Conv kxk
weights are flattened to [out, in·kh·kw] first, so down keeps the kernel and up is 1x1 — the LoCon
layout of kohya and peft. Errors are relative Frobenius norms ||ΔW - ΔW_r|| / ||ΔW||.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from adapterkit.unet import UNet, UNetConfig

from .lora import TARGET_PRESETS, Lora, LoraModule, _list, check_finite, fit
from .lora_keys import layer_paths, text_layer_paths
from .lycoris import Lycoris


@dataclass
class MergeRecord:
    """The original weights of every layer a merge touched, for an exact `unmerge`."""
    originals: dict[str, Tensor] = field(default_factory=dict)


def merge_loras(model: nn.Module, loras: Sequence[tuple[Lora | Lycoris, float]],
                allow_unmatched: bool = False, text_encoders: dict[str, nn.Module] | None = None
                ) -> MergeRecord:
    """Add Σ ratio·ΔW of each LoRA/LyCORIS adapter to the model's base weights in place; returns what
    `unmerge` needs.

    text_encoders: {"text_encoder": ..., "text_encoder_2": ...} to merge the LoRAs' text-encoder
    modules into too (lora.fit). Every adapter is checked (placement, shapes, finite values) before any
    weight changes.
    """
    placed = []
    for lora, ratio in loras:
        if isinstance(lora, Lycoris):
            targets = lora.fit(model, allow_unmatched)
        else:
            check_finite(lora)
            targets = fit(lora, model, allow_unmatched, text_encoders)
        placed.append((lora, float(ratio), targets))
    delta: dict[str, Tensor] = {}
    layers: dict[str, nn.Module] = {}
    for lora, ratio, targets in placed:
        for path, layer in targets.items():
            m = lora.modules[path]
            d = ratio * (m.delta(layer.weight) if isinstance(lora, Lycoris) else m.delta())   # fp32
            delta[path] = delta[path] + d if path in delta else d
            layers[path] = layer
    record = MergeRecord()
    with torch.no_grad():
        for path, d in delta.items():
            w = layers[path].weight
            merged = (w.float() + d.to(w.device)).to(w.dtype)      # checked as stored: fp16 overflows
            if not torch.isfinite(merged).all():
                unmerge(model, record, text_encoders)
                bad = int((~torch.isfinite(merged)).sum())
                raise ValueError(f"merging gives {bad} non-finite weights in {path} (in the base's "
                                 f"{str(w.dtype).removeprefix('torch.')}): the LoRA ratios or alphas are far "
                                 "too large; nothing was merged or written")
            record.originals[path] = w.detach().clone()
            w.copy_(merged)
    return record


def unmerge(model: nn.Module, record: MergeRecord, text_encoders: dict[str, nn.Module] | None = None) -> None:
    """Put back the exact weights `merge_loras` replaced (in the text encoders too, given the same ones)."""
    layers = layer_paths(model)
    for folder, encoder in (text_encoders or {}).items():
        layers |= text_layer_paths(folder, encoder)
    with torch.no_grad():
        for path, w in record.originals.items():
            layers[path].weight.copy_(w)
    record.originals.clear()


def save_merged(model: nn.Module, path: str | os.PathLike, layout: str = "diffusers",
                dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None):
    """Save a merged (plain) U-Net as a diffusers folder or one LDM-named .safetensors file; `metadata`:
    the record of what was merged (merge_record.record_metadata)."""
    from adapterkit.unet import save_unet
    return save_unet(model, path, layout=layout, dtype=dtype, metadata=metadata)


# Low-rank factorisations ----------------------------------------------------------------------------------

@dataclass
class SvdReport:
    """Relative Frobenius error per layer and over all layers (sqrt of summed squares)."""
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)    # layer -> why nothing was extracted

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]


def _svd_factors(delta: Tensor, rank: int) -> tuple[LoraModule, float, float]:
    """Best rank-`rank` LoRA of `delta` (fp32) and (squared error, squared norm)."""
    kernel = delta.shape[1:]
    U, S, Vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    up = U[:, :r] * root                                          # [out, r]
    down = root[:, None] * Vh[:r]                                 # [r, in*kh*kw]
    if len(kernel) > 1:                                           # conv: down keeps the kernel, up is 1x1
        up, down = up[:, :, None, None], down.reshape(r, *kernel)
    dropped = float((S[r:] ** 2).sum())
    return LoraModule(down.contiguous(), up.contiguous(), float(r)), dropped, float((S ** 2).sum())


def _factored_svd(m: LoraModule, scale: float, rank: int) -> tuple[LoraModule, float, float]:
    """`_svd_factors` of scale·ΔW without forming ΔW: QR of both factors, SVD of an r×r core."""
    up, down = m.up.float().flatten(1), m.down.float().flatten(1)           # [out, r], [r, n]
    qu, ru = torch.linalg.qr(up)                                            # [out, r], [r, r]
    qd, rd = torch.linalg.qr(down.T)                                        # [n, r], [r, r]
    core = (scale * m.scale) * (ru @ rd.T)                                  # [r, r]
    small, dropped, total = _svd_factors(core, rank)
    r = small.rank
    new_up, new_down = qu @ small.up, small.down @ qd.T                     # [out, r'], [r', n]
    if m.down.ndim == 4:
        new_up, new_down = new_up[:, :, None, None], new_down.reshape(r, *m.down.shape[1:])
    return LoraModule(new_down.contiguous(), new_up.contiguous(), float(r)), dropped, total


def _report(parts: dict[str, tuple[float, float]], skipped: dict[str, str] | None = None) -> SvdReport:
    errors = {p: (d / t) ** 0.5 if t > 0 else 0.0 for p, (d, t) in parts.items()}
    total = sum(t for _, t in parts.values())
    overall = (sum(d for d, _ in parts.values()) / total) ** 0.5 if total > 0 else 0.0
    return SvdReport(errors, overall, skipped or {})


def resize_lora(lora: Lora, rank: int) -> tuple[Lora, SvdReport]:
    """Every layer re-factored to at most `rank` by SVD (alpha = new rank); the report gives the error."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    check_finite(lora)
    modules, parts = {}, {}
    for path, m in lora.modules.items():
        modules[path], dropped, total = _factored_svd(m, 1.0, rank)
        parts[path] = (dropped, total)
    out = Lora(modules, _derived_metadata([lora], {"derived": "resize", "rank": rank}),
               names=dict(lora.names), source=f"{lora.source} at rank {rank}")
    return out, _report(parts)


def lycoris_to_lora(lyco: Lycoris, base: UNetConfig | None, rank: int, conv_rank: int | None = None,
                    max_error: float | None = None) -> tuple[Lora, SvdReport]:
    """A plain LoRA approximating each LoHa/LoKr module's full ΔW = scale·raw by its truncated SVD at
    `rank` (3x3 convs at `conv_rank`, default `rank`): what LyCORIS's and kohya's extract tools do for a
    fine-tune, here on the adapter's own ΔW. At a rank >= the ΔW's it is exact.

    base: the U-Net the modules adapt (a LoHa conv's hada_w*_b [r, in·k·k] does not say k; the LoRA's
        lora_down must be [r, in, k, k]). max_error: refuse (nothing returned) if any module's relative
        Frobenius error ||ΔW − ΔW_r|| / ||ΔW|| exceeds it, naming each with the rank it would need.
    DoRA modules are refused: their ΔW depends on the base weights (merge them into a base instead).
    """
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"rank must be >= 1, got {rank if rank < 1 else conv_rank}")
    dora = [lyco.key(p) for p, m in lyco.modules.items() if m.dora_scale is not None]
    if dora:
        raise ValueError(f"{lyco.source}: {len(dora)} DoRA modules ({_list(dora, 4)}) have no LoRA form: "
                         "their ΔW depends on the base's weights (W·dora_scale/||W + ΔW||). Merge the file "
                         "into a base with --base instead")
    if base is None:
        raise ValueError(f"{lyco.source}: the U-Net it adapts is not known (no adapterkit.base_config in its "
                         "metadata, no family its keys show): pass --base (a preset or U-Net path) so conv "
                         "modules get their kernel shape")
    with torch.device("meta"):                      # shapes only: no memory for a real-sized U-Net
        model = UNet(base)
    targets = lyco.fit(model)
    modules, parts, short = {}, {}, []
    for path, layer in sorted(targets.items()):
        m = lyco.modules[path]
        delta = (m.scale * m.raw()).reshape(layer.weight.shape)
        r = conv_rank if (conv_rank and delta.ndim == 4 and delta.shape[-1] > 1) else rank
        modules[path], dropped, total = _svd_factors(delta, r)
        parts[path] = (dropped, total)
        if max_error is not None and total > 0 and (dropped / total) ** 0.5 > max_error:
            short.append(f"{lyco.key(path)} ({(dropped / total) ** 0.5:.2e} at rank {r}, needs rank "
                         f"{_rank_for(delta, max_error)})")
    if short:
        raise ValueError(f"{lyco.source}: {len(short)} of {len(targets)} modules stay above --max-error "
                         f"{max_error:g} at the ranks asked: {_list(short, 6)}; raise --rank/--conv-rank, or "
                         "drop --max-error to accept the error. Nothing was written")
    how = {"derived": "svd", "from": sorted(lyco.kinds()), "rank": rank, "conv_rank": conv_rank}
    lora = Lora(modules, _derived_metadata([lyco], how), names={p: lyco.names[p] for p in modules
                                                                if p in lyco.names},
                source=f"{lyco.source} as a rank-{rank} LoRA")
    return lora, _report(parts)


def _rank_for(delta: Tensor, max_error: float) -> int:
    """The smallest rank whose truncated SVD of `delta` has relative error <= max_error."""
    s2 = torch.linalg.svdvals(delta.flatten(1)) ** 2
    tail = s2.flip(0).cumsum(0).flip(0) / s2.sum()                  # tail[r] = error² at rank r
    return int((tail > max_error ** 2).sum())


# Keys that describe the base, kept on derived LoRAs when all sources agree on them.
_BASE_KEYS = ("adapterkit.base_config", "adapterkit.base_fingerprint", "modelspec.architecture",
              "modelspec.resolution", "ss_base_model_version", "ss_v2")


def _derived_metadata(sources: Sequence[Lora], how: dict) -> dict[str, str]:
    """Base keys the sources agree on, plus what was done (the sources' adapter configs no longer apply)."""
    md = {}
    for k in _BASE_KEYS:
        values = {lora.metadata.get(k) for lora in sources}
        if len(values) == 1 and None not in values:
            md[k] = values.pop()
    sources_cfg = [json.loads(lora.metadata["adapterkit.adapter"]) if "adapterkit.adapter" in lora.metadata
                   else None for lora in sources]
    md["adapterkit.adapter"] = json.dumps(how | {"sources": sources_cfg}, sort_keys=True)
    return md


def combine_loras(loras: Sequence[tuple[Lora, float]], rank: int | None = None) -> tuple[Lora, SvdReport]:
    """One LoRA whose ΔW is Σ ratio_i·ΔW_i per layer.

    rank None: exact, by concatenating the factors along the rank (the ranks add up; each ratio and
    scale is folded into lora_up, alpha = the summed rank). rank r: then SVD to at most r per layer.
    (kohya's merge_lora_models with sqrt-scaled sums is an approximation; this is not.)
    """
    if not loras:
        raise ValueError("nothing to combine")
    for lora, _ in loras:
        check_finite(lora)
        if lora.unplaced:
            raise ValueError(f"{lora.source}: {len(lora.unplaced)} keys could not be placed: "
                             f"{_list(lora.unplaced)}")
    paths = sorted(set().union(*(lora.modules for lora, _ in loras)))
    modules = {}
    for path in paths:
        parts = [(lora.modules[path], ratio) for lora, ratio in loras if path in lora.modules]
        shapes = {(m.up.shape[0], *m.down.shape[1:]) for m, _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"cannot combine {path}: the LoRAs adapt it with different weight "
                             f"shapes {shapes}")
        down = torch.cat([m.down.float() for m, _ in parts], dim=0)
        up = torch.cat([m.up.float() * (ratio * m.scale) for m, ratio in parts], dim=1)
        modules[path] = LoraModule(down, up, float(down.shape[0]))
    how = {"derived": "combine", "ratios": [float(r) for _, r in loras], "rank": rank}
    combined = Lora(modules, _derived_metadata([lora for lora, _ in loras], how),
                    names={p: n for lora, _ in loras for p, n in lora.names.items()},
                    source=f"{len(loras)} combined LoRAs")
    if rank is None:
        return combined, _report({p: (0.0, 1.0) for p in modules})
    resized, report = resize_lora(combined, rank)
    resized.metadata = combined.metadata
    return resized, report


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """Base weights by plain name (peft's `.base_layer` removed, adapter tensors left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def extract_lora(base: nn.Module, tuned: nn.Module, rank: int, targets: str = "full",
                 conv_rank: int | None = None, min_rel_change: float = 0.0) -> tuple[Lora, SvdReport]:
    """A LoRA approximating `tuned - base` on the `targets` layers, by SVD at `rank` (3x3 convs at
    `conv_rank`, default rank). Layers that did not change are skipped; weights that changed but no
    LoRA can carry (biases, norms, untargeted layers) are listed in `report.skipped`.
    """
    if targets not in TARGET_PRESETS:
        raise ValueError(f"unknown targets {targets!r}; choose one of {list(TARGET_PRESETS)}")
    suffixes = TARGET_PRESETS[targets]
    a, b = _plain_state(base), _plain_state(tuned)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("base and fine-tuned U-Nets differ in architecture "
                         f"(keys only in one: {_list(sorted(a.keys() ^ b.keys()))})")
    modules, parts, skipped = {}, {}, {}
    layers = layer_paths(base)
    targeted = {p for p in layers if any(p == s or p.endswith("." + s) for s in suffixes)}
    for path in sorted(layers):
        w = a[f"{path}.weight"].float()
        delta = b[f"{path}.weight"].float() - w
        rel = float(delta.norm()) / max(float(w.norm()), 1e-30)
        if rel == 0 or rel <= min_rel_change:
            continue
        if path not in targeted:
            skipped[f"{path}.weight"] = f"changed (rel {rel:.1e}) but not in targets {targets!r}"
            continue
        r = conv_rank if (conv_rank and delta.ndim == 4 and delta.shape[-1] > 1) else rank
        modules[path], dropped, total = _svd_factors(delta, r)
        parts[path] = (dropped, total)
    for k in a:
        if not k.endswith(".weight") or k[:-len(".weight")] not in layers:
            rel = float((b[k].float() - a[k].float()).norm()) / max(float(a[k].float().norm()), 1e-30)
            if rel > 0:
                skipped[k] = f"changed (rel {rel:.1e}) but a LoRA has no form for it"
    if not modules:
        raise ValueError("the two U-Nets have identical weights in every targeted layer: nothing to extract")
    return Lora(modules, source=f"extracted LoRA (rank {rank})"), _report(parts, skipped)
