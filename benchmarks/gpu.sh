#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one go, ours vs PyTorch compiled (AMP, channels-last):
#   ResNet-50 bf16 (batch 256), CIFAR ResNet-110 and ResNet-56 in bf16 and fp32 (batch 128), then XLA flag variants,
#   then K = 1, 2, 4, 8 seeds in one program on ResNet-20/56 (rows in $OUT/gpu_flags.jsonl with config.num_seeds).
# Written for a bare machine with one H100, jax 0.11 (CUDA), flax, optax, torch, no ml_collections, and 10 minutes:
# the measurements run in order of importance, each with its own time limit, and whatever does not fit before
# DEADLINE seconds is skipped and named as such. Results: $OUT/gpu_results.jsonl, logs: $OUT/gpu.log.
#
# Before, on a machine with network, in the repo root (the wheel is not in git):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
# Then on the GPU machine, with .whl/ copied beside the repository:  OUT=DIR bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_gpu}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
LOG=$OUT/gpu.log; RES=$OUT/gpu_results.jsonl; : > "$RES"
exec > >(tee -a "$LOG") 2>&1
SECONDS=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import jax, torch, flax, optax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| flax', flax.__version__)" || exit 1

run() {  # run LABEL SECONDS_LIMIT compare.py args...
  local label=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if (( left < 30 )); then echo "SKIPPED (out of time): $label"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $label (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" python3 benchmarks/compare.py --out "$RES" --timeout "$((limit / 2))" "$@" || echo "FAILED or timed out: $label"
}

TORCH="--torch-mode=compile --torch-channels-last"
run "ResNet-50 bf16"     200 --case=imagenet:50 --dtype=bfloat16 --steps=20 --repeats=3 $TORCH
run "CIFAR-110 bf16"     160 --case=cifar:110 --dtype=bfloat16 --steps=50 --repeats=3 $TORCH
run "CIFAR-56 bf16"      100 --case=cifar:56 --dtype=bfloat16 --steps=50 --repeats=3 $TORCH
run "CIFAR-56 fp32"      100 --case=cifar:56 --dtype=float32 --steps=50 --repeats=3 $TORCH
run "CIFAR-110 fp32"     160 --case=cifar:110 --dtype=float32 --steps=50 --repeats=3 $TORCH

# Flags that matter on GPU, ours only (one change at a time against the default run of CIFAR-56 bf16 above).
ours() {  # ours LABEL XLA_FLAGS benchmark args...
  local label=$1 flags=$2; shift 2
  if (( DEADLINE - SECONDS < 60 )); then echo "SKIPPED (out of time): $label"; return; fi
  echo "=== ours: $label"
  XLA_FLAGS="$flags" timeout 90 python3 -m resnet_jax.benchmark --json "$@" | tail -1 | tee -a "$OUT/gpu_flags.jsonl"
}
ours "CIFAR-56 bf16, command buffers off" "--xla_gpu_enable_command_buffer=" --config=configs/cifar_56.py \
  --config.model.dtype=bfloat16 --config.bn_group_size=0 --steps=50
ours "CIFAR-56 bf16, autotuning off" "--xla_gpu_autotune_level=0" --config=configs/cifar_56.py \
  --config.model.dtype=bfloat16 --config.bn_group_size=0 --steps=50
ours "CIFAR-56 bf16, paper BN groups of 64" "" --config=configs/cifar_56.py --config.model.dtype=bfloat16 --steps=50

# Several seeds in one program (config.num_seeds, benchmarks/seeds.sh): images/s summed over the seeds and memory,
# fp32 batch 128 per seed, K = 1, 2, 4, 8 on ResNet-20 and ResNet-56.
for depth in 20 56; do
  for k in 1 2 4 8; do
    ours "CIFAR-$depth fp32, num_seeds=$k" "" --config=configs/cifar_$depth.py --config.num_seeds=$k --steps=20
  done
done

# Our ReLU (x * (x > 0)) against max(x, 0): on the CPU the latter made the backward pass quadratic in depth.
if (( DEADLINE - SECONDS >= 60 )); then
  echo "=== ReLU A/B, forward and forward+backward of the model alone (fp32, batch 128)"
  for relu in ours max; do
    timeout 40 python3 benchmarks/forward_backward.py --depths 56 110 --repeats 20 --relu $relu | tee -a "$OUT/gpu_relu.jsonl"
  done
else
  echo "SKIPPED (out of time): ReLU A/B"
fi

echo "=== summary (${SECONDS}s)"
python3 - "$RES" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line); j, t = r['ours'], r['pytorch']
  ok = 'error' not in j and 'error' not in t
  proj = f'{(64_000 * j["step_time_s"] + j["compile_s"]) / 60:.1f} min' if 'error' not in j else '-'
  print(f'{r["net"]:8} {r["depth"]:4} {r["dtype"]:9} ours {j.get("images_per_sec", 0):9,.0f} img/s '
        f'(util {100 * (j.get("utilisation") or 0):.1f}%, compile {j.get("compile_s", 0):.0f} s) | torch compiled '
        f'{t.get("images_per_sec", 0):9,.0f} img/s (warm-up {t.get("warmup_s", 0):.0f} s) | ratio '
        f'{r["ratio"]:.2f}' if ok else f'{r["net"]} {r["depth"]} {r["dtype"]}: error {j.get("error")} {t.get("error")}',
        f'| 64k steps {proj}' if r['net'] == 'cifar' else '')
PYEOF
