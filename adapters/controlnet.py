"""The ControlNet branch: a trainable copy of the U-Net encoder steered by a hint image.

ControlNet (Zhang et al. 2023, arXiv 2302.05543): the encoder of the frozen U-Net is cloned; a small
hint encoder turns the control image (e.g. a Canny edge map) into features that are added to the
clone's conv_in output; every encoder feature map the U-Net decoder consumes (the skips) and the
mid-block output pass through a zero-initialised 1x1 conv and are handed to the U-Net as residuals,
`unet(x, t, ctx, *controlnet(x, t, ctx, hint))`. At init every residual is exactly zero, so the
U-Net's output is unchanged (tested).

Key contract (tested: diffusers' `ControlNetModel` state dict loads with strict=True and gives the
same residuals; formats.md §4.1):

    conv_in, time_embedding.linear_{1,2}, down_blocks.*, mid_block.*     the encoder clone (U-Net names)
    controlnet_cond_embedding.conv_in            Conv3x3(hint_channels -> 16)
    controlnet_cond_embedding.blocks.{2k, 2k+1}  Conv3x3(w_k -> w_k), Conv3x3 stride 2 (w_k -> w_k+1)
    controlnet_cond_embedding.conv_out           Conv3x3(256 -> C0), zero-initialised
    controlnet_down_blocks.N                     Conv1x1(C_N -> C_N), zero-initialised, N < num_skips
    controlnet_mid_block                         Conv1x1(C_mid -> C_mid), zero-initialised

with hint widths w = (16, 32, 96, 256), i.e. 3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> C0 and
SiLU after every conv but the last. The hint is RGB in [0, 1] at pixel resolution: each stride-2 conv
halves it, so it must be 2**3 = 8 times the latent size (`HintEncoder.downscale`).

Scaling (formats.md §4.4, diffusers `ControlNetModel.forward`): every residual is multiplied by
`conditioning_scale`; in guess mode skip i of n gets `logspace(-1, 0, n + 1)[i] * scale` and the mid
block the last (1.0) factor. lllyasviel's scripts use 0.825**(12 - i) instead (0.0994 vs 0.1 at the
first skip); we follow diffusers.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.unet import Conditioning, Encoder, UNet, UNetConfig, as_conditioning
from adapterkit.unet.families import family_like
from adapterkit.unet.model import ENCODER_PARTS

from .lora_files import base_fingerprint
from .lora_keys import describe_config

HINT_WIDTHS = (16, 32, 96, 256)
HINT_RANGE = (0.0, 1.0)      # the value range every hint image is given in (lllyasviel: uint8 / 255)
_ENCODER_PARTS = tuple(f"{part}." for part in ENCODER_PARTS)   # add_embedding.* in SDXL's


@dataclass(frozen=True)
class HintSpec:
    """The preprocessing contract of a ControlNet: how its hint images are made. Travels in its files.

    kind: what the hint shows; written as ModelSpec's `preprocessor` ("canny", "depth", ...).
    resize: how a hint is brought to the image size. "like-target": the hint gets exactly the resize
        and crop of its target image (aspect bucket, then crop), at 8x the latent resolution.
    canny_low / canny_high: OpenCV `cv2.Canny` thresholds used to make the edge maps, if known.
    Fixed for every hint, recorded for readers: RGB, float values in `HINT_RANGE` = [0, 1].
    """
    kind: str = "canny"
    resize: str = "like-target"
    canny_low: int | None = None
    canny_high: int | None = None

    def __post_init__(self):
        if (self.canny_low is None) != (self.canny_high is None):
            raise ValueError("give both Canny thresholds or neither, got "
                             f"canny_low={self.canny_low}, canny_high={self.canny_high}")
        if self.canny_low is not None and not 0 <= self.canny_low <= self.canny_high:
            raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got "
                             f"{self.canny_low}, {self.canny_high}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "resize": self.resize, "canny_low": self.canny_low,
                "canny_high": self.canny_high, "range": list(HINT_RANGE), "channels": "rgb"}

    @classmethod
    def from_dict(cls, d: dict) -> HintSpec:
        d = dict(d)
        fixed = {"range": list(HINT_RANGE), "channels": "rgb"}
        for key, value in fixed.items():
            found = d.pop(key, value)
            if found != value:
                raise ValueError(f"this ControlNet expects hints with {key}={found!r}; adapterkit "
                                 f"feeds {key}={value!r} hints")
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown hint keys {sorted(unknown)}; valid keys: {sorted(names | set(fixed))}")
        return cls(**d)


class Residuals(NamedTuple):
    """A ControlNet's output, in the order `UNet.forward` takes it: `unet(x, t, ctx, *residuals)`."""
    down: tuple[Tensor, ...]    # one per U-Net skip, `config.num_skips` of them
    mid: Tensor


