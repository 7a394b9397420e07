"""Our U-Net vs diffusers' UNet2DConditionModel on identical weights, in one process.

Rows: forward (no grad) and forward+backward with input gradients only (frozen weights: the LoRA
training pattern), eager and torch.compile. Speed is images/s; `ratio` = ours / diffusers (> 1 means
we are faster). Peak memory is the largest allocation during the step above what was allocated
before it (both models' weights stay resident and are excluded).

    python benchmarks/unet_speed.py --preset tiny --device cpu --batch 4 --size 32        # CPU smoke
    python benchmarks/unet_speed.py --preset sd15 --device cuda --batch 32 --compile      # the H200 table
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from adapterkit.unet import PRESETS, UNet

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(preset: str, device: str, dtype: torch.dtype, channels_last: bool):
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    ours = UNet(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.to(device, dtype).eval().requires_grad_(False)
    ours.to(device, dtype).eval().requires_grad_(False)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
    return cfg, ours, theirs


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(steps: dict, device: str, iters: int, warmup: int) -> dict:
    """Median seconds per call of each step, timed round-robin (so clock drift and heat hit every
    peer alike), then each step's peak memory above what was allocated before it, in GB."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, step in steps.items():
        peak = float("nan")
        if device == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync(device)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ts = sorted(times[name])
        out[name] = {"s": ts[len(ts) // 2], "peak_gb": peak}
    return out


def compare_steps(make: dict, modes: list[str], batch: int, device: str, iters: int,
                  warmup: int, save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time training-step variants against each other, per mode ("eager" / "compile").

    make: name -> callable(compiled: bool) returning that variant's step. Returns one row per mode:
    {"mode", name: {"img_s", "peak_gb", "first_step_s"}}, printed as JSON as it completes and passed
    with the rows before it to `save` (so a run cut off while compiling keeps its eager rows).
    """
    rows = []
    for mode in modes:
        steps, first = {}, {}
        for name, build in make.items():
            steps[name] = build(mode == "compile")
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            first[name] = time.perf_counter() - t0
        res = measure(steps, device, iters, warmup)
        row = {"mode": mode} | {n: {"img_s": batch / r["s"], "peak_gb": r["peak_gb"],
                                    "first_step_s": first[n]} for n, r in res.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if save:
            save(rows)
    return rows


def json_writer(path: str, args) -> Callable[[list[dict]], None]:
    """A `compare_steps(save=...)` callback: the rows so far, with the arguments and torch version."""
    def save(rows: list[dict]) -> None:
        with open(path, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return save


def add_graph_memory(rows: list[dict], forwards: dict, save: Callable[[list[dict]], None]) -> None:
    """Add to each CUDA-graphed variant's peak the memory its graphs reserved when captured (their
    private pools hold the activations, so `measure`'s peak above the pre-step baseline misses it)."""
    for row in rows:
        for name, fwd in forwards.items():
            extra = getattr(fwd, "reserved_bytes", None)
            if extra is not None and name in row:
                row[name]["graph_gb"] = extra / 2**30
                row[name]["peak_gb"] += extra / 2**30
    save(rows)


def print_step_table(rows: list[dict], names: list[str], title: str) -> None:
    """The rows of `compare_steps` as a table; speed relative to the first variant (the peer)."""
    w = max(16, *map(len, names))
    print(f"\n{title}")
    print(f"{'mode':8} {'variant':{w}} {'img/s':>8} {'vs ' + names[0]:>10} {'peak GB':>8} "
          f"{'first step s':>13}")
    for r in rows:
        for n in names:
            v = r[n]
            print(f"{r['mode']:8} {n:{w}} {v['img_s']:8.1f} {v['img_s'] / r[names[0]]['img_s']:9.2f}x "
                  f"{v['peak_gb']:8.2f} {v['first_step_s']:13.1f}")


def make_steps(model, call, x, t, ctx, task: str, channels_last: bool):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if task == "forward":
        def step():
            with torch.no_grad():
                call(model, x, t, ctx)
    else:
        target = torch.randn_like(x)

        def step():
            xi = x.detach().requires_grad_(True)
            out = call(model, xi, t, ctx)
            torch.nn.functional.mse_loss(out.float(), target.float()).backward()
    return step


def plain_ops(step):
    """The same step with unet.ops' activation-lean autograd ops switched off (an ablation)."""
    import adapterkit.unet.ops as unet_ops
    def run():
        with unet_ops.use_ops(unet_ops.OpsOptions(fused=False)):
            step()
    return run


def profile(name: str, step) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    step()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    print(f"--- {name}: top kernels of one fwd+bwd step")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="latent height and width")
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also run the torch.compile rows")
    ap.add_argument("--channels-last", action="store_true",
                    help="run ours in channels_last (on CUDA through unet/kernels.py's NHWC GroupNorm; "
                         "how the training jobs run there)")
    ap.add_argument("--plain-ops-row", action="store_true",
                    help="also time ours with the activation-lean autograd ops off (eager)")
    ap.add_argument("--profile", action="store_true",
                    help="print the top CUDA kernels of one fwd+bwd step of each model")
    ap.add_argument("--tasks", default="forward,fwd+bwd")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "unet_speed.json"))
    args = ap.parse_args()

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = DTYPES[args.dtype]
    cfg, ours, theirs = build(args.preset, args.device, dtype, args.channels_last)
    g = torch.Generator(device=args.device).manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size, device=args.device, dtype=dtype,
                    generator=g)
    t = torch.randint(0, 1000, (args.batch,), device=args.device, generator=g)
    ctx = torch.randn(args.batch, args.tokens, cfg.context_dim, device=args.device, dtype=dtype,
                      generator=g)
    with torch.no_grad():  # the two models compute the same function before anything is timed
        a, b = ours(x[:2], t[:2], ctx[:2]), theirs(x[:2], t[:2], ctx[:2]).sample
        diff = (a.float() - b.float()).abs().max()
    print(f"max |ours - diffusers| on the same weights ({args.dtype}): {diff.item():.3g}")

    peers = {"diffusers": (theirs, lambda m, *a: m(*a).sample, False),
             "ours": (ours, lambda m, *a: m(*a), args.channels_last)}
    if args.profile:
        for name, (model, call, cl) in peers.items():
            profile(name, make_steps(model, call, x, t, ctx, "fwd+bwd", cl))
    modes = ["eager"] + (["compile"] if args.compile else [])
    rows = []
    for mode in modes:
        for task in args.tasks.split(","):
            steps, first = {}, {}
            for name, (model, call, cl) in peers.items():
                m = torch.compile(model) if mode == "compile" else model
                steps[name] = make_steps(m, call, x, t, ctx, task, cl)
                t0 = time.perf_counter()
                steps[name]()
                sync(args.device)
                first[name] = time.perf_counter() - t0
            if args.plain_ops_row and mode == "eager":
                steps["ours-plain-ops"] = plain_ops(steps["ours"])
            res = measure(steps, args.device, args.iters, args.warmup)
            row = {"mode": mode, "task": task}
            for name, r in res.items():
                row[name] = {"img_s": args.batch / r["s"], "peak_gb": r["peak_gb"],
                             "first_call_s": first.get(name)}
            row["ratio"] = row["ours"]["img_s"] / row["diffusers"]["img_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if mode == "compile":
                torch._dynamo.reset()

    print(f"\n{args.preset}, batch {args.batch}, {args.size}x{args.size} latents, "
          f"{args.tokens}x{cfg.context_dim} context, {args.dtype}, {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"{'mode':8} {'task':8} {'diffusers img/s':>16} {'ours img/s':>11} {'speed ratio':>11} "
          f"{'diffusers GB':>13} {'ours GB':>8}")
    for r in rows:
        print(f"{r['mode']:8} {r['task']:8} {r['diffusers']['img_s']:16.1f} {r['ours']['img_s']:11.1f} "
              f"{r['ratio']:10.2f}x {r['diffusers']['peak_gb']:13.2f} {r['ours']['peak_gb']:8.2f}")
        if "ours-plain-ops" in r:
            p = r["ours-plain-ops"]
            print(f"{'':8} {'(ours, plain autograd ops)':>37} {p['img_s']:11.1f} "
                  f"{p['img_s'] / r['diffusers']['img_s']:10.2f}x {'':13} {p['peak_gb']:8.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
