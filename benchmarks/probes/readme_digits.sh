#!/usr/bin/env bash
# The README's first command (ResNet-20 on the embedded digits, 600 steps) over several seeds: wall time and final
# test error of each, so the README can state a measured range rather than one run.
#   PYTHON=.venv/bin/python SEEDS="0 1 2" OUT=runs/readme_digits benchmarks/probes/readme_digits.sh \
#     [extra --config flags]
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}; SEEDS=${SEEDS:-0 1 2}; OUT=${OUT:-runs/readme_digits}
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)"
for seed in $SEEDS; do
  rm -rf "$OUT/seed$seed"
  start=$(date +%s.%N)
  $PYTHON -m resnet_jax.main --config=configs/digits.py --workdir="$OUT/seed$seed" --config.seed=$seed "$@" \
    > "$OUT.seed$seed.log" 2>&1 || { echo "seed $seed failed: $(tail -1 "$OUT.seed$seed.log")"; continue; }
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  $PYTHON - "$OUT/seed$seed/metrics.jsonl" "$seed" "$wall" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last = [r for r in rows if 'test_error' in r][-1]
print(f'seed {sys.argv[2]}: {float(sys.argv[3]):.0f} s, step {last["step"]}, test error {100 * last["test_error"]:.2f}% '
      f'({round(last["test_error"] * 297)} of 297 wrong)')
PY
done