class HintEncoder(nn.Module):
    """The hint encoder (diffusers `ControlNetConditioningEmbedding`; lllyasviel `input_hint_block`)."""

    def __init__(self, out_channels: int, in_channels: int = 3, widths: Sequence[int] = HINT_WIDTHS):
        super().__init__()
        widths = tuple(widths)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(widths, widths[1:]):
            blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        _zero(self.conv_out)

    @property
    def in_channels(self) -> int:
        return self.conv_in.in_channels

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.conv_in.out_channels, *(b.out_channels for b in self.blocks[1::2]))

    @property
    def downscale(self) -> int:
        """Hint pixels per output pixel: the product of the conv strides (8 for the standard widths)."""
        return math.prod(conv.stride[0] for conv in self.convs())

    def convs(self) -> list[nn.Conv2d]:
        """All convs in order: the lllyasviel `input_hint_block` numbering is 2x this index."""
        return [self.conv_in, *self.blocks, self.conv_out]

    def forward(self, hint: Tensor) -> Tensor:
        h = F.silu(self.conv_in(hint))                                      # (B, 16, 8h, 8w)
        for block in self.blocks:
            h = F.silu(block(h))                                            # ... (B, 256, h, w)
        return self.conv_out(h)                                             # (B, C0, h, w)


def hint_widths_for(latent_scale: int) -> tuple[int, ...]:
    """The hint encoder widths for a base whose latents are `latent_scale` x smaller than its
    pictures: the first log2(latent_scale) + 1 of `HINT_WIDTHS`, one stride-2 conv between each
    pair (SD's VAE, 8x: all four; the tiny base folding 2 x 2 pixel patches: (16, 32))."""
    n = int(math.log2(latent_scale)) if latent_scale >= 1 else -1
    if n < 0 or 2**n != latent_scale or n >= len(HINT_WIDTHS):
        raise ValueError(f"no hint encoder for a latent scale of {latent_scale}: it must be 1, 2, 4 or 8")
    return HINT_WIDTHS[:n + 1]


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.no_grad():
        for p in conv.parameters():
            p.zero_()
    return conv


