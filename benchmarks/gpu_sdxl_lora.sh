#!/usr/bin/env bash
# Issue 15 benchmark on one GPU (H200: the peer at b16 needs ~124 GB): the SDXL LoRA step at 1024 px, ours vs
# diffusers + peft (shared/bench/diffusers_peft_sdxl_baseline.py), batch 4 (eager and graphed), the 12 GB recipe's
# step (gradient checkpointing, attn-ff) beside the peer with checkpointing, the -m gpu suite, then batch 16.
# Wheels (diffusers, peft, datasets, ...) carried in .whl. JSONs under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$(date +%s)
B="python3 benchmarks/lora_step.py --preset sdxl --size 128 --iters 5 --warmup 2"
$B --batch 4 --variants peer,ours-bf16-lora,ours-bf16-lora-graphs --json $OUT/lora_step_sdxl_b4.json 2>&1 | grep -v Casting | tail -7
echo "[b4 $(( $(date +%s) - T0 )) s]"
$B --batch 4 --gradient-checkpointing --targets attn-ff --variants peer,ours-bf16-lora --json $OUT/lora_step_sdxl_b4_ckpt_attnff.json 2>&1 | grep -v Casting | tail -5
echo "[b4 ckpt $(( $(date +%s) - T0 )) s]"
timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | grep -v "^  warn\|Warning" | tail -12
echo "[gpu suite $(( $(date +%s) - T0 )) s]"
$B --batch 16 --variants peer,ours-bf16-lora --json $OUT/lora_step_sdxl_b16.json 2>&1 | grep -v Casting | tail -5
echo "[b16 $(( $(date +%s) - T0 )) s]"
