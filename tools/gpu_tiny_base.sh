#!/usr/bin/env bash
# One device call that trains the bundled tiny base (assets/tiny-base) on one GPU:
#   1. configs/tiny_pretrain.yaml with train.steps=STEPS, stopped by SIGINT after BUDGET_S seconds
#      (constant LR + EMA: the last checkpoint's base/ is a finished model; the steps done are printed),
#   2. the quality report of the result (train/world/quality.py) on QUALITY_N prompts.
# Results land in out/tiny-base/ (kept on a warm machine for the ControlNet call) and in $OUT.
set -uo pipefail
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-100000}
QUALITY_N=${QUALITY_N:-256}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
timeout -s INT "$BUDGET_S" python3 -m adapterkit train pretrain configs/tiny_pretrain.yaml output.dir=out/tiny-base \
    train.steps=$STEPS 2>&1 | grep -v "it/s\]$" | tail -6
echo "pretrain wall: $(( $(date +%s) - t0 )) s"
BASE=out/tiny-base/base
[ -d "$BASE" ] || BASE=$(ls -d out/tiny-base/checkpoints/step-*/base | tail -1)
echo "base: $BASE"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("out/tiny-base/loss.jsonl")]
r = rows[-1]; a = rows[min(200, len(rows) - 1)]
rate = (r["step"] - a["step"]) / max(1e-9, r["seconds"] - a["seconds"])
tail = sum(x["loss"] for x in rows[-200:]) / len(rows[-200:])
print(f"steps done: {r['step']} in {r['seconds']:.0f} s, {rate:.2f} steps/s after step {a['step']}; "
      f"mean loss of the last 200 steps {tail:.4f}")
PY
mkdir -p /tmp/pack && rm -rf /tmp/pack/* && cp -r "$BASE" /tmp/pack/base && cp out/tiny-base/loss.jsonl /tmp/pack/
tar czf $OUT/tiny_base.tgz -C /tmp/pack base loss.jsonl || exit 1
python3 -m adapterkit quality --base "$BASE" --n $QUALITY_N --seed 1 --device cuda --batch-size 256 \
    --grid $OUT/quality_base.png --json $OUT/quality_base.json 2>&1 | tail -8
ls -la $OUT
