"""The U-Net's building blocks.

Attribute names are the weight format: every parameter path matches diffusers'
`UNet2DConditionModel` (`resnets.M.time_emb_proj`, `attentions.M.transformer_blocks.K.attn2.to_q`,
`ff.net.0.proj`, `downsamplers.0.conv`, ...), so diffusers state dicts load with `strict=True` and
peft `target_modules=["to_q", "to_k", "to_v", "to_out.0"]` selects the same layers as everywhere else.
The arithmetic follows shared/research/formats.md §1.2 (the same as LDM's openaimodel.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import geglu, group_norm, group_norm_silu


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps, shape (B,) -> (B, dim), fp32.

    Frequencies exp(-ln(max_period) * i / half) for i < half: DDPM's embedding with diffusers'
    flip_sin_to_cos=True and freq_shift=0, which is what every SD checkpoint was trained with.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                            # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # (B, dim)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear; no activation on the output (SD's `time_embed`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, the time embedding added between, plus a (1x1) shortcut.

    `emb_act` is SiLU(time embedding), computed once per forward by the U-Net instead of in every
    block (diffusers applies the same SiLU inside each block; the result is identical).
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = self.conv1(group_norm_silu(x, self.norm1))
        h = h + self.time_emb_proj(emb_act)[:, :, None, None]              # (B, C, 1, 1) broadcast
        h = self.conv2(group_norm_silu(h, self.norm2))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention with bias-free Q/K/V and a biased output projection `to_out.0`.

    Self-attention when `context` is None (attn1), cross-attention to the text otherwise (attn2).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        # A ModuleList so the output projection is named `to_out.0`, as in every SD weight file.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)            # (B, h, N, d)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, M, d)
        v = self.to_v(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, M, d)
        out = F.scaled_dot_product_attention(q, k, v)                          # (B, h, N, d)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))           # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x width, halves multiplied as h * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU (4x) then Linear back; `net.1` is the (parameter-free) dropout slot of the weight format."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, and GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features -> token sequence -> transformer blocks -> image features, plus a residual.

    diffusers calls it Transformer2DModel. `proj_in`/`proj_out` are 1x1 convs (SD1.x) applied on
    the image layout, or Linear layers (SD2.x) applied on the token layout.
    """

    def __init__(self, dim: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        proj = (lambda: nn.Linear(dim, dim)) if linear_projection else (lambda: nn.Conv2d(dim, dim, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, heads, dim // heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = group_norm(x, self.norm).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view if channels_last
        h = self._project(self.proj_in, h, H, W)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self._project(self.proj_out, h, H, W)
        # Back to (B, C, H, W) in x's memory layout, so the residual add runs on one layout.
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        return x + h

    def _project(self, proj: nn.Module, tokens: Tensor, H: int, W: int) -> Tensor:
        """Apply proj_in/proj_out to (B, HW, C) tokens, whether it is a Linear or a 1x1 Conv.

        A 1x1 conv is a linear map over channels: run as one on the token layout it skips the
        NCHW <-> NHWC transposes cuDNN adds around a conv (as diffusers' Transformer2DModel pays).
        A conv wrapped by an adapter (peft LoRA) is called as a module on the image layout instead,
        so its adapter is never bypassed.
        """
        if self.linear_projection:
            return proj(tokens)
        if type(proj) is nn.Conv2d:
            return F.linear(tokens, proj.weight.flatten(1), proj.bias)
        B, _, C = tokens.shape
        image = tokens.reshape(B, H, W, C).permute(0, 3, 1, 2)               # (B, C, H, W)
        return proj(image).permute(0, 2, 3, 1).reshape(B, H * W, -1)         # (B, HW, C)


def _is_channels_last(x: Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class Downsample(nn.Module):
    """3x3 convolution with stride 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (twice the input unless the encoder had an odd size), 3x3 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
