"""A LoRA training step, ours vs diffusers + peft (the peer in shared/bench/diffusers_peft_baseline.py),
on identical weights in one process.

Step = forward, loss, backward, AdamW step on LoRA r=16 over to_q/to_k/to_v/to_out.0, from cached
latents (random tensors here: the VAE is not part of the step), batch 32, 64x64, 77x768 context, bf16.
`--preset sdxl --size 128 --batch 4` is the SDXL step at 1024 px of
shared/bench/diffusers_peft_sdxl_baseline.py (77x2048 context, pooled text 1280 and six size/crop ids
through the added embedding);
`--gradient-checkpointing` turns it on in every variant (the peer's enable_gradient_checkpointing).

- peer: UNet2DConditionModel in bf16 + `unet.add_adapter(LoraConfig(...))`, LoRA params fp32,
  the step under torch.autocast(bf16): exactly the baseline script's step.
- ours: our U-Net in bf16, channels-last + `adapters.lora.add_lora` (peft), fp32 LoRA params, no
  autocast; the activation-lean ops and the Triton kernels (unet/kernels.py) on. `ours-bf16-lora`
  runs the LoRA branch in bf16 with fp32 master weights in the optimizer (train.precision.MasterWeights).
- ours-bf16-lora-* : the same model and step with some of the pass-saving switches off (SWITCHES), so
  one run measures old and new code side by side: `-before` is the code path before the fused LoRA
  Linear (adapters/lora_fused.py) and the in-place GEGLU (unet/ops.py); `-peft` turns off only the
  fused LoRA Linear; `-fused-compiled` also uses the fused LoRA Linear under torch.compile (by
  default compiled graphs trace peft's forward; in eager it equals `ours-bf16-lora`); `-nchw` is the
  U-Net in NCHW without the Triton kernels (the code before them), `-nokernels` channels-last without them;
  `-graphs` replays the U-Net's forward and backward from CUDA graphs (train.graphs.GraphedStep, as the
  training job does: no Python or launch cost per kernel; the optimizer step stays eager).

    python benchmarks/lora_step.py                 # eager rows
    python benchmarks/lora_step.py --compile       # + torch.compile rows
    python benchmarks/lora_step.py --preset tiny --device cpu --batch 2 --size 16 --iters 2 --warmup 1
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adapterkit.unet import PRESETS, Conditioning, UNet  # noqa: E402
from benchmarks.unet_speed import add_graph_memory, compare_steps, json_writer, print_step_table  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The U-Net presets, and `sdxl-tiny`: the SDXL block structure (text_time embedding, linear proj,
# attention only in the lower stages) at small widths, for a CPU smoke run of the SDXL path.
SDXL_TINY = PRESETS["sdxl"].replace(
    stages=tuple(dataclasses.replace(s, channels=c, heads=2, depth=min(s.depth, 2))
                 for s, c in zip(PRESETS["sdxl"].stages, (32, 64, 64))),
    context_dim=64, pooled_dim=32, addition_time_embed_dim=8, sample_size=16)
BENCH_PRESETS = PRESETS | {"sdxl-tiny": SDXL_TINY}

# Variant -> the options its step runs under (unet.ops.OpsOptions, adapters.lora_fused.FusedLoraOptions
# keyword arguments); the rest keep their defaults.
SWITCHES = {
    "ours-bf16-lora-before": ({"in_place": False}, {"enabled": False}),
    "ours-bf16-lora-peft": ({}, {"enabled": False}),
    "ours-bf16-lora-fused-compiled": ({}, {"compiled": True}),
    "ours-bf16-lora-nchw": ({"kernels": False}, {}),
    "ours-bf16-lora-nokernels": ({"kernels": False}, {}),
    "ours-bf16-lora-graphs": ({}, {}),
}
NCHW = {"ours-bf16-lora-nchw"}         # built without channels_last: the U-Net as before unet/kernels.py


def peer(cfg, state, device, checkpointing: bool = False, adapter=None):
    """diffusers' U-Net in bf16 + `adapter` (a peft config; default LoRA r16 on TARGETS), fp32 adapter
    tensors, AdamW: the peer scripts' setup."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    unet.load_state_dict(state)
    unet.to(device, torch.bfloat16).requires_grad_(False)
    unet.add_adapter(adapter or LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                           target_modules=TARGETS))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    opt = torch.optim.AdamW(lora, lr=1e-4)

    def forward(x, t, c):
        added = None if c.pooled is None else {"text_embeds": c.pooled, "time_ids": c.time_ids}
        return unet(x, t, c.context, added_cond_kwargs=added).sample
    return unet, forward, opt, lora, True


