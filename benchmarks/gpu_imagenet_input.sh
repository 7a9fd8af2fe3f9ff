#!/usr/bin/env bash
# ResNet-50 bf16 fed by its real input (the grain pipeline decoding JPEG files on the host's cores) against the same
# step on synthetic on-device data; one command of at most 9 minutes on a bare GPU machine (the setup of
# experiments/gpu_lib.sh: `bash benchmarks/gpu_imagenet_input.sh --prepare` here once puts the wheels the GPU image
# lacks into .carry/; the images are generated there, so no data travels).
#   OUT=DIR bash benchmarks/gpu_imagenet_input.sh
# 1. IMAGES ImageNet-like JPEGs (500x375, quality 90, as benchmarks/input_throughput.py writes them) into
#    /tmp/imagenet_like/train/<class>/ (10 classes; the model keeps its 1000-way fc, the labels use 10 of them).
# 2. The step alone: python -m resnet_jax.time_step (synthetic images on the device).
# 3. The input alone, for each WORKERS value: benchmarks/input_throughput.py (images/s the host delivers).
# 4. The training loop on the files, for each WORKERS value: python -m resnet_jax.main, STEPS steps, images/s over
#    the log windows after the first (benchmarks/loop_speed.py's measure).
# Results: $OUT/gpu_imagenet.jsonl and the log $OUT/gpu_imagenet.log. The goal: the loop at >= 90% of the step.
# Knobs: IMAGES (4000), STEPS (300), WORKERS ("0 8 14"), CONFIG (configs/imagenet_50.py), DTYPE (bfloat16),
# IMAGE_SIZE and BATCH (the config's), DEADLINE (seconds, 520), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
source experiments/gpu_lib.sh
if [ "${1:-}" = "--prepare" ]; then gpu_prepare; exit; fi
IMAGES=${IMAGES:-4000}
STEPS=${STEPS:-300}
WORKERS=${WORKERS:-0 8 14}
CONFIG=${CONFIG:-configs/imagenet_50.py}
DTYPE=${DTYPE:-bfloat16}
DEADLINE=${DEADLINE:-520}
LOG_NAME=gpu_imagenet.log
DATA_DIR=${DATA_DIR:-/tmp/imagenet_like}  # generated below: no gpu_images
gpu_setup || exit 1
RES=$OUT/gpu_imagenet.jsonl
SECONDS=0
SIZE_ARGS=()
[ -n "${IMAGE_SIZE:-}" ] && SIZE_ARGS=(--config.data.image_size="$IMAGE_SIZE" --config.data.scale_range="($IMAGE_SIZE,$((IMAGE_SIZE * 2)))" --config.data.eval_resize="$IMAGE_SIZE")
[ -n "${BATCH:-}" ] && SIZE_ARGS+=(--config.batch_size="$BATCH")
COMMON=(--config="$CONFIG" --config.model.dtype="$DTYPE" "${SIZE_ARGS[@]}")

if [ ! -d "$DATA_DIR/train" ]; then
  echo "=== writing $IMAGES JPEGs into $DATA_DIR (at ${SECONDS}s)"
  $PYTHON - "$DATA_DIR" "$IMAGES" <<'PYEOF' || exit 1
import sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, 'benchmarks')
from input_throughput import make_synthetic
root, n = sys.argv[1], int(sys.argv[2])
parts = max(1, min(16, n // 10))  # every part writes all 10 classes
with ProcessPoolExecutor(parts) as pool:  # each part its own seed and file names: a disjoint share of the folder
  list(pool.map(make_synthetic, [f'{root}/part{k}' for k in range(parts)], [n // parts] * parts, [10] * parts,
                range(parts)))
import os, shutil
for k in range(parts):  # merge the parts into one folder
  for split in ('train', 'val'):
    for c in os.listdir(f'{root}/part{k}/{split}'):
      os.makedirs(f'{root}/{split}/{c}', exist_ok=True)
      for f in os.listdir(f'{root}/part{k}/{split}/{c}'):
        shutil.move(f'{root}/part{k}/{split}/{c}/{f}', f'{root}/{split}/{c}/{k}_{f}')
  shutil.rmtree(f'{root}/part{k}')
PYEOF
fi
du -sh "$DATA_DIR"

echo "=== the step on synthetic data (at ${SECONDS}s)"
timeout 150 $PYTHON -m resnet_jax.time_step --json --steps=20 --repeats=3 "${COMMON[@]}" | tail -1 | tee -a "$RES" \
  | cut -c1-300 || echo "FAILED or timed out: the step"

for w in $WORKERS; do
  if (( DEADLINE - SECONDS < 60 )); then echo "SKIPPED (out of time): input and loop with $w workers"; continue; fi
  echo "=== the input alone, $w worker processes (at ${SECONDS}s)"
  timeout 60 $PYTHON benchmarks/input_throughput.py --data_dir="$DATA_DIR" --steps=20 --batch_size=256 \
    --workers="$w" | tail -2 || echo "FAILED or timed out: input with $w workers"
  echo "=== the loop on the files, $w worker processes (at ${SECONDS}s)"
  workdir=$(mktemp -d)
  timeout $((DEADLINE - SECONDS)) $PYTHON -m resnet_jax.main "${COMMON[@]}" --workdir="$workdir" \
    --config.data.source=folder --config.data.data_dir="$DATA_DIR" --config.model.num_classes=10 \
    --config.data.workers="$w" --config.num_steps="$STEPS" --config.lr_boundaries="($STEPS,)" \
    --config.log_every_steps=$(( STEPS >= 10 ? STEPS / 10 : 1 )) --config.eval_every_steps="$STEPS" \
    --config.checkpoint_every_steps="$STEPS" --config.data.mean_examples=500 > "$workdir/log" 2>&1
  tail -n 3 "$workdir/log"
  $PYTHON - "$workdir" "$w" "$RES" <<'PYEOF' || echo "FAILED: the loop with $w workers (its log's tail is above)"
import json, sys
sys.path.insert(0, 'benchmarks')
from loop_speed import loop_images_per_sec
workdir, workers, res = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [json.loads(line) for line in open(f'{workdir}/metrics.jsonl')]
r = {'label': f'loop on JPEG files, {workers} workers', 'images_per_sec': loop_images_per_sec(rows),
     'windows': [round(x['examples_per_sec']) for x in rows if 'examples_per_sec' in x]}
print(json.dumps(r)); open(res, 'a').write(json.dumps(r) + '\n')
PYEOF
  rm -rf "$workdir"
done
echo "== done at ${SECONDS}s"; ls -la "$OUT"
