#!/usr/bin/env bash
# One device call that trains the bundled tiny base (assets/tiny-base) on one GPU:
#   1. a 150-step timing run of configs/tiny_pretrain.yaml (small pool) to measure steps/s,
#   2. the real run with train.steps sized to BUDGET_S seconds of training,
#   3. the quality report of the result (train/quality.py) on QUALITY_N prompts.
# Results land in out/tiny-base/ (kept on a warm machine for the ControlNet call) and in $OUT.
set -uo pipefail
BUDGET_S=${BUDGET_S:-330}
QUALITY_N=${QUALITY_N:-256}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m train.cli train pretrain configs/tiny_pretrain.yaml output.dir=/tmp/timing train.steps=150 \
    data.pool_size=4096 output.checkpoint_every=0 "sample.prompts=[]" 2>&1 | tail -3 || exit 1
STEPS=$(python3 - "$BUDGET_S" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("/tmp/timing/loss.jsonl")]
rate = (rows[-1]["step"] - rows[49]["step"]) / (rows[-1]["seconds"] - rows[49]["seconds"])
steps = int(rate * float(sys.argv[1]) / 100) * 100
print(f"timing: {rate:.1f} steps/s -> {steps} steps in {sys.argv[1]} s", file=sys.stderr)
print(steps)
PY
)
t0=$(date +%s)
python3 -m train.cli train pretrain configs/tiny_pretrain.yaml output.dir=out/tiny-base train.steps=$STEPS \
    output.checkpoint_every=$((STEPS / 2)) 2>&1 | grep -v "it/s\]$" | tail -6
echo "pretrain wall: $(( $(date +%s) - t0 )) s for $STEPS steps"
tar czf $OUT/tiny_base.tgz -C out/tiny-base base loss.jsonl loss.png samples || exit 1
if python3 -m train.cli quality --help >/dev/null 2>&1; then
  python3 -m train.cli quality --base out/tiny-base/base --n $QUALITY_N --seed 1 --device cuda --batch-size 256 \
      --grid $OUT/quality_base.png --json $OUT/quality_base.json 2>&1 | tail -8
fi
ls -la $OUT
