#!/usr/bin/env bash
# A/B of the CPU layout of the training step: JAX devices per process (--config.cpu_devices: 1, or 0 = one per
# core, the default) x where XLA:CPU runs the convolutions (YNNPACK, XLA's default for convs with more than 16
# channels, one thread per conv; or XLA's Eigen kernels with `--xla_cpu_experimental_ynn_fusion_type=`) x whether
# Eigen may use a thread pool per device (`--xla_cpu_multi_thread_eigen=false`: one thread per device).
# Interleaved rounds, so that the shared machine's load hits every variant alike. Ours only, float32, batch 128,
# the paper's BN groups of 64. Prints one line per run.
#   JAX_PY=/path/to/python ROUNDS=3 DEPTHS="20 56" DEVICES="1 0" PIN="taskset -c 0,1" benchmarks/probes/ynn_ab.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
JAX_PY=${JAX_PY:-python}; ROUNDS=${ROUNDS:-3}; DEPTHS=${DEPTHS:-20 56}; PIN=${PIN:-}
DEVICES=${DEVICES:-1 0}
export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
variants=("" "--xla_cpu_experimental_ynn_fusion_type=" "--xla_cpu_multi_thread_eigen=false"
          "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_multi_thread_eigen=false")
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); flags: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | xargs)"
for round in $(seq "$ROUNDS"); do
  for depth in $DEPTHS; do
    for devices in $DEVICES; do
      for flags in "${variants[@]}"; do
        line=$(XLA_FLAGS="$flags" $PIN $JAX_PY -m resnet_jax.time_step --config=configs/cifar_$depth.py --steps=3 \
          --repeats=3 --warmup=1 --json --config.cpu_devices=$devices 2>/dev/null | tail -1)
        echo "round $round depth $depth cpu_devices=$devices XLA_FLAGS='$flags' $(uptime | sed 's/.*load average: /load /') $(echo "$line" | $JAX_PY -c '
import json, sys
r = json.load(sys.stdin)
print("devices %d, step %.0f ms, %.0f images/s, %.0f ms CPU per step" % (r["device"]["count"], 1e3 * r["step_time_s"], r["images_per_sec"], 1e3 * r["process_cpu_s_per_step"]))')"
      done
    done
  done
done
