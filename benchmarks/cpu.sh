#!/usr/bin/env bash
# The CPU rows of docs/performance.md: CIFAR ResNet-20/56/110, ours vs PyTorch eager (float32, batch 128, 2 threads
# each), and ResNet-1202's compile and step time. Results: $OUT/cpu_results.jsonl and $OUT/cpu.log.
#   JAX_PY=/path/to/venv-with-jax/bin/python TORCH_PY=/path/to/venv-with-torch/bin/python benchmarks/cpu.sh
# The machine this was written for is shared: the load average is logged before and after each measurement, and
# both sides report process CPU time per step besides wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_cpu}; mkdir -p "$OUT"
JAX_PY=${JAX_PY:-python}; TORCH_PY=${TORCH_PY:-python}
STEPS=${STEPS:-3}; REPEATS=${REPEATS:-3}
RES=$OUT/cpu_results.jsonl; : > "$RES"
exec > >(tee -a "$OUT/cpu.log") 2>&1
export JAX_PLATFORMS=cpu
date -u; uname -m; nproc; lscpu | grep -E 'Model name' || true
for depth in 20 56 110; do
  echo "load: $(uptime)"
  $JAX_PY benchmarks/compare.py --case=cifar:$depth --steps=$STEPS --repeats=$REPEATS --jax-python=$JAX_PY \
    --torch-python=$TORCH_PY --torch-channels-last --out "$RES"
done
echo "load: $(uptime)"
if [[ -z "${SKIP_1202:-}" ]]; then
  for scan in False True; do
    echo "=== ResNet-1202 (ours, scan_blocks=$scan): compile time and step time"
    PYTHONPATH=$PWD $JAX_PY -m resnet_jax.benchmark --config=configs/cifar_1202.py --steps=1 --repeats=2 \
      --warmup=1 --config.model.scan_blocks=$scan --json | tail -1 | tee "$OUT/cpu_1202_scan_$scan.json"
    echo "load: $(uptime)"
  done
fi