def ours(cfg, state, device, bf16_lora: bool, channels_last: bool = True, targets: str = "attn",
         checkpointing: bool = False, spec=None):
    """Our U-Net in bf16 (channels-last) + `spec` (any adapter spec; default LoRA r16 on `targets`)
    through adapters.adapter.attach_layers, the adapter in bf16 with fp32 masters if `bf16_lora`."""
    from adapterkit.adapters.adapter import attach_layers
    from adapterkit.adapters.lora import LoraSpec
    unet = UNet(cfg)
    unet.load_state_dict(state)
    unet.to(device, torch.bfloat16).requires_grad_(False)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    attach_layers(unet, spec or LoraSpec(rank=16, alpha=16, targets=targets))
    unet.set_gradient_checkpointing(checkpointing)
    lora = [p for p in unet.parameters() if p.requires_grad]
    if bf16_lora:
        from adapterkit.train.jobs.precision import MasterWeights
        for p in lora:
            p.data = p.data.to(torch.bfloat16)
        master = MasterWeights(lora)
        opt = master.wrap(torch.optim.AdamW(master.params, lr=1e-4))
    else:
        opt = torch.optim.AdamW(lora, lr=1e-4)
    return unet, unet, opt, lora, False


def conditioning(cfg, B: int, device, g: torch.Generator, side: int) -> Conditioning:
    """Random text context (77 tokens) and, for text_time U-Nets (SDXL), pooled text and the size/crop
    ids of an uncropped square `side`-px picture, as the SDXL peer script feeds them."""
    context = torch.randn(B, 77, cfg.context_dim, device=device, generator=g, dtype=torch.bfloat16)
    if not cfg.addition_embed:
        return Conditioning(context)
    ids = torch.tensor([[side, side, 0, 0, side, side]] * B, device=device, dtype=torch.bfloat16)
    return Conditioning(context, torch.randn(B, cfg.pooled_dim, device=device, generator=g,
                                             dtype=torch.bfloat16), ids)


