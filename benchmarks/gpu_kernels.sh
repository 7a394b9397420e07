#!/usr/bin/env bash
# One device call (~6 minutes): the GPU tests (Triton kernels, CUDA graphs, the LoRA and ControlNet jobs
# graphed vs eager), then the eager LoRA step at sd15 (peer, ours, ours graphed) and the ControlNet step
# table (NCHW, channels-last + kernels, + CUDA graphs). `COMPILE=1` runs the LoRA step's torch.compile
# rows instead (~5 minutes: each side compiles for ~2). Results land in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
quiet() { grep -v "kept in float32\|lru_cache\|originates\|is_torch_version\|warn_once\|AccumulateGrad\|run_backward\|File \|^  \|^$"; }
if [ "${COMPILE:-0}" = 1 ]; then
    timeout 400 python3 benchmarks/lora_step.py --only-compile --iters 6 --variants peer,ours-bf16-lora \
        --json $OUT/lora_step_compile.json 2>&1 | quiet | tail -6
    exit
fi
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -W ignore::UserWarning tests/unet/test_kernels.py \
    tests/train/jobs/test_graphs.py tests/train/jobs/test_lora_train.py tests/train/jobs/test_controlnet_train.py 2>&1 | grep -v "^\[\|Loading\|lora:\|controlnet:" | tail -30
timeout 150 python3 benchmarks/lora_step.py --iters 8 --variants peer,ours-bf16-lora,ours-bf16-lora-graphs \
    --json $OUT/lora_step_eager.json 2>&1 | quiet | tail -6
timeout 150 python3 benchmarks/controlnet_step.py --iters 8 --json $OUT/controlnet_step_eager.json 2>&1 | quiet | tail -8
