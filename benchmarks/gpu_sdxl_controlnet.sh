#!/usr/bin/env bash
# One device call (carry .whl): the SDXL ControlNet step table (benchmarks/controlnet_step.py --preset sdxl), the peer
# in every process; on a card under 100 GB one variant beside the peer per process at batch 2 (session 26: the
# peer and ours at batch 4 in one process ran out of an H100's 80 GB).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MEM=$(python3 -c "import torch;print(torch.cuda.get_device_properties(0).total_memory>>30)")
run() { timeout $1 python3 benchmarks/controlnet_step.py --preset sdxl --variants $2 --iters 6 --warmup 2 --json $OUT/$3.json "${@:4}" 2>&1 | grep -v "kept in float32"; }
if [ "$MEM" -gt 100 ]; then
  run 280 peer,ours-bf16-cn,ours-bf16-cl128 cn_sdxl_a
  run 240 peer,ours-bf16-cn-graphs cn_sdxl_b
else
  run 190 peer,ours-bf16-cn cn_sdxl_a --batch 2
  run 190 peer,ours-bf16-cl128 cn_sdxl_b --batch 2
  run 190 peer,ours-bf16-cn-graphs cn_sdxl_c --batch 2
fi
