"""Triton kernels for the U-Net's memory-bound ops on CUDA: channels-last GroupNorm(+SiLU) and GEGLU.

Why: on a GPU a bf16 U-Net step is bound by passes over activations, not by FLOPs. cuDNN runs its
convolutions in NHWC and, fed NCHW tensors, transposes every input and output (26% of the peer's
kernel time at SD1.5 is layout copies, benchmarks/results/lora_step_sd15_h200_profile.txt). Keeping
the whole U-Net channels-last removes those copies and makes the transformer's (B, HW, C) token view
free, but PyTorch's CUDA GroupNorm accepts NCHW only: it would copy back. These kernels normalise
NHWC tensors in place of it, with the SiLU that follows (ResNet norms, conv_norm_out) fused in.

GroupNorm on x viewed as (N, HW, C) contiguous, groups of C/G adjacent channels, three launches
each way (the glue between them is in the kernels too: at SD1.5 a step calls GroupNorm 61 times, and
a few dozen small torch ops per call made the step CPU-bound):
    forward:  one pass of per-(block of 64 rows, channel) sums and centred sums of squares; one
              program per (sample, group) combines them with Chan et al.'s parallel formula (exact
              per block: no E[x^2] - E[x]^2 cancellation); one pass y = act(x * scale + shift).
    backward: one pass of per-channel sums of dy and dy * x (dy recomputed through the SiLU from x:
              only x is saved, as in unet.ops); one program per (sample, group) turns them into
              dx = (rstd * w) * dy + k0 * x + k1 and the weight/bias gradients; one pass for dx.
Partial sums go to small fp32 buffers reduced in a fixed order (no atomics), so results are
deterministic. Statistics and arithmetic are fp32; storage is the input's dtype.

GEGLU on p = [h | gate] (.., 2I): forward h * gelu(gate) in one pass (erf GELU, as F.gelu), backward
both halves of dp in one pass from p and the output gradient.

Warm-up (issue 21 item 3): Triton compiles a kernel per variant on its first launch, and by default
specialises integer arguments on divisibility by 16 and on the value 1, which made each aspect-ratio
bucket (72 x 56 latents: 18 x 14 and 9 x 7 levels) compile the GroupNorm kernels again (the sd15 job's
second step, its second bucket, took 9 s on the H200, benchmarks/results/job_e2e_sd15_h200_*.json).
The sizes that change with a picture's shape (rows HW, row blocks NB, GEGLU rows R) and the SiLU
switch are `do_not_specialize`d, and the finalize tiles are one width for every group up to 64
channels: an SD U-Net compiles one variant per kernel and dtype, whatever its buckets. Channel counts
stay specialised (their divisibility by 16 is what lets the loads vectorise, and a U-Net's widths do
not change with the picture). `compile_stats()` says how long the first launches took.

`available()` is False without Triton or CUDA (CPU wheels of torch have no Triton); callers then use
the PyTorch ops. Tests: tests/test_kernels.py (marked gpu) against the PyTorch ops.
"""
from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:                                       # CPU-only torch: no Triton
    triton = None

BLOCK_HW, BLOCK_C = 64, 64            # GroupNorm tile: 64 rows (pixels) x 64 channels
BLOCK_R, BLOCK_I = 16, 256            # GEGLU tile: 16 rows (tokens) x 256 features of each half


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports(x: Tensor) -> bool:
    """Whether these kernels take x: a CUDA float tensor in channels-last (4-D) layout."""
    return (x.is_cuda and x.ndim == 4 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.is_contiguous(memory_format=torch.channels_last) and available())


