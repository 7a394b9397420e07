"""A ControlNet training step, ours vs diffusers' ControlNetModel + UNet2DConditionModel (the peer of
shared/bench/diffusers_peft_baseline.py: 58 img/s, 15.7 GB on an H200), identical weights, one process.

Step = ControlNet forward on a 512x512 hint, frozen U-Net forward with its residuals, MSE, backward
into the ControlNet only, AdamW. sd15, batch 8, 64x64 latents, 77x768 context, bf16.

- peer: U-Net bf16 frozen, ControlNet fp32 params, the step under torch.autocast(bf16) (the baseline).
- ours: our U-Net bf16 frozen; `ours` = ControlNet fp32 params, no autocast; `ours-bf16-cn` = the
  ControlNet computing in bf16 with fp32 master weights (train.precision.MasterWeights), as
  `adapterkit train controlnet` does on a bf16 base. Both run channels-last with the Triton kernels
  of unet/kernels.py; `ours-bf16-cn-nchw` is `ours-bf16-cn` in NCHW without them (the code before);
  `ours-bf16-cn-graphs` is the training job's step (train.controlnet_train.ControlledUNet through
  train.graphs.GraphedStep: forward and backward replayed from CUDA graphs); `ours-bf16-cl128` is
  `ours-bf16-cn` trained as a rank-128 Control-LoRA (control.train_rank: 128).

    python benchmarks/controlnet_step.py [--compile]

`--preset sdxl`: the SDXL step of shared/bench/diffusers_peft_sdxl_baseline.py (the peer there: 10.0 img/s
at 51.6 GB on an H200, batch 4): 128x128 latents, 1024 px hints, 77x2048 context, pooled text and size
ids through the added embedding (`added_cond_kwargs` for the peer, a Conditioning for ours), batch 4;
the peer's U-Net carries the baseline's disabled peft LoRA r16, its ControlNet fp32 under autocast.
`--preset sdxl_tiny` is SDXL's block structure at 1/10 width (the tests' SDXL_TINY) for a CPU smoke run:

    python benchmarks/controlnet_step.py --preset sdxl --variants peer,ours-bf16-cn,ours-bf16-cn-graphs
    python benchmarks/controlnet_step.py --preset sdxl_tiny --device cpu --iters 2 --warmup 1 \
        --variants peer,ours,ours-bf16-cn
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adapterkit.unet import PRESETS, Conditioning, Stage, UNet  # noqa: E402
from benchmarks.unet_speed import add_graph_memory, compare_steps, json_writer, print_step_table  # noqa: E402

# SDXL's block structure at 1/10 width (tests/support/unets.py SDXL_TINY): the CPU smoke run of --preset sdxl.
BENCH_PRESETS = {**PRESETS, "sdxl_tiny": PRESETS["sdxl"].replace(
    stages=(Stage(32, attention=False, heads=2), Stage(64, heads=4, depth=2), Stage(64, heads=4, depth=3)),
    context_dim=64, sample_size=16, pooled_dim=32, addition_time_embed_dim=8)}
# Latent side and batch per preset when not given: the baselines' (sd15 batch 8 at 512 px, SDXL batch 4
# at 1024 px).
DEFAULTS = {"sdxl": (128, 4), "sdxl_tiny": (16, 2)}


def added_kwargs(cond: Conditioning) -> dict | None:
    """diffusers' added_cond_kwargs of an SDXL conditioning (ids in the model dtype, as the baseline)."""
    if cond.pooled is None:
        return None
    return {"text_embeds": cond.pooled, "time_ids": cond.time_ids.to(cond.pooled.dtype)}


