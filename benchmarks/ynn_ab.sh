#!/usr/bin/env bash
# A/B of where XLA:CPU runs the convolutions: YNNPACK (XLA's default for convs with more than 16 channels, which
# runs each conv on one thread) vs XLA's Eigen kernels (multi-threaded) with `--xla_cpu_experimental_ynn_fusion_type`.
# Interleaved rounds, so that the shared machine's load hits both sides alike. Ours only, float32, batch 128,
# whole-batch BN (as benchmarks/compare.py). Prints one line per run.
#   JAX_PY=/path/to/python ROUNDS=3 DEPTHS="20 56" PIN="taskset -c 0" benchmarks/ynn_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
JAX_PY=${JAX_PY:-python}; ROUNDS=${ROUNDS:-3}; DEPTHS=${DEPTHS:-20 56}; PIN=${PIN:-}
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
variants=("" "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce" "--xla_cpu_experimental_ynn_fusion_type=")
for round in $(seq "$ROUNDS"); do
  for depth in $DEPTHS; do
    for flags in "${variants[@]}"; do
      line=$(XLA_FLAGS="$flags" $PIN $JAX_PY -m resnet_jax.benchmark --config=configs/cifar_$depth.py --steps=3 \
        --repeats=3 --warmup=1 --json --config.bn_group_size=0 2>/dev/null | tail -1)
      echo "round $round depth $depth XLA_FLAGS='$flags' $(uptime | sed 's/.*load average: /load /') $(echo "$line" | $JAX_PY -c '
import json, sys
r = json.load(sys.stdin)
print("step %.0f ms, %.0f ms CPU per step" % (1e3 * r["step_time_s"], 1e3 * r["process_cpu_s_per_step"]))')"
    done
  done
done
