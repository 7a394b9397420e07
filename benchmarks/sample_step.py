"""One sampling U-Net call, ours vs diffusers' UNet2DConditionModel, identical weights, one process
(issue 21 item 4): what each denoising step of `adapterkit sample` and of the training jobs' sample
grids costs.

The call is guidance's: batch 2 x images (unconditional and conditional halves), sd15, 64 x 64
latents, 77 x 768 context, bf16 weights, no grad, fp32 latents in and the prediction back in fp32
(what a sampler hands the model and reads back). Variants:
- diffusers: `unet(x.to(bf16), t, ctx).sample.float()`, what StableDiffusionPipeline runs each step.
- ours-nchw: our U-Net through the sampler's model_fn (train/pipeline/generate.py), NCHW, eager
  (`adapterkit sample` before issue 21).
- ours-cl: the same channels-last with the NHWC GroupNorm kernels (unet/kernels.py), eager.
- ours-graphs: ours-cl replayed from a CUDA graph (train/pipeline/graphed.py GraphedCall), what
  `generate` runs now on CUDA. Off CUDA it is ours-cl (the graphs fall back to the plain call).

Timed round-robin (benchmarks/unet_speed.py `measure`: median of `--iters` calls each, synchronised);
`vs_diffusers` = our time / diffusers' (target <= 0.5 for ours-graphs). `max_abs_diff` compares each
variant's prediction with diffusers' and ours-graphs with ours-cl on the same inputs (bf16 noise).

    python benchmarks/sample_step.py --json $OUT/sample_step.json                   # the H200
    python benchmarks/sample_step.py --preset tiny --device cpu --size 16 --iters 3 # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adapterkit.train.pipeline.generate import _model_fn  # noqa: E402
from adapterkit.train.pipeline.graphed import GraphedCall, channels_last  # noqa: E402
from adapterkit.unet import PRESETS, Conditioning  # noqa: E402
from benchmarks.unet_speed import build, measure  # noqa: E402


def variants(cfg, ours, theirs, device: str) -> dict:
    """name -> callable(x, t, cond) returning the fp32 prediction."""
    import copy
    dtype = torch.bfloat16
    cl = channels_last(copy.deepcopy(ours), device)           # NHWC where the kernels run (CUDA)
    eager_cl = _model_fn(cl, None, None, 1.0)
    return {"diffusers": lambda x, t, c: theirs(x.to(dtype), t, c.context.to(dtype)).sample.float(),
            "ours-nchw": _model_fn(ours, None, None, 1.0),
            "ours-cl": eager_cl,
            "ours-graphs": GraphedCall(eager_cl, enabled=device == "cuda")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64, help="latent side")
    ap.add_argument("--images", type=int, default=1, help="images per call (the batch is twice that)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "sample_step.json"))
    args = ap.parse_args(argv)
    device, batch = args.device, 2 * args.images
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg, ours, theirs = build(args.preset, device, torch.bfloat16, channels_last=False)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, args.size, args.size, device=device, generator=g)
    t = torch.full((batch,), 981, dtype=torch.int64, device=device)
    cond = Conditioning(torch.randn(batch, 77, cfg.context_dim, device=device, generator=g))
    fns = variants(cfg, ours, theirs, device)
    with torch.no_grad():
        outs = {name: fn(x, t, cond) for name, fn in fns.items()}          # first calls: the capture too
        timed = measure({name: (lambda fn=fn: fn(x, t, cond)) for name, fn in fns.items()}, device,
                        args.iters, args.warmup)
    peer = timed["diffusers"]["s"]
    rows = {name: {"ms": r["s"] * 1e3, "vs_diffusers": r["s"] / peer, "peak_gb": r["peak_gb"]}
            for name, r in timed.items()}
    diff = {name: (outs[name] - outs["diffusers"]).abs().max().item() for name in fns if name != "diffusers"}
    diff["ours-graphs_vs_ours-cl"] = (outs["ours-graphs"] - outs["ours-cl"]).abs().max().item()
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device == "cuda" else device,
              "preset": args.preset, "batch": batch, "size": args.size, "dtype": "bf16", "iters": args.iters,
              "rows": rows, "max_abs_diff": diff, "prediction_scale": outs["diffusers"].abs().max().item(),
              "graphs": len(fns["ours-graphs"].graphs)}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"sampling U-Net call, {args.preset}, batch {batch} (guidance), {args.size}x{args.size} latents, "
          f"bf16, {result['gpu']}, torch {torch.__version__}")
    print(f"  {'variant':14} {'ms':>8} {'vs diffusers':>13} {'max |diff| vs diffusers':>24}")
    for name, r in rows.items():
        print(f"  {name:14} {r['ms']:8.2f} {r['vs_diffusers']:12.2f}x {diff.get(name, 0.0):24.2e}")
    return result


if __name__ == "__main__":
    main()