def peer(cfg, state, device):
    from diffusers import ControlNetModel, UNet2DConditionModel
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k[0] != "_"})
    unet.load_state_dict(state)
    cn = ControlNetModel.from_unet(unet).to(device, torch.float32).train()
    unet.to(device, torch.bfloat16).requires_grad_(False)
    if cfg.addition_embed:          # the SDXL baseline's U-Net: peft LoRA r16 added, then disabled
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        unet.disable_adapters()
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-5)

    def forward(x, t, cond, hint):
        c, added = cond.context, added_kwargs(cond)
        down, mid = cn(x, t, c, controlnet_cond=hint, added_cond_kwargs=added, return_dict=False)
        return unet(x, t, c, added_cond_kwargs=added, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    return forward, opt, True


def ours(cfg, state, device, bf16_cn: bool, channels_last: bool = True, graphs: bool = False,
         rank: int | None = None):
    from adapterkit.adapters.controlnet import ControlNet
    unet = UNet(cfg)
    unet.load_state_dict(state)
    cn = ControlNet.from_unet(unet).to(device).train()
    if rank:                                # Control-LoRA training (control.train_rank): factors train
        from adapterkit.adapters.control_lora import train_as_low_rank
        train_as_low_rank(cn, rank)
    unet.to(device, torch.bfloat16).requires_grad_(False)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        cn.to(memory_format=torch.channels_last)
    params = [p for p in cn.parameters() if p.requires_grad]
    if bf16_cn:
        from adapterkit.train.jobs.precision import MasterWeights
        cn.to(torch.bfloat16)
        master = MasterWeights(params)
        opt = master.wrap(torch.optim.AdamW(master.params, lr=1e-5))
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    dtype = torch.bfloat16 if bf16_cn else torch.float32
    if graphs:                              # the training job's step: train.controlnet_train + train.graphs
        from adapterkit.train.jobs.controlnet import ControlledUNet
        from adapterkit.train.jobs.graphs import GraphedStep
        return GraphedStep(ControlledUNet(unet, cn, 1.0)), opt, False

    def forward(x, t, c, hint):
        res = cn(x.to(dtype), t, c.to(dtype), hint.to(dtype))
        return unet(x, t, c, tuple(r.to(torch.bfloat16) for r in res.down), res.mid.to(torch.bfloat16))
    return forward, opt, False


def conditioning(cfg, batch: int, pixels: int, device, g) -> Conditioning:
    """77 tokens of context; for SDXL also pooled text and the size ids of a square `pixels` picture."""
    ctx = torch.randn(batch, 77, cfg.context_dim, device=device, generator=g, dtype=torch.bfloat16)
    if not cfg.addition_embed:
        return Conditioning(ctx)
    pooled = torch.randn(batch, cfg.pooled_dim, device=device, generator=g, dtype=torch.bfloat16)
    ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=device)
    return Conditioning(ctx, pooled=pooled, time_ids=ids)


def make_step(fn, opt, autocast: bool, data, kernels: bool = True):
    import adapterkit.unet.ops as unet_ops
    x, t, c, hint, noise = data

    def step():
        with unet_ops.use_ops(unet_ops.OpsOptions(kernels=kernels)), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.mse_loss(fn(x, t, c, hint).float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=list(BENCH_PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=None,
                    help="latent side; the hint is 8x (default 64; sdxl 128)")
    ap.add_argument("--batch", type=int, default=None, help="default 8; sdxl 4")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", default="peer,ours-bf16-cn-nchw,ours-bf16-cn,ours-bf16-cn-graphs")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "controlnet_step.json"))
    args = ap.parse_args()
    size, batch = DEFAULTS.get(args.preset, (64, 8))
    args.size, args.batch = args.size or size, args.batch or batch
    device, cfg, H, B = args.device, BENCH_PRESETS[args.preset], args.size, args.batch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    state = UNet(cfg).state_dict()
    g = torch.Generator(device).manual_seed(0)
    data = (torch.randn(B, cfg.in_channels, H, H, device=device, generator=g, dtype=torch.bfloat16),
            torch.randint(0, 1000, (B,), device=device, generator=g),
            conditioning(cfg, B, 8 * H, device, g),
            torch.rand(B, 3, 8 * H, 8 * H, device=device, generator=g),
            torch.randn(B, cfg.out_channels, H, H, device=device, generator=g, dtype=torch.bfloat16))
    builders = {"peer": lambda: peer(cfg, state, device), "ours": lambda: ours(cfg, state, device, False),
                "ours-bf16-cn": lambda: ours(cfg, state, device, True),
                "ours-bf16-cn-nchw": lambda: ours(cfg, state, device, True, channels_last=False),
                "ours-bf16-cn-graphs": lambda: ours(cfg, state, device, True, graphs=True),
                "ours-bf16-cl128": lambda: ours(cfg, state, device, True, rank=128)}
    names = args.variants.split(",")
    built = {n: builders[n]() for n in names}
    make = {n: (lambda compiled, fn=fn, opt=opt, autocast=autocast, n=n:
                make_step(torch.compile(fn) if compiled else fn, opt, autocast, data, not n.endswith("nchw")))
            for n, (fn, opt, autocast) in built.items()}
    rows = compare_steps(make, ["eager"] + (["compile"] if args.compile else []), B, device,
                         args.iters, args.warmup, json_writer(args.json, args))
    add_graph_memory(rows, {n: built[n][0] for n in built}, json_writer(args.json, args))
    print_step_table(rows, names, f"ControlNet training step, {args.preset}, batch {B}, {H}x{H} latents, "
                     f"{8 * H}px hints, bf16, "
                     f"{torch.cuda.get_device_name() if device == 'cuda' else device}")


if __name__ == "__main__":
    main()
