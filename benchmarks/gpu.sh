#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one go, ours vs PyTorch compiled (AMP, channels-last):
#   ResNet-50 bf16 (batch 256), CIFAR ResNet-110 and ResNet-56 in bf16 and fp32 (batch 128), then XLA flag variants,
#   then K = 1, 2, 4, 8 seeds in one program on ResNet-20/56 (rows in $OUT/gpu_flags.jsonl with config.num_seeds).
# Written for a bare machine with one GPU and 10 minutes (the setup of experiments/gpu_lib.sh): the measurements run
# in order of importance, each with its own time limit, and whatever does not fit before DEADLINE seconds is skipped
# and named as such. Results: $OUT/gpu_results.jsonl, logs: $OUT/gpu.log.
#
# 1. Here, once, with network, in the repository root: the wheels the GPU image lacks into .carry/ (gitignored):
#      bash benchmarks/gpu.sh --prepare
# 2. On the GPU machine, with .carry/ beside the repository:  OUT=DIR bash benchmarks/gpu.sh
# Knobs: DEADLINE (seconds, 540), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/resnet_jax_gpu}
source experiments/gpu_lib.sh
if [ "${1:-}" = "--prepare" ]; then gpu_prepare; exit; fi
DEADLINE=${DEADLINE:-540}
LOG_NAME=gpu.log
gpu_setup || exit 1
RES=$OUT/gpu_results.jsonl; : > "$RES"
SECONDS=0
$PYTHON -c "import torch, optax; print('torch', torch.__version__, '| optax', optax.__version__)" || exit 1

run() {  # run LABEL SECONDS_LIMIT compare.py args...
  local label=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if (( left < 30 )); then echo "SKIPPED (out of time): $label"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $label (limit ${limit}s, at ${SECONDS}s)"
  timeout "$limit" $PYTHON benchmarks/compare.py --out "$RES" --timeout "$((limit / 2))" "$@" \
    || echo "FAILED or timed out: $label"
}

TORCH="--torch-mode=compile --torch-channels-last"
run "ResNet-50 bf16"     200 --case=imagenet:50 --dtype=bfloat16 --steps=20 --repeats=3 $TORCH
run "CIFAR-110 bf16"     160 --case=cifar:110 --dtype=bfloat16 --steps=50 --repeats=3 $TORCH
run "CIFAR-56 bf16"      100 --case=cifar:56 --dtype=bfloat16 --steps=50 --repeats=3 $TORCH
run "CIFAR-56 fp32"      100 --case=cifar:56 --dtype=float32 --steps=50 --repeats=3 $TORCH
run "CIFAR-110 fp32"     160 --case=cifar:110 --dtype=float32 --steps=50 --repeats=3 $TORCH

# Flags that matter on GPU, ours only (one change at a time against the default run of CIFAR-56 bf16 above).
ours() {  # ours LABEL XLA_FLAGS time_step args...
  local label=$1 flags=$2; shift 2
  if (( DEADLINE - SECONDS < 60 )); then echo "SKIPPED (out of time): $label"; return; fi
  echo "=== ours: $label"
  XLA_FLAGS="$flags" timeout 90 $PYTHON -m resnet_jax.time_step --json "$@" | tail -1 | tee -a "$OUT/gpu_flags.jsonl"
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
    timeout 40 $PYTHON benchmarks/probes/forward_backward.py --depths 56 110 --repeats 20 --relu $relu \
      | tee -a "$OUT/gpu_relu.jsonl"
  done
else
  echo "SKIPPED (out of time): ReLU A/B"
fi

echo "=== summary (${SECONDS}s)"
$PYTHON - "$RES" <<'PYEOF'
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