if triton is not None:
    @triton.jit
    def _load_tile(ptr, n, hb, cb, HW, C, BH: tl.constexpr, BC: tl.constexpr):
        # One (BH pixels x BC channels) tile of sample n of a (N, HW, C) tensor, as fp32.
        rows = hb * BH + tl.arange(0, BH)
        cols = cb * BC + tl.arange(0, BC)
        mask = (rows[:, None] < HW) & (cols[None, :] < C)
        offs = n * HW * C + rows[:, None] * C + cols[None, :]
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask, cols

    @triton.jit
    def _affine(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, cols, C, CPG, G):
        # Per-channel scale and shift of the normalisation of sample n: y = x * scale + shift.
        cm = cols < C
        grp = n * G + cols // CPG
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        scale = rstd * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        shift = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32) - mean * scale
        return scale, shift

    @triton.jit
    def _grad_in(x, g, scale, shift, SILU):
        # The gradient at the norm's output: through the SiLU, recomputing y from x.
        if SILU:
            y = x * scale[None, :] + shift[None, :]
            sig = tl.sigmoid(y)
            g = g * sig * (1.0 + y * (1.0 - sig))
        return g

    @triton.jit(do_not_specialize=["HW"])
    def _gn_stats(x_ptr, part_ptr, HW, C, BH: tl.constexpr, BC: tl.constexpr):
        # part (N, blocks, 2, C): per block of rows and channel, the sum and the sum of squares
        # about the block's own mean (exact, whatever the mean).
        n, hb, cb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        x, offs, mask, cols = _load_tile(x_ptr, n, hb, cb, HW, C, BH, BC)
        s = tl.sum(x, axis=0)
        d = tl.where(mask, x - (s / tl.minimum(HW - hb * BH, BH).to(tl.float32))[None, :], 0.0)
        out = part_ptr + (n * tl.num_programs(1) + hb) * 2 * C
        tl.store(out + cols, s, mask=cols < C)
        tl.store(out + C + cols, tl.sum(d * d, axis=0), mask=cols < C)

    @triton.jit(do_not_specialize=["NB", "HW"])
    def _gn_finalize(part_ptr, mean_ptr, rstd_ptr, NB, HW, C, CPG, G, eps,
                     BH: tl.constexpr, BB: tl.constexpr, BG: tl.constexpr):
        # One program per (sample, group): Chan et al.'s combination of the blocks' partial sums.
        n, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        ch = g * CPG + tl.arange(0, BG)
        cmask = tl.arange(0, BG) < CPG
        base = part_ptr + n * NB * 2 * C
        total = tl.zeros([BB, BG], dtype=tl.float32)
        for b0 in range(0, NB, BB):
            blk = b0 + tl.arange(0, BB)
            m = (blk[:, None] < NB) & cmask[None, :]
            total += tl.load(base + blk[:, None] * 2 * C + ch[None, :], mask=m, other=0.0)
        count = HW * CPG
        mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
        m2 = tl.zeros([BB, BG], dtype=tl.float32)
        for b0 in range(0, NB, BB):
            blk = b0 + tl.arange(0, BB)
            m = (blk[:, None] < NB) & cmask[None, :]
            offs = base + blk[:, None] * 2 * C + ch[None, :]
            s = tl.load(offs, mask=m, other=0.0)
            within = tl.load(offs + C, mask=m, other=0.0)
            rows = tl.maximum(tl.minimum(HW - blk * BH, BH), 1).to(tl.float32)[:, None]
            d = s / rows - mean
            m2 += tl.where(m, within + rows * d * d, 0.0)
        var = tl.sum(tl.sum(m2, axis=1), axis=0) / count
        tl.store(mean_ptr + n * G + g, mean)
        tl.store(rstd_ptr + n * G + g, 1.0 / tl.sqrt(var + eps))

    @triton.jit(do_not_specialize=["HW", "SILU"])
    def _gn_apply(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CPG, G, SILU,
                  BH: tl.constexpr, BC: tl.constexpr):
        n, hb, cb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        x, offs, mask, cols = _load_tile(x_ptr, n, hb, cb, HW, C, BH, BC)
        scale, shift = _affine(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, cols, C, CPG, G)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["HW", "SILU"])
    def _gn_bwd_stats(x_ptr, g_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CPG, G,
                      SILU, BH: tl.constexpr, BC: tl.constexpr):
        # part (N, blocks, 2, C): per block of rows and channel, sum(dy) and sum(dy * x).
        n, hb, cb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        x, offs, mask, cols = _load_tile(x_ptr, n, hb, cb, HW, C, BH, BC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale, shift = _affine(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, cols, C, CPG, G)
        dy = _grad_in(x, g, scale, shift, SILU)
        out = part_ptr + (n * tl.num_programs(1) + hb) * 2 * C
        tl.store(out + cols, tl.sum(dy, axis=0), mask=cols < C)
        tl.store(out + C + cols, tl.sum(dy * x, axis=0), mask=cols < C)

    @triton.jit(do_not_specialize=["NB", "HW"])
    def _gn_bwd_finalize(part_ptr, mean_ptr, rstd_ptr, w_ptr, coef_ptr, chan_ptr, NB, HW, C, CPG, G,
                         BB: tl.constexpr, BG: tl.constexpr):
        # One program per (sample, group). With xhat = (x - mean) * rstd and M = HW * CPG:
        # dx = rstd * (dy * w - c1 - xhat * c2), c1 = sum(dy * w) / M, c2 = sum(dy * w * xhat) / M,
        # written dx = (rstd * w) * dy + coef0 * x + coef1. chan (N, 2, C) gets sum(dy) and
        # sum(dy * xhat) per channel: the bias and weight gradients, once summed over samples.
        n, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
        ch = g * CPG + tl.arange(0, BG)
        cmask = tl.arange(0, BG) < CPG
        base = part_ptr + n * NB * 2 * C
        sdy = tl.zeros([BB, BG], dtype=tl.float32)
        sdyx = tl.zeros([BB, BG], dtype=tl.float32)
        for b0 in range(0, NB, BB):
            blk = b0 + tl.arange(0, BB)
            m = (blk[:, None] < NB) & cmask[None, :]
            offs = base + blk[:, None] * 2 * C + ch[None, :]
            sdy += tl.load(offs, mask=m, other=0.0)
            sdyx += tl.load(offs + C, mask=m, other=0.0)
        sum_dy, sum_dyx = tl.sum(sdy, axis=0), tl.sum(sdyx, axis=0)       # per channel
        mean = tl.load(mean_ptr + n * G + g)
        rstd = tl.load(rstd_ptr + n * G + g)
        w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        dy_xhat = (sum_dyx - mean * sum_dy) * rstd
        count = HW * CPG
        c1 = tl.sum(w * sum_dy, axis=0) / count
        c2 = tl.sum(w * dy_xhat, axis=0) / count
        tl.store(coef_ptr + (n * G + g) * 2, -rstd * rstd * c2)
        tl.store(coef_ptr + (n * G + g) * 2 + 1, rstd * (mean * rstd * c2 - c1))
        tl.store(chan_ptr + n * 2 * C + ch, sum_dy, mask=cmask)
        tl.store(chan_ptr + n * 2 * C + C + ch, dy_xhat, mask=cmask)

    @triton.jit(do_not_specialize=["HW", "SILU"])
    def _gn_bwd_apply(x_ptr, g_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, coef_ptr, HW, C, CPG, G,
                      SILU, BH: tl.constexpr, BC: tl.constexpr):
        n, hb, cb = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        x, offs, mask, cols = _load_tile(x_ptr, n, hb, cb, HW, C, BH, BC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale, shift = _affine(mean_ptr, rstd_ptr, w_ptr, b_ptr, n, cols, C, CPG, G)
        dy = _grad_in(x, g, scale, shift, SILU)
        grp = (n * G + cols // CPG) * 2
        k0 = tl.load(coef_ptr + grp, mask=cols < C, other=0.0)
        k1 = tl.load(coef_ptr + grp + 1, mask=cols < C, other=0.0)
        dx = scale[None, :] * dy + k0[None, :] * x + k1[None, :]     # scale = rstd * w
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit(do_not_specialize=["R"])
    def _geglu_fwd(p_ptr, out_ptr, R, I, BR: tl.constexpr, BI: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BI + tl.arange(0, BI)
        mask = (rows[:, None] < R) & (cols[None, :] < I)
        src = p_ptr + rows[:, None] * (2 * I) + cols[None, :]
        h = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(src + I, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * I + cols[None, :], (h * _gelu(gate)).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit(do_not_specialize=["R"])
    def _geglu_bwd(p_ptr, g_ptr, dp_ptr, R, I, BR: tl.constexpr, BI: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BI + tl.arange(0, BI)
        mask = (rows[:, None] < R) & (cols[None, :] < I)
        pair = rows[:, None] * (2 * I) + cols[None, :]
        h = tl.load(p_ptr + pair, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(p_ptr + pair + I, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        tl.store(dp_ptr + pair, (g * gate * cdf).to(dp_ptr.dtype.element_ty), mask=mask)
        tl.store(dp_ptr + pair + I, (g * h * (cdf + gate * pdf)).to(dp_ptr.dtype.element_ty), mask=mask)


# Host seconds and count of the kernels' first launches per compiled variant (`compile_stats`): a first
# launch compiles the variant (or loads it from Triton's disk cache) before it queues the kernel.
_FIRST_LAUNCHES: dict[tuple, float] = {}
_UNSPECIALISED: dict[int, set[int]] = {}          # per kernel: the argument positions not specialised


def _variant(kernel, args: tuple, constexprs: dict) -> tuple:
    """What Triton compiles a variant per: the tensors' dtypes, the specialised integers' divisibility
    by 16 and equality to 1, and the constexprs (the sizes in `do_not_specialize` are left out)."""
    skip = _UNSPECIALISED.get(id(kernel))
    if skip is None:
        names = list(getattr(kernel, "arg_names", ()))
        skip = _UNSPECIALISED[id(kernel)] = {names.index(n) if isinstance(n, str) else n
                                             for n in getattr(kernel, "do_not_specialize", ())
                                             if not isinstance(n, str) or n in names}
    kinds = tuple(a.dtype if isinstance(a, Tensor) else
                  (None if i in skip or not isinstance(a, int) else (a % 16 == 0, a == 1))
                  for i, a in enumerate(args))
    return id(kernel), kinds, tuple(sorted(constexprs.items()))


def _launch(kernel, grid, *args, **constexprs) -> None:
    key = _variant(kernel, args, constexprs)
    if key in _FIRST_LAUNCHES:
        kernel[grid](*args, **constexprs)
        return
    t0 = time.perf_counter()
    kernel[grid](*args, **constexprs)
    _FIRST_LAUNCHES[key] = time.perf_counter() - t0


def compile_stats() -> tuple[int, float]:
    """(variants launched so far, host seconds their first launches took: compiling or loading them).
    The warm-up share of the kernels; the sizes that vary with a picture's shape (rows, the number of
    row blocks) are `do_not_specialize`d, so a new aspect-ratio bucket compiles nothing new."""
    return len(_FIRST_LAUNCHES), sum(_FIRST_LAUNCHES.values())


def _grid(N: int, HW: int, C: int) -> tuple[int, int, int]:
    return N, triton.cdiv(HW, BLOCK_HW), triton.cdiv(C, BLOCK_C)


def _finalize_blocks(cpg: int) -> tuple[int, int]:
    """(blocks, channels) tile of the finalize kernels: all of a group's channels, 4096 values. At
    least 64 channels wide, so that every group width up to 64 (SD's 10, 20 and 40) shares one compiled
    variant: these kernels run one small program per (sample, group), and each variant compiled is
    warm-up time (issue 21 item 3)."""
    bg = max(64, triton.next_power_of_2(cpg))
    return max(1, 4096 // bg), bg


class GroupNormNHWC(torch.autograd.Function):
    """act(group_norm(x)) for channels-last CUDA x; act is SiLU or identity. Saves x and (N, G) stats."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool):
        N, C, H, W = x.shape
        HW, cpg = H * W, C // groups
        grid = _grid(N, HW, C)
        part = x.new_empty(N, grid[1], 2, C, dtype=torch.float32)
        mean = x.new_empty(N, groups, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        y = torch.empty_like(x)                                          # channels-last, like x
        bb, bg = _finalize_blocks(cpg)
        _launch(_gn_stats, grid, x, part, HW, C, BH=BLOCK_HW, BC=BLOCK_C)
        _launch(_gn_finalize, (N, groups), part, mean, rstd, grid[1], HW, C, cpg, groups, eps,
                BH=BLOCK_HW, BB=bb, BG=bg)
        _launch(_gn_apply, grid, x, y, mean, rstd, weight, bias, HW, C, cpg, groups, SILU=silu,
                BH=BLOCK_HW, BC=BLOCK_C)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        N, C, H, W = x.shape
        G = ctx.groups
        HW, cpg = H * W, C // G
        grad = grad.contiguous(memory_format=torch.channels_last)
        grid = _grid(N, HW, C)
        part = x.new_empty(N, grid[1], 2, C, dtype=torch.float32)
        coef = x.new_empty(N, G, 2, dtype=torch.float32)
        chan = x.new_empty(N, 2, C, dtype=torch.float32)
        bb, bg = _finalize_blocks(cpg)
        _launch(_gn_bwd_stats, grid, x, grad, part, mean, rstd, weight, bias, HW, C, cpg, G, SILU=ctx.silu,
                BH=BLOCK_HW, BC=BLOCK_C)
        _launch(_gn_bwd_finalize, (N, G), part, mean, rstd, weight, coef, chan, grid[1], HW, C, cpg, G,
                BB=bb, BG=bg)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _launch(_gn_bwd_apply, grid, x, grad, dx, mean, rstd, weight, bias, coef, HW, C, cpg, G,
                    SILU=ctx.silu, BH=BLOCK_HW, BC=BLOCK_C)
        dw = chan[:, 1].sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = chan[:, 0].sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool) -> Tensor:
    """act(group_norm(x)) for channels-last CUDA x (see `supports`); act = SiLU if `silu`."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    return GroupNormNHWC.apply(x, weight, bias, groups, eps, silu)


class GEGLU(torch.autograd.Function):
    """h * gelu(gate) for contiguous CUDA p = [h | gate]; saves p only."""

    @staticmethod
    def forward(ctx, p: Tensor):
        I = p.shape[-1] // 2
        R = p.numel() // (2 * I)
        out = p.new_empty(*p.shape[:-1], I)
        _launch(_geglu_fwd, (triton.cdiv(R, BLOCK_R), triton.cdiv(I, BLOCK_I)), p, out, R, I,
                BR=BLOCK_R, BI=BLOCK_I)
        ctx.save_for_backward(p)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        I = p.shape[-1] // 2
        R = p.numel() // (2 * I)
        dp = torch.empty_like(p)
        _launch(_geglu_bwd, (triton.cdiv(R, BLOCK_R), triton.cdiv(I, BLOCK_I)), p, grad.contiguous(), dp,
                R, I, BR=BLOCK_R, BI=BLOCK_I)
        return dp


def geglu(p: Tensor) -> Tensor:
    """h * gelu(gate) for a contiguous CUDA p = [h | gate] (last dim even)."""
    return GEGLU.apply(p)
