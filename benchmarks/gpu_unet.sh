#!/usr/bin/env bash
# One device call: install the carried wheels, then the U-Net table at sd15 (eager), with ablations.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__)"
for args in "$@"; do
  echo "=== $args"
  eval "$args"
done
