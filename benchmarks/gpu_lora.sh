#!/usr/bin/env bash
# One device call: the carried wheels, then the LoRA-step table at sd15 (eager, then compiled), our
# step before and after the pass-saving switches side by side (benchmarks/lora_step.py SWITCHES).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
python3 benchmarks/lora_step.py --variants peer,ours-bf16-lora-before,ours-bf16-lora-peft,ours-bf16-lora --json $OUT/lora_step_eager.json 2>&1 | grep -v "kept in float32"
timeout 450 python3 benchmarks/lora_step.py --compile --only-compile --variants peer,ours-bf16-lora-before,ours-bf16-lora --iters 6 --json $OUT/lora_step_compile.json 2>&1 | grep -v "kept in float32\|lru_cache\|originates\|upsampling.py\|is_torch_version\|warn_once\|^$"