def add_step_arguments(ap: argparse.ArgumentParser, iters: int) -> None:
    """The geometry and timing arguments every step benchmark here takes."""
    ap.add_argument("--preset", default="sd15", choices=list(BENCH_PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=64, help="latent side (64: 512 px; 128: 1024 px)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--warmup", type=int, default=3)


def step_setup(cfg, B: int, H: int, device) -> tuple[dict, tuple]:
    """TF32 and cuDNN autotuning on; the U-Net weights every variant loads (seed 0, on the CPU) and one
    batch: noisy latents, timesteps, conditioning, target noise (seeded on `device`)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device("cpu"):
        state = UNet(cfg).state_dict()
    g = torch.Generator(device).manual_seed(0)
    data = (torch.randn(B, 4, H, H, device=device, generator=g, dtype=torch.bfloat16),
            torch.randint(0, 1000, (B,), device=device, generator=g),
            conditioning(cfg, B, device, g, side=8 * H),
            torch.randn(B, 4, H, H, device=device, generator=g, dtype=torch.bfloat16))
    return state, data


def make_step(model_fn, opt, autocast: bool, data, switches=(), sdpa: str = "default"):
    """One training step; `switches` (module, attribute, value) and the SDPA backend choice
    (torch.nn.attention.SDPBackend name, or "default") hold only while it runs."""
    import contextlib
    x, t, c, noise = data
    from adapterkit.adapters.lora_fused import FusedLoraOptions, use_fused_lora
    from adapterkit.unet.ops import OpsOptions, use_ops
    ops, fused = (OpsOptions(**switches[0]), FusedLoraOptions(**switches[1])) if switches else \
        (OpsOptions(), FusedLoraOptions())
    if sdpa == "default":
        backend = contextlib.nullcontext
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = lambda: sdpa_kernel(getattr(SDPBackend, sdpa.upper()))

    def step():
        with use_ops(ops), use_fused_lora(fused):
            with backend(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = model_fn(x, t, c)
                loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def profile(name: str, step) -> None:
    """Kernel time of one step, by kernel and by kind (GEMM, conv, attention, norm, elementwise, copy)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    for _ in range(2):
        step()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    kinds = {"attention": ("sdpa", "flash", "fmha", "attention"),
             "conv": ("conv", "xmma", "implicit", "dgrad", "wgrad"),
             "gemm": ("gemm", "nvjet", "cutlass", "sm90_"), "norm": ("norm", "Norm"),
             "layout copy": ("nchwToNhwc", "nhwcToNchw", "copy", "Copy", "cat"),
             "elementwise": ("elementwise",)}
    totals, total = {}, 0.0
    for e in p.key_averages():
        t = e.self_device_time_total
        if t <= 0:
            continue
        total += t
        kind = next((k for k, keys in kinds.items() if any(s in e.key for s in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + t
    print(f"--- {name}: {total / 1e3:.1f} ms of kernels in one step")
    for k, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {k:12} {t / 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=90))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap, iters=10)
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows")
    ap.add_argument("--only-compile", action="store_true", help="only the torch.compile rows")
    ap.add_argument("--variants", default="peer,ours-bf16-lora-before,ours-bf16-lora",
                    help="comma-separated, first is the reference: peer, ours, ours-bf16-lora, "
                         + ", ".join(SWITCHES))
    ap.add_argument("--targets", default="attn", choices=["attn", "attn-ff", "full"],
                    help="our variants' LoRA targets (adapters.lora.TARGET_PRESETS); the peer keeps attn")
    ap.add_argument("--sdpa", default="default",
                    choices=["default", "flash_attention", "efficient_attention", "cudnn_attention", "math"],
                    help="force one SDPA backend in our variants (the peer keeps PyTorch's choice)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="activation checkpointing in every variant (CUDA graphs then fall back to eager)")
    ap.add_argument("--profile", action="store_true", help="print each variant's top CUDA kernels, then stop")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "lora_step.json"))
    args = ap.parse_args()
    device, cfg, H, B = args.device, BENCH_PRESETS[args.preset], args.size, args.batch
    state, data = step_setup(cfg, B, H, device)
    tg, ck = args.targets, args.gradient_checkpointing
    builders = {"peer": lambda: peer(cfg, state, device, ck),
                "ours": lambda: ours(cfg, state, device, False, targets=tg, checkpointing=ck),
                "ours-bf16-lora": lambda: ours(cfg, state, device, True, targets=tg, checkpointing=ck)}
    builders |= {n: (lambda n=n: ours(cfg, state, device, True, channels_last=n not in NCHW, targets=tg,
                                      checkpointing=ck))
                 for n in SWITCHES}
    names = args.variants.split(",")
    unknown = [n for n in names if n not in builders]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(builders)}")
    built = {n: builders[n]() for n in names}
    sdpa = lambda n: args.sdpa if n.startswith("ours") else "default"
    if args.profile:
        for n, (_, fn, opt, _, autocast) in built.items():
            profile(n, make_step(fn, opt, autocast, data, SWITCHES.get(n, ()), sdpa(n)))
        return
    for n in [n for n in built if n.endswith("-graphs")]:      # the training job's step (train.graphs)
        from adapterkit.train.jobs.graphs import GraphedStep
        unet, fn, *rest = built[n]
        built[n] = (unet, GraphedStep(fn), *rest)
    make = {n: (lambda compiled, fn=fn, opt=opt, autocast=autocast, n=n:
                make_step(torch.compile(fn) if compiled else fn, opt, autocast, data, SWITCHES.get(n, ()),
                          sdpa(n)))
            for n, (_, fn, opt, _, autocast) in built.items()}
    modes = ["compile"] if args.only_compile else ["eager"] + (["compile"] if args.compile else [])
    rows = compare_steps(make, modes, B, device, args.iters, args.warmup, json_writer(args.json, args))
    add_graph_memory(rows, {n: built[n][1] for n in built}, json_writer(args.json, args))
    print_step_table(rows, names, f"LoRA r16 attn training step, {args.preset}, batch {B}, {H}x{H} latents, "
                     f"77x{cfg.context_dim} context{', checkpointing' if ck else ''}, bf16, "
                     f"{torch.cuda.get_device_name() if device == 'cuda' else device}")


if __name__ == "__main__":
    main()