class ControlNet(Encoder):
    """Encoder clone + hint encoder + zero convs. `cn(x, t, ctx, hint) -> Residuals(down, mid)`.

    Build one from a U-Net with `ControlNet.from_unet(unet)`; `ControlNet(cfg)` is a randomly
    initialised one (for loading weights into). Attributes that travel in its files:
    `hint` (HintSpec, the preprocessing contract), `base_fingerprint` (`unet_fingerprint` of the base
    U-Net it was cloned from; None if unknown) and `metadata` (other header keys, carried over).
    """

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3, hint_widths: Sequence[int] = HINT_WIDTHS):
        super().__init__(cfg)
        self.controlnet_cond_embedding = HintEncoder(cfg.stages[0].channels, hint_channels, hint_widths)
        self.controlnet_down_blocks = nn.ModuleList(
            _zero(nn.Conv2d(c, c, 1)) for c in skip_channels(cfg))
        mid = cfg.stages[-1].channels
        self.controlnet_mid_block = _zero(nn.Conv2d(mid, mid, 1))
        self.hint = HintSpec()
        self.base_fingerprint: str | None = None
        self.metadata: dict[str, str] = {}

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3, hint_widths: Sequence[int] = HINT_WIDTHS,
                  hint: HintSpec | None = None, dtype: torch.dtype = torch.float32) -> ControlNet:
        """A ControlNet whose encoder is a copy of `unet`'s base encoder weights; new layers fresh.

        Works on a U-Net that carries peft LoRA layers (diffusers' `from_unet` raises there): the
        copy is of the base weights, the adapters looked through and left out, as if
        `unet.clone_encoder()` had been called on the plain U-Net. (One path for both: a fresh
        Encoder loaded by name.) Every parameter is trainable and `dtype` (fp32: it is trained);
        the ControlNet lives on the U-Net's device and records the base's fingerprint.
        """
        state = base_encoder_state(unet)
        device = next(unet.parameters()).device
        with torch.device("meta"):      # the encoder is about to be overwritten: no random init
            cn = cls(unet.config, hint_channels, hint_widths)
        cn.to_empty(device=device)
        missing, unexpected = cn.load_state_dict(state, strict=False)
        new = {k for k in cn.state_dict() if not k.startswith(_ENCODER_PARTS)}
        if unexpected or set(missing) != new:
            raise AssertionError(f"encoder copy does not fit: missing {sorted(set(missing) - new)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
        cn.reset_control_layers()
        cn.to(dtype).requires_grad_(True).train(unet.training)
        cn.hint = hint or HintSpec()
        cn.base_fingerprint = base_fingerprint(unet)
        return cn

    def reset_control_layers(self) -> None:
        """Fresh init of the layers a ControlNet adds: torch defaults, then the zero convs zeroed."""
        for conv in self.controlnet_cond_embedding.convs():
            conv.reset_parameters()
        _zero(self.controlnet_cond_embedding.conv_out)
        for conv in self.zero_convs():
            _zero(conv)

    def zero_convs(self) -> list[nn.Conv2d]:
        return [*self.controlnet_down_blocks, self.controlnet_mid_block]

    @property
    def hint_channels(self) -> int:
        return self.controlnet_cond_embedding.in_channels

    @property
    def hint_widths(self) -> tuple[int, ...]:
        return self.controlnet_cond_embedding.widths

    def forward(self, sample: Tensor, timestep, cond: Conditioning | Tensor, hint: Tensor,
                conditioning_scale: float = 1.0, guess_mode: bool = False) -> Residuals:
        """Residuals for `unet(sample, timestep, cond, *residuals)`.

        sample (B, C, h, w) latents, cond a Conditioning or its context (B, T, D), hint (B or 1, 3,
        8h, 8w) RGB in [0, 1].
        """
        self._check_inputs(sample, as_conditioning(cond).context)
        self.check_hint(hint, sample)
        hint = hint.to(self.controlnet_cond_embedding.conv_in.weight.dtype)
        guided = self.controlnet_cond_embedding(hint)                       # (B, C0, h, w)
        skips, mid, _ = self.encode(sample, timestep, cond, input_residual=guided)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        if guess_mode:
            scales = guess_mode_scales(len(down), conditioning_scale, device=mid.device)
            return Residuals(tuple(d * s for d, s in zip(down, scales)), mid * scales[-1])
        return Residuals(tuple(d * conditioning_scale for d in down), mid * conditioning_scale)

    def check_hint(self, hint: Tensor, sample: Tensor) -> None:
        """Raise ValueError, naming expected and found, unless `hint` fits latents `sample`."""
        f, c = self.controlnet_cond_embedding.downscale, self.hint_channels
        b, _, h, w = sample.shape
        want = f"(B={b} or 1, {c}, {f * h}, {f * w})"
        why = (f"for latents {tuple(sample.shape)} the hint must be {want}: {c}-channel pixels at "
               f"{f}x the latent size (the hint encoder's {int(math.log2(f))} stride-2 convs)")
        if not isinstance(hint, Tensor):
            raise ValueError(f"{why}; found a {type(hint).__name__}, not a tensor")
        shape = tuple(hint.shape)
        if hint.ndim != 4 or hint.shape[0] not in (1, b) or shape[1:] != (c, f * h, f * w):
            advice = ""
            if hint.ndim == 4 and hint.shape[-1] == c and hint.shape[1] != c:
                advice = "; it looks channels-last: use hint.permute(0, 3, 1, 2)"
            elif hint.ndim == 4 and hint.shape[1] == 1 and c == 3:
                advice = "; a 1-channel edge map: repeat it to 3 channels (hint.expand(-1, 3, -1, -1))"
            elif hint.ndim == 3:
                advice = "; add the batch dimension (hint[None])"
            elif hint.ndim == 4 and shape[2:] == (h, w):
                advice = "; that is the latent size: pass the hint at pixel resolution"
            raise ValueError(f"{why}; found {shape}{advice}")
        if not hint.is_floating_point():
            raise ValueError(f"hint values must be floats in [0, 1]; found dtype {hint.dtype} "
                             "(divide uint8 images by 255)")
        if hint.is_cuda and torch.cuda.is_current_stream_capturing():
            return               # a CUDA graph being captured (train.graphs) cannot read values back
        lo, hi = (float(v) for v in torch.aminmax(hint.detach()))
        if not (HINT_RANGE[0] <= lo and hi <= HINT_RANGE[1]):
            advice = ""
            if math.isnan(lo) or math.isnan(hi):
                advice = " (NaN values)"
            elif hi > 1 and hi <= 255 and lo >= 0:
                advice = "; it looks like 0..255 pixel values: divide by 255"
            elif lo < 0 and lo >= -1 and hi <= 1:
                advice = "; it looks normalised to [-1, 1]: use (hint + 1) / 2"
            raise ValueError(f"hint values must lie in [0, 1]; found [{lo:.4g}, {hi:.4g}]{advice}")


def guess_mode_scales(n: int, conditioning_scale: float = 1.0, device=None) -> Tensor:
    """The n + 1 guess-mode factors, skips then mid: logspace(-1, 0, n + 1) * scale (diffusers)."""
    return torch.logspace(-1, 0, n + 1, device=device) * conditioning_scale


def skip_channels(cfg: UNetConfig) -> list[int]:
    """Channels of each U-Net skip, in `Features.skips` order: conv_in, then per stage L ResNet(+attn)
    outputs and the downsampler (all stages but the last)."""
    chans = [cfg.stages[0].channels]
    for i, stage in enumerate(cfg.stages):
        chans += [stage.channels] * cfg.layers_per_block
        if i < len(cfg.stages) - 1:
            chans.append(stage.channels)
    return chans


def base_encoder_state(unet: nn.Module) -> dict[str, Tensor]:
    """The U-Net's base encoder weights by plain diffusers name; peft adapter layers looked through.

    `...to_q.base_layer.weight` becomes `...to_q.weight`; `lora_*` tensors are left out. A layer whose
    adapter is merged by peft holds W + ΔW in its base layer, which is not the base: refused.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer) and m.merged]
    if merged:
        raise ValueError(f"{len(merged)} LoRA layers of the U-Net are merged by peft (e.g. {merged[0]}): "
                         "their base weights include the adapter. Unmerge them before cloning the encoder")
    state = {}
    for k, v in unet.state_dict().items():
        if k.startswith(_ENCODER_PARTS) and ".lora_" not in k:
            state[k.replace(".base_layer.", ".")] = v
    return state


class MultiControlNet(nn.Module):
    """Several ControlNets on one U-Net, each with its own hint and scale; residuals are summed.

    Matches diffusers' `MultiControlNetModel` (sum in order, one guess_mode for all).
    """

    def __init__(self, controlnets: Sequence[ControlNet]):
        super().__init__()
        if not controlnets:
            raise ValueError("MultiControlNet needs at least one ControlNet")
        shapes = {(tuple(skip_channels(cn.config)), cn.config.stages[-1].channels) for cn in controlnets}
        if len(shapes) > 1:
            raise ValueError(f"these ControlNets are made for different U-Nets: (skip channels, mid "
                             f"channels) {sorted(shapes)}")
        self.nets = nn.ModuleList(controlnets)

    def forward(self, sample: Tensor, timestep, cond: Conditioning | Tensor, hints: Sequence[Tensor],
                conditioning_scales: float | Sequence[float] = 1.0, guess_mode: bool = False) -> Residuals:
        n = len(self.nets)
        scales = [conditioning_scales] * n if isinstance(conditioning_scales, (int, float)) \
            else list(conditioning_scales)
        if len(hints) != n or len(scales) != n:
            raise ValueError(f"{n} ControlNets need {n} hints and {n} scales; got {len(hints)} hints "
                             f"and {len(scales)} scales")
        return sum_residuals(net(sample, timestep, cond, hint, s, guess_mode)
                             for net, hint, s in zip(self.nets, hints, scales))


def sum_residuals(parts: Iterable[Residuals]) -> Residuals:
    """Element-wise sum of several ControlNets' residuals (each already scaled by its own scale)."""
    total = None
    for down, mid in parts:
        if total is None:
            total = Residuals(tuple(down), mid)
        elif len(down) != len(total.down):
            raise ValueError(f"cannot sum residuals of {len(total.down)} and {len(down)} skips")
        else:
            total = Residuals(tuple(a + b for a, b in zip(total.down, down)), total.mid + mid)
    if total is None:
        raise ValueError("no residuals to sum")
    return total


def check_base(cn: ControlNet, unet: nn.Module, allow_other_base: bool = False) -> None:
    """Raise ValueError, naming both, if `cn` was made for another U-Net than `unet`.

    Architecture must match. The weights fingerprint must match too, unless `allow_other_base`
    (then a warning): a ControlNet usually also works on fine-tunes of its base, but that is the
    user's call. A ControlNet without a recorded fingerprint (another tool's file) is accepted.
    """
    cfg = unet.config
    if not same_architecture(cn.config, cfg):
        raise ValueError(f"this ControlNet was made for {describe_config(cn.config)} "
                         f"{_arch_summary(cn.config)}, but the U-Net is {describe_config(cfg)} "
                         f"{_arch_summary(cfg)}{family_mismatch(cn.config, cfg, 'ControlNet')}")
    if cn.base_fingerprint is None:
        return
    found = base_fingerprint(unet)
    if found != cn.base_fingerprint:
        message = (f"this ControlNet was made from the base U-Net with fingerprint {cn.base_fingerprint}, "
                   f"but this U-Net's base weights have fingerprint {found}")
        if not allow_other_base:
            raise ValueError(message + "; pass allow_other_base=True to apply it anyway (e.g. to a "
                             "fine-tune of its base)")
        warnings.warn(message, stacklevel=2)


def family_mismatch(made_for: UNetConfig, unet: UNetConfig, what: str) -> str:
    """'' if both configs have one family's layout (`family_like`: a reduced SDXL counts as SDXL), else
    a sentence naming both families, e.g. '. An SD1.x ControlNet cannot steer an SDXL U-Net: ...'."""
    a, b = family_like(made_for).title, family_like(unet).title
    if a == b:
        return ""
    first = _a(a)
    return (f". {first[0].upper()}{first[1:]} {what} cannot steer {_a(b)} U-Net: use a {what} made for "
            f"{b} (or the {a} base it was made for)")


def _a(title: str) -> str:
    """'an SDXL', 'an SD1.x', 'a tiny ...': the article as the title is spoken."""
    return f"{'an' if title[0] in 'AEFHILMNORSX' else 'a'} {title}"


def same_architecture(a: UNetConfig, b: UNetConfig) -> bool:
    """Equal configs, ignoring the informative `sample_size`."""
    return a.replace(sample_size=0) == b.replace(sample_size=0)


def _arch_summary(cfg: UNetConfig) -> str:
    return (f"[channels {[s.channels for s in cfg.stages]}, attention {[s.attention for s in cfg.stages]}, "
            f"heads {[s.heads for s in cfg.stages]}, layers_per_block {cfg.layers_per_block}]")
