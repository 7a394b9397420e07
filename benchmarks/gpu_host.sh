#!/usr/bin/env bash
# Issue 21 items 1, 3, 4 on one GPU, in three device calls (each well inside 10 minutes):
#   bash benchmarks/gpu_host.sh tests     the GPU tests of what the branch touched (then the whole -m gpu suite)
#   bash benchmarks/gpu_host.sh jobs      the LoRA and ControlNet jobs end to end beside their steps
#   bash benchmarks/gpu_host.sh sample    the sampling U-Net call, ours vs diffusers, three runs
# Wheels (diffusers, datasets, ...) carried in .whl as for benchmarks/gpu_lora.sh.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
case "${1:-}" in
  tests)
    python3 -m pytest -q -m gpu tests/unet/test_kernels.py tests/train/jobs/test_graphs.py \
      tests/train/jobs/test_batch_prefetch.py tests/train/pipeline/test_graphed.py 2>&1 | tail -15
    timeout 400 python3 -m pytest -q -m gpu tests 2>&1 | tail -8 ;;
  jobs)
    python3 benchmarks/job_e2e.py --json $OUT/job_e2e_lora.json 2>&1 | grep -v "kept in float32" | tail -25
    python3 benchmarks/job_e2e.py --job controlnet --json $OUT/job_e2e_controlnet.json 2>&1 \
      | grep -v "kept in float32" | tail -25 ;;
  sample)
    for run in 1 2 3; do
      python3 benchmarks/sample_step.py --json $OUT/sample_step_run$run.json 2>&1 | grep -v "kept in float32"
    done ;;
  *) echo "usage: $0 tests|jobs|sample"; exit 2 ;;
esac
