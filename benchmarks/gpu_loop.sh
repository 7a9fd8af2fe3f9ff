#!/usr/bin/env bash
# The training loop against its step on one GPU, one factor at a time, then several seeds per program; one command
# of at most 9 minutes on a bare GPU machine (the setup of experiments/gpu_lib.sh: .carry/ with the wheels the GPU
# image lacks and the CIFAR-10 images, made here once with `bash benchmarks/gpu_loop.sh --prepare IMAGES`).
#   OUT=DIR bash benchmarks/gpu_loop.sh
# In order of importance, each part skipped (and named) when the time left is too short:
#   1. the step alone (resnet_jax.time_step, ResNet-20 at the defaults, 100 steps per call, TF32, whole-batch BN);
#   2. the loop (benchmarks/loop_speed.py, ResNet-20, STEPS steps on the CIFAR images): the defaults, then TF32,
#      whole-batch BN, no evaluation/checkpoint before the end, 10 and 100 steps per call, all together;
#   3. K = 1, 2, 4, 8 seeds in one program on ResNet-20/56/110 (images/s summed over the seeds, memory), vmapped,
#      and K = 4 unrolled.
# Results: $OUT/gpu_loop.jsonl (one JSON object per measurement), the log in $OUT/gpu_loop.log.
# Knobs: STEPS (3000), CALLS (timed calls per window of each step measurement, 50), DEADLINE (seconds, 520),
# DATA_DIR (an extracted image folder; skips the tarball), PYTHON (python3). On a machine without a GPU, e.g.
# `STEPS=4 CALLS=1 DEADLINE=300` tries the script on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
source experiments/gpu_lib.sh
if [ "${1:-}" = "--prepare" ]; then gpu_prepare "${2:-}"; exit; fi
STEPS=${STEPS:-3000}
CALLS=${CALLS:-50}
DEADLINE=${DEADLINE:-520}
LOG_NAME=gpu_loop.log
gpu_setup && gpu_images || exit 1
RES=$OUT/gpu_loop.jsonl
SECONDS=0

left() { echo $((DEADLINE - SECONDS)); }
step() {  # step LABEL time_step-args...: one resnet_jax.time_step measurement, a JSON line into $RES
  local label=$1; shift
  if (( $(left) < 40 )); then echo "SKIPPED (out of time): $label"; return; fi
  echo "=== step: $label (at ${SECONDS}s)"
  timeout "$(left)" $PYTHON -m resnet_jax.time_step --json --steps="$CALLS" --repeats=3 "$@" | tail -1 | \
    $PYTHON -c "import json, sys; r = json.load(sys.stdin); r['label'] = '$label'; print(json.dumps(r))" \
    | tee -a "$RES" | cut -c1-300 || echo "FAILED or timed out: $label"
}

step "ResNet-20 defaults" --config=configs/cifar_20.py
step "ResNet-20 100 steps per call" --config=configs/cifar_20.py --config.steps_per_call=100 --steps=3
step "ResNet-20 TF32" --config=configs/cifar_20.py --config.matmul_precision=default
step "ResNet-20 whole-batch BN" --config=configs/cifar_20.py --config.bn_group_size=0

if (( $(left) > 120 )); then
  echo "=== loop (at ${SECONDS}s)"
  timeout "$(( $(left) - 90 ))" $PYTHON benchmarks/loop_speed.py --config=configs/cifar_20.py --steps="$STEPS" \
    --data_dir="$DATA_DIR" --out="$RES" || echo "loop measurements cut short"
else
  echo "SKIPPED (out of time): loop"
fi

for depth in 20 56 110; do
  for k in 1 2 4 8; do
    step "ResNet-$depth seeds=$k vmap" --config=configs/cifar_$depth.py --config.num_seeds=$k --config.seed_batching=vmap
  done
  step "ResNet-$depth seeds=4 unroll" --config=configs/cifar_$depth.py --config.num_seeds=4 --config.seed_batching=unroll
done
echo "== done at ${SECONDS}s"; ls -la "$OUT"
