"""The training step of each adapter kind (LoRA, LoHa, LoKr, DoRA), ours vs the same kind in peft
alone, on identical U-Net weights in one process (issue 20's benchmark).

Step = forward, loss, backward, AdamW step on the adapter over to_q/to_k/to_v/to_out.0, rank 16,
alpha 16, from random latents (the VAE is not part of the step), bf16 base; sd15 batch 32 at 64x64
by default, `--preset sdxl --size 128 --batch 4` for SDXL at 1024 px.

- peer-<kind>: diffusers UNet2DConditionModel in bf16 + `unet.add_adapter(config)` with peft's
  LoraConfig / LoHaConfig / LoKrConfig / LoraConfig(use_dora=True), adapter tensors fp32, the step
  under torch.autocast(bf16): what a diffusers-example-style script does.
- ours-<kind>: our U-Net in bf16, channels-last, the adapter from adapters.adapter.attach_layers
  (LoraSpec / LycorisSpec) as the training job builds it: adapter tensors in bf16 with fp32 masters in
  the optimizer (train.jobs.optimizer.adapter_master_weights), no autocast. `ours-dora` is the
  column-wise DoRA the clients load (adapters/lycoris_dora.py); `ours-dora-row` peft's row-wise one on
  our U-Net (the same computation as peer-dora).

    python benchmarks/adapter_kinds_step.py --json $OUT/adapter_kinds.json
    python benchmarks/adapter_kinds_step.py --preset sdxl-tiny --device cpu --batch 2 --size 16 \\
        --iters 1 --warmup 1
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.lora_step import (  # noqa: E402
    BENCH_PRESETS,
    TARGETS,
    add_step_arguments,
    make_step,
    ours,
    peer,
    step_setup,
)
from benchmarks.unet_speed import compare_steps, json_writer, print_step_table  # noqa: E402

KINDS = ("lora", "loha", "lokr", "dora")
RANK = 16


def peer_config(kind: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    common = dict(r=RANK, target_modules=TARGETS)
    if kind == "loha":
        return LoHaConfig(alpha=RANK, init_weights=True, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=RANK, init_weights=True, **common)
    return LoraConfig(lora_alpha=RANK, init_lora_weights="gaussian", use_dora=kind == "dora", **common)


def ours_spec(kind: str):
    from adapterkit.adapters.lora import LoraSpec
    from adapterkit.adapters.lycoris import LycorisSpec
    if kind == "lora":
        return LoraSpec(rank=RANK, alpha=RANK, targets="attn")
    return LycorisSpec(kind="dora" if kind.startswith("dora") else kind, rank=RANK, alpha=RANK,
                       targets="attn", dora_axis="output" if kind == "dora-row" else "input")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(ap, iters=8)
    ap.add_argument("--kinds", default=",".join(KINDS + ("dora-row",)),
                    help="comma-separated: lora, loha, lokr, dora (ours column-wise, the peer peft's "
                         "row-wise DoRA), dora-row (ours with peft's row-wise DoRA, against peer-dora)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "adapter_kinds_step.json"))
    args = ap.parse_args()
    device, cfg, H, B = args.device, BENCH_PRESETS[args.preset], args.size, args.batch
    state, data = step_setup(cfg, B, H, device)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS + ("dora-row",)]
    if unknown:
        ap.error(f"unknown kinds {unknown}")
    names, rows = [], []
    for kind in kinds:             # one kind at a time: two models resident, not ten
        make = {}
        if kind != "dora-row":
            _, fn, opt, _, autocast = peer(cfg, state, device, adapter=peer_config(kind))
            make[f"peer-{kind}"] = lambda compiled, fn=fn, opt=opt, a=autocast: make_step(fn, opt, a, data)
        _, fn, opt, _, autocast = ours(cfg, state, device, True, spec=ours_spec(kind))
        make[f"ours-{kind}"] = lambda compiled, fn=fn, opt=opt, a=autocast: make_step(fn, opt, a, data)
        row = compare_steps(make, ["eager"], B, device, args.iters, args.warmup)[0]
        rows.append(row)
        names += list(make)
        json_writer(args.json, args)(rows)
        del make, fn, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    merged = {"mode": "eager"} | {k: v for row in rows for k, v in row.items() if k != "mode"}
    for kind in kinds:                          # each row's ratio is to its own kind's peer
        peer_row = merged.get(f"peer-{'dora' if kind == 'dora-row' else kind}")
        if peer_row:
            merged[f"ours-{kind}"]["vs_peer"] = merged[f"ours-{kind}"]["img_s"] / peer_row["img_s"]
    json_writer(args.json, args)(rows + [merged])
    title = (f"adapter r{RANK} attn training step by kind, {args.preset}, batch {B}, {H}x{H} latents, bf16, "
             f"{torch.cuda.get_device_name() if device == 'cuda' else device}")
    print_step_table([merged], names, title)
    print("ours vs the same kind in peft: " + ", ".join(
        f"{k} {merged[f'ours-{k}']['vs_peer']:.2f}x" for k in kinds if "vs_peer" in merged[f"ours-{k}"]))


if __name__ == "__main__":
    main()
