"""The conditional U-Net: an encoder (conv_in, time embedding, down blocks, mid block) and a decoder.

Key contract (tested against diffusers): parameter names are those of diffusers
`UNet2DConditionModel`:

    conv_in, time_embedding.linear_{1,2}, add_embedding.linear_{1,2} (text_time configs: SDXL),
    down_blocks.B.{resnets.M, attentions.M, downsamplers.0.conv}, mid_block.{resnets.{0,1}, attentions.0},
    up_blocks.B.{resnets.M, attentions.M, upsamplers.0.conv}, conv_norm_out, conv_out

`Encoder` holds the first half (`ENCODER_PARTS`) and is what `UNet.clone_encoder()` returns: the
trainable copy a ControlNet branch starts from. `UNet` extends it with the decoder, so both share one
`encode`.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .conditioning import Conditioning, as_conditioning
from .config import UNetConfig
from .layers import (
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_embedding,
)
from .ops import group_norm_silu

# The encoder's top-level modules, in diffusers' names (add_embedding only in text_time configs).
ENCODER_PARTS = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")


class Features(NamedTuple):
    """What the encoder hands to the decoder."""
    skips: tuple[Tensor, ...]   # conv_in output, then every down ResNet/attention and downsampler output
    mid: Tensor                 # mid-block output
    emb: Tensor                 # SiLU(time embedding [+ added embedding]), (B, time_embed_dim)


class _Checkpointed(nn.Module):
    """Mixin: run a sub-layer through activation checkpointing when enabled.

    Non-reentrant checkpointing (use_reentrant=False) is used because it also works when no input
    requires grad, the situation of a frozen base with LoRA layers inside the block: the reentrant
    variant silently returns no gradients there.
    """
    gradient_checkpointing = False

    def _run(self, layer: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock(_Checkpointed):
    def __init__(self, cin: int, cout: int, stage, cfg: UNetConfig, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps)
            for i in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, stage.heads, stage.depth, cfg.context_dim, cfg.norm_groups,
                               cfg.linear_projection) for _ in range(n)) if stage.attention else None
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, h: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        outputs = []
        for i, resnet in enumerate(self.resnets):
            h = self._run(resnet, h, emb)
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, context)
            outputs.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            outputs.append(h)
        return h, outputs


class MidBlock(_Checkpointed):
    def __init__(self, dim: int, stage, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(dim, dim, cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(
            dim, stage.heads, stage.depth, cfg.context_dim, cfg.norm_groups, cfg.linear_projection)])

    def forward(self, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        h = self._run(self.resnets[0], h, emb)
        h = self._run(self.attentions[0], h, context)
        return self._run(self.resnets[1], h, emb)


class UpBlock(_Checkpointed):
    def __init__(self, cin: int, cout: int, skip_channels: list[int], stage, cfg: UNetConfig,
                 upsample: bool):
        super().__init__()
        # Each ResNet takes [current features | skip] concatenated along channels.
        self.resnets = nn.ModuleList(
            ResnetBlock((cin if i == 0 else cout) + skip, cout, cfg.time_embed_dim, cfg.norm_groups,
                        cfg.norm_eps) for i, skip in enumerate(skip_channels))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, stage.heads, stage.depth, cfg.context_dim, cfg.norm_groups,
                               cfg.linear_projection) for _ in skip_channels) if stage.attention else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor,
                out_size: tuple[int, int] | None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, H, W)
            h = self._run(resnet, h, emb)
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, out_size)
        return h


class Encoder(nn.Module):
    """conv_in + time embedding (+ the added embedding of text_time configs) + down blocks + mid block."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch0 = cfg.stages[0].channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, cfg.time_embed_dim)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
                              if cfg.addition_embed == "text_time" else None)
        blocks, cin = [], ch0
        for i, stage in enumerate(cfg.stages):
            blocks.append(DownBlock(cin, stage.channels, stage, cfg, downsample=i < len(cfg.stages) - 1))
            cin = stage.channels
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(cin, cfg.stages[-1], cfg)

    def embed(self, timestep: Tensor | float | int, cond: Conditioning, batch: int, dtype: torch.dtype,
              device: torch.device) -> Tensor:
        """SiLU(time_embedding(sinusoid(t)) [+ add_embedding(...)]), (B, time_embed_dim): what every
        ResNet block receives. Accepts a scalar or a (B,) timestep."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch)
        sinusoid = timestep_embedding(t, self.config.stages[0].channels).to(dtype)
        emb = self.time_embedding(sinusoid)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(self._text_time(cond, dtype))
        return F.silu(emb)

    def _text_time(self, cond: Conditioning, dtype: torch.dtype) -> Tensor:
        """[pooled | sinusoid(id_0) | ... | sinusoid(id_n-1)], (B, pooled + n*d): diffusers' text_time input.

        Each id (an integer size or crop offset in pixels) is embedded like a timestep, with the same
        [cos | sin] layout (flip_sin_to_cos=True, freq_shift=0, as diffusers' SDXL config sets).
        """
        ids = cond.time_ids
        features = timestep_embedding(ids.flatten(), self.config.addition_time_embed_dim)  # (B*n, d)
        features = features.reshape(ids.shape[0], -1)                                      # (B, n*d)
        return torch.cat([cond.pooled.to(dtype), features.to(dtype)], dim=-1)

    def encode(self, sample: Tensor, timestep, cond: Conditioning | Tensor,
               input_residual: Tensor | None = None) -> Features:
        """Run the encoder. `input_residual` is added to the conv_in output (a ControlNet's hint)."""
        cond = as_conditioning(cond)
        self._check_inputs(sample, cond.context)
        self._check_added(cond)
        emb = self.embed(timestep, cond, sample.shape[0], self.conv_in.weight.dtype, sample.device)
        h = self.conv_in(sample)
        if input_residual is not None:
            h = h + input_residual
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, cond.context)
            skips.extend(outputs)
        h = self.mid_block(h, emb, cond.context)
        return Features(tuple(skips), h, emb)

    forward = encode

    def _check_inputs(self, sample: Tensor, context: Tensor):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] != sample.shape[0]:
            raise ValueError(f"context must be (B={sample.shape[0]}, tokens, {cfg.context_dim}), "
                             f"got {tuple(context.shape)}")

    def _check_added(self, cond: Conditioning) -> None:
        """A text_time U-Net needs pooled and time_ids of the right shapes; any other refuses them."""
        cfg, B = self.config, cond.batch
        given = [name for name in ("pooled", "time_ids") if getattr(cond, name) is not None]
        if cfg.addition_embed is None:
            if given:
                raise ValueError(
                    f"this U-Net has no added embedding (SD1.x/2.x: it is conditioned on the text context "
                    f"alone) but the conditioning carries {' and '.join(given)} (SDXL conditioning); pass "
                    "Conditioning(context) or the context tensor")
            return
        expected = {"pooled": (B, cfg.pooled_dim), "time_ids": (B, cfg.time_ids)}
        missing = [name for name in expected if name not in given]
        if missing:
            raise ValueError(
                f"this U-Net's text_time embedding (SDXL) needs pooled {expected['pooled']} (the pooled text "
                f"embedding) and time_ids {expected['time_ids']} (original size, crop top-left, target "
                f"size); the conditioning lacks {' and '.join(missing)}: pass "
                "Conditioning(context, pooled=..., time_ids=...)")
        for name, shape in expected.items():
            got = tuple(getattr(cond, name).shape)
            if got != shape:
                raise ValueError(f"{name} must be {shape} for this U-Net, got {got}")

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet and transformer in the backward pass instead of storing activations."""
        for m in self.modules():
            if isinstance(m, _Checkpointed):
                m.gradient_checkpointing = enabled


class UNet(Encoder):
    """SD-style conditional U-Net: `model(sample, timestep, context) -> noise prediction`."""

    def __init__(self, cfg: UNetConfig | None = None):
        cfg = cfg or UNetConfig()
        super().__init__(cfg)
        rev = list(reversed(cfg.stages))
        skip_ch = self._skip_channels()
        blocks, cin = [], rev[0].channels
        for i, stage in enumerate(rev):
            n = cfg.layers_per_block + 1
            skips = [skip_ch.pop() for _ in range(n)]
            blocks.append(UpBlock(cin, stage.channels, skips, stage, cfg, upsample=i < len(rev) - 1))
            cin = stage.channels
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def _skip_channels(self) -> list[int]:
        cfg, chans = self.config, [self.config.stages[0].channels]
        for i, stage in enumerate(cfg.stages):
            chans += [stage.channels] * cfg.layers_per_block
            if i < len(cfg.stages) - 1:
                chans.append(stage.channels)
        return chans

    def decode(self, features: Features, cond: Conditioning | Tensor) -> Tensor:
        """Run the decoder on (possibly ControlNet-adjusted) encoder features."""
        return self._decode(list(features.skips), features.mid, features.emb, as_conditioning(cond).context)

    def _decode(self, skips: list[Tensor], h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        # Pops `skips` as the decoder consumes them, so each is freed as soon as it is used.
        for block in self.up_blocks:
            n = len(block.resnets)
            # The upsampler must reproduce the size of the skip the next block consumes (odd sizes).
            out_size = skips[-n - 1].shape[-2:] if block.upsamplers is not None else None
            h = block(h, skips, emb, context, out_size)
        return self.conv_out(group_norm_silu(h, self.conv_norm_out))

    def forward(self, sample: Tensor, timestep, cond: Conditioning | Tensor,
                down_residuals: tuple[Tensor, ...] | None = None,
                mid_residual: Tensor | None = None) -> Tensor:
        """Predict noise (or v) for `sample` (B, C, H, W) at `timestep` given `cond`: a Conditioning
        or its bare context (B, T, D).

        `down_residuals` (one per skip, `config.num_skips` of them) and `mid_residual` are added to
        the encoder features before decoding: the ControlNet interface. They are never modified.
        """
        context = as_conditioning(cond).context
        skips, mid, emb = self.encode(sample, timestep, cond)
        skips = list(skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + r for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            mid = mid + mid_residual
        return self._decode(skips, mid, emb, context)

    def clone_encoder(self) -> Encoder:
        """A deep copy of the encoder (`ENCODER_PARTS`: conv_in, time and added embeddings, down blocks,
        mid block); shares no parameters."""
        enc = Encoder.__new__(Encoder)
        nn.Module.__init__(enc)
        enc.config = self.config
        for name in ENCODER_PARTS:
            setattr(enc, name, copy.deepcopy(getattr(self, name)))
        return enc
