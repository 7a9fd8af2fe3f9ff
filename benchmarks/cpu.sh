#!/usr/bin/env bash
# The CPU rows of docs/performance.md: CIFAR ResNet-20/56/110, ours vs PyTorch eager (float32, batch 128), and
# ResNet-1202's compile and step time. Results: $OUT/cpu_results.jsonl and $OUT/cpu.log.
#   JAX_PY=/path/to/venv-with-jax/bin/python TORCH_PY=/path/to/venv-with-torch/bin/python benchmarks/cpu.sh
# Default: both sides on all the cores this process may use, one after the other: ours at its defaults (one JAX
# device per core, the paper's BN groups of 64), PyTorch eager with its default threads and channels-last; the
# dense float32 GEMM of the same run is the ceiling (compare.py --gemm). ONE_CORE=1 adds the comparison with both
# sides pinned to core 0 (PyTorch --threads=1). The load average is logged before each case; both sides report
# process CPU time too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_cpu}; mkdir -p "$OUT"
JAX_PY=${JAX_PY:-python}; TORCH_PY=${TORCH_PY:-python}
STEPS=${STEPS:-3}; REPEATS=${REPEATS:-3}; DEPTHS=${DEPTHS:-20 56 110}
RES=$OUT/cpu_results.jsonl; : > "$RES"
exec > >(tee -a "$OUT/cpu.log") 2>&1
export JAX_PLATFORMS=cpu
date -u; uname -m; nproc; lscpu | grep -E 'Model name' || true
for depth in $DEPTHS; do
  echo "load: $(uptime)"
  $JAX_PY benchmarks/compare.py --case=cifar:$depth --steps=$STEPS --repeats=$REPEATS --jax-python=$JAX_PY \
    --torch-python=$TORCH_PY --torch-channels-last --gemm --jax-arg=--config.bn_group_size=64 --out "$RES"
done
if [[ -n "${ONE_CORE:-}" ]]; then
  for depth in $DEPTHS; do
    echo "load: $(uptime)"
    taskset -c 0 $JAX_PY benchmarks/compare.py --case=cifar:$depth --steps=$STEPS --repeats=$REPEATS \
      --jax-python=$JAX_PY --torch-python=$TORCH_PY --torch-channels-last --torch-arg=--threads=1 --gemm \
      --jax-arg=--config.bn_group_size=64 --out "$OUT/cpu_results_one_core.jsonl"
  done
fi
echo "load: $(uptime)"
if [[ -z "${SKIP_1202:-}" ]]; then
  # At batch 128 the activations kept for the backward pass outgrow a small machine's memory (docs/performance.md,
  # ResNet-1202), so the step is timed at batch 16; the compile time is that of the paper's batch 128.
  for scan in False True; do
    echo "=== ResNet-1202 (ours, scan_blocks=$scan): compile time at batch 128"
    PYTHONPATH=$PWD timeout 2400 $JAX_PY -m resnet_jax.time_step --config=configs/cifar_1202.py --compile_only \
      --config.model.scan_blocks=$scan --json | tail -1 | tee "$OUT/cpu_1202_compile_scan_$scan.json"
    echo "load: $(uptime)"
  done
  echo "=== ResNet-1202 (ours, scan_blocks=True): step at batch 16"
  PYTHONPATH=$PWD $JAX_PY -m resnet_jax.time_step --config=configs/cifar_1202.py --steps=1 --repeats=2 --warmup=1 \
    --examples=1000 --config.model.scan_blocks=True --config.batch_size=16 --config.bn_group_size=16 --json \
    | tail -1 | tee "$OUT/cpu_1202_step_b16.json"
  echo "load: $(uptime)"
fi
