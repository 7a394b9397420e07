#!/usr/bin/env bash
# One device call that trains the bundled tiny edge ControlNet (assets/tiny-canny) on one GPU:
#   1. renders N_IMAGES world scenes into out/world-cn,
#   2. a 100-step run of configs/tiny_controlnet.yaml to measure steps/s, then the same run resumed
#      with train.steps sized to BUDGET_S seconds (the warm-up is the same for both lengths),
#   3. the quality report with and without the ControlNet on QUALITY_N scenes,
#   4. (BENCH=1) the sd15 ControlNet training-step benchmark against diffusers.
# BASE: the tiny base (default: the bundled one; out/tiny-base/base right after gpu_tiny_base.sh).
set -uo pipefail
BASE=${BASE:-assets/tiny-base}
BUDGET_S=${BUDGET_S:-200}
N_IMAGES=${N_IMAGES:-3072}
QUALITY_N=${QUALITY_N:-256}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
t0=$(date +%s)
python3 -c "from adapterkit.train.world import shapes as world; world.render_folder('out/world-cn', $N_IMAGES, seed=11, overwrite=True)" || exit 1
echo "rendered $N_IMAGES scenes in $(( $(date +%s) - t0 )) s"
run() { python3 -m adapterkit train controlnet configs/tiny_controlnet.yaml model.base=$BASE "$@" 2>&1 | grep -v "it/s\]$" | tail -4; }
t0=$(date +%s)
run train.steps=100 output.checkpoint_every=100 "sample.prompts=[]" || exit 1
echo "timing run (cache build + 100 steps): $(( $(date +%s) - t0 )) s"
STEPS=$(python3 - "$BUDGET_S" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("out/tiny-canny/loss.jsonl")]
rate = (rows[-1]["step"] - rows[19]["step"]) / (rows[-1]["seconds"] - rows[19]["seconds"])
print(f"timing: {rate:.1f} steps/s", file=sys.stderr)
print(max(200, int(rate * float(sys.argv[1]) / 100) * 100))
PY
)
t0=$(date +%s)
run train.steps=$STEPS output.checkpoint_every=$STEPS
echo "controlnet wall: $(( $(date +%s) - t0 )) s to $STEPS steps"
tar czf $OUT/tiny_canny.tgz -C out/tiny-canny tiny-canny loss.jsonl loss.png samples edge_fidelity.jsonl 2>/dev/null
python3 -m adapterkit quality --base $BASE --controlnet out/tiny-canny/tiny-canny --n $QUALITY_N --seed 2 --batch-size 256 \
    --device cuda --grid $OUT/quality_controlnet.png --json $OUT/quality_controlnet.json 2>&1 | tail -8
if [ "${BENCH:-1}" = 1 ]; then
  timeout 300 python3 benchmarks/controlnet_step.py --compile --json $OUT/controlnet_step.json 2>&1 \
      | grep -v "kept in float32\|lru_cache\|originates\|upsampling.py\|is_torch_version\|warn_once\|^$"
fi
ls -la $OUT
