#!/usr/bin/env bash
# Does bfloat16 (or float16 + loss scaling) compute reach float32's accuracy? Trains the embedded digits run
# (configs/digits.py, 600 steps) once per dtype and seed and prints the final test error of each.
#   benchmarks/probes/precision_digits.sh [OUTDIR] [SEEDS...]
#   e.g. benchmarks/probes/precision_digits.sh /tmp/prec 0 1
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/resnet_jax_precision}; shift || true
SEEDS=${@:-0 1}
PY=${PYTHON:-python}
mkdir -p "$OUT"
for seed in $SEEDS; do
  for dtype in float32 bfloat16; do
    wd="$OUT/${dtype}_seed${seed}"; rm -rf "$wd"
    start=$(date +%s)
    PYTHONPATH=$PWD $PY -m resnet_jax.main --config=configs/digits.py --workdir="$wd" \
      --config.model.dtype=$dtype --config.seed=$seed > "$wd.log" 2>&1
    end=$(date +%s)
    $PY - "$wd" "$dtype" "$seed" $((end - start)) <<'PYEOF'
import json, sys
wd, dtype, seed, secs = sys.argv[1:]
rows = [json.loads(l) for l in open(f'{wd}/metrics.jsonl')]
last = [r for r in rows if 'test_error' in r][-1]
print(f'{dtype:9} seed {seed}: test error {100 * last["test_error"]:.2f}% at step {last["step"]}, '
      f'final train loss {rows[-1].get("train_loss", float("nan")):.4f}, {secs} s wall', flush=True)
PYEOF
  done
done
