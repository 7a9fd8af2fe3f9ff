#!/usr/bin/env bash
# Several seeds in one program (config.num_seeds = K, the state vmapped over K replicas) against one seed:
# training images/s summed over the replicas and memory (XLA's estimate of the step per device, and the peak the
# device reports, or the process's peak resident memory on the CPU), for K = 1, 2, 4, 8 on CIFAR ResNet-20 and
# ResNet-56 (float32, batch 128 per replica). One process per (net, K), one after the other.
#   OUT=DIR bash benchmarks/seeds.sh
# Results: $OUT/seeds_results.jsonl (one benchmark JSON per line), a table on stdout, the log in $OUT/seeds.log.
# Knobs: CONFIGS (config files), SEEDS (values of K), STEPS/REPEATS/WARMUP (timing), PY (the Python),
# ARGS (more benchmark flags for every case, e.g. --num_devices=1 or --config.model.dtype=bfloat16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_seeds}; mkdir -p "$OUT"
PY=${PY:-python}
CONFIGS=${CONFIGS:-configs/cifar_20.py configs/cifar_56.py}
SEEDS=${SEEDS:-1 2 4 8}
STEPS=${STEPS:-5}; REPEATS=${REPEATS:-3}; WARMUP=${WARMUP:-1}; ARGS=${ARGS:-}
LIMIT=${LIMIT:-1200}  # seconds per case
RES=$OUT/seeds_results.jsonl; : > "$RES"
exec > >(tee -a "$OUT/seeds.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
date -u; uname -m; nproc
for config in $CONFIGS; do
  for k in $SEEDS; do
    echo "=== $config num_seeds=$k (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    # shellcheck disable=SC2086
    timeout "$LIMIT" $PY -m resnet_jax.time_step --config="$config" --config.num_seeds="$k" --json \
      --steps="$STEPS" --repeats="$REPEATS" --warmup="$WARMUP" $ARGS | tail -1 >> "$RES" \
      || echo "FAILED or timed out: $config num_seeds=$k"
  done
done
$PY - "$RES" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith('{')]
mib = lambda b: f'{b / 2 ** 20:9,.0f}' if b is not None else '      n/a'
print(f'{"net":10} {"K":>2} {"images/s (sum)":>15} {"per seed":>9} {"step ms":>8} {"est. MiB/dev":>12} '
      f'{"peak MiB":>9}  device')
for r in rows:
  c, d = r['config'], r['device']
  k = c['num_seeds']
  print(f'{"ResNet-" + str(c["depth"]):10} {k:2d} {r["images_per_sec"]:15,.0f} {r["images_per_sec"] / k:9,.0f} '
        f'{1e3 * r["step_time_s"]:8.1f} {mib(r["step_memory_bytes"]):>12} {mib(r["peak_memory_bytes"]):>9}  '
        f'{d["count"]} x {d["kind"]} ({d["platform"]})')
PYEOF
