#!/usr/bin/env bash
# Table 6 on one GPU, the paper's full recipe (64k iterations, batch 128), ResNet-20 and ResNet-56 first, in one
# command of at most 10 minutes on a bare GPU machine (jax with CUDA installed, no network), resumable across commands.
#
# 1. Here, once, in the repository root (needs network; .carry/ is gitignored):
#      bash experiments/gpu_table6.sh --prepare
#    puts the ml_collections wheel (the GPU image lacks it) and the CIFAR-10 JPEG tarball (16 MB) into .carry/.
# 2. On the GPU machine, with .carry/ copied beside the repository:  OUT=DIR bash experiments/gpu_table6.sh
#    Each net trains in its own process, all at once on the one GPU (these small nets leave a GPU mostly idle, so
#    two processes fill it better than one after the other). At BUDGET seconds every process gets SIGTERM: the
#    trainer checkpoints and stops cleanly. Then Fig. 7 and the report are written, and each run (metrics, config,
#    its training log, the latest checkpoint only) is packed into $OUT/runs_<net>.tar.gz (ResNet-56: ~7 MB).
# 3. If the report says CUT SHORT: copy the runs_*.tar.gz from $OUT into .carry/ and run the same command
#    again; the runs are unpacked and resumed from their checkpoints (finished ones are skipped).
# $OUT receives 8 files at most: gpu_table6.log, report.md, table6/fig6.png, table6/fig7.png and one tarball per
# net, so at most 4 nets per command.
#
# Data: the 50k CIFAR-10 training JPEGs split 45k/5k (the split the paper chose its schedule on); the CIFAR-10 test
# split is not in the tarball, so the errors are on the 5k validation images, and the report says "val".
# Environment knobs: NETS (default resnet-20,resnet-56), BUDGET (seconds of training, default 480), STEPS (0 = the
# paper's 64k), SEEDS (default 0), DATA_DIR (an extracted CIFAR folder; skips the tarball), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .carry/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .carry/whl ml_collections==1.1.0
  tarball=${CIFAR_TARBALL:-../shared/data/cifar10-train-jpg.tar.gz}
  [ -f .carry/cifar10-train-jpg.tar.gz ] || cp "$tarball" .carry/ || { echo "no CIFAR tarball at $tarball"; exit 1; }
  grep -qx '/.carry/' .gitignore || echo "warning: add /.carry/ to .gitignore"
  ls -la .carry .carry/whl
  exit 0
fi

OUT=${OUT:-/tmp/gpu_table6_out}
NETS=${NETS:-resnet-20,resnet-56}
BUDGET=${BUDGET:-480}
STEPS=${STEPS:-0}
SEEDS=${SEEDS:-0}
PYTHON=${PYTHON:-python3}
RUNS=/tmp/gpu_runs
mkdir -p "$OUT" "$RUNS"
LOG="$OUT/gpu_table6.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
if ! $PYTHON -c 'import ml_collections' 2>/dev/null; then
  ls .carry/whl/*.whl >/dev/null 2>&1 || { echo "ml_collections missing and no .carry/whl: run --prepare here first"; exit 1; }
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON -c 'import jax, flax, optax, orbax.checkpoint; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__)' || exit 1

if [ -z "${DATA_DIR:-}" ]; then
  mkdir -p /tmp/data && tar xzf .carry/cifar10-train-jpg.tar.gz -C /tmp/data || { echo "no .carry/cifar10-train-jpg.tar.gz: run --prepare here first"; exit 1; }
  DATA_DIR=/tmp/data/cifar10
fi
for tarball in .carry/runs_*.tar.gz; do
  [ -f "$tarball" ] || continue
  echo "== resuming from $tarball"
  tar xzf "$tarball" -C "$RUNS"
done

# Each process may take the memory it needs, not 75% of the GPU (the JAX default), so the processes can share it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
pids=()
for net in ${NETS//,/ }; do
  mkdir -p "$RUNS/table6/$net"
  timeout --signal=TERM --kill-after=60 "$BUDGET" $PYTHON -m experiments.table6 --runs_dir "$RUNS" --nets "$net" \
    --seeds "$SEEDS" --steps "$STEPS" --set data.source=folder --set "data.data_dir=$DATA_DIR" \
    --set data.val_examples=5000 --set keep_checkpoints=1 >> "$RUNS/table6/$net/train.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; echo "process $pid exited with $? (3: stopped at the budget, resumable)"; done
for net in ${NETS//,/ }; do echo "== $net"; grep -v '^WARNING' "$RUNS/table6/$net/train.log" | tail -n 4; done

mkdir -p "$OUT/table6"
$PYTHON -m experiments.fig7 "$RUNS/table6" && cp "$RUNS/table6/fig7.png" "$OUT/table6/"
$PYTHON -m experiments.report "$RUNS" && cp "$RUNS/report.md" "$OUT/" && cp "$RUNS/table6/fig6.png" "$OUT/table6/"
# What a resume needs, one tarball per net (keep_checkpoints=1: only the latest checkpoint is there).
for net in ${NETS//,/ }; do tar czf "$OUT/runs_$net.tar.gz" -C "$RUNS" "table6/$net"; done
ls -la "$OUT"
cat "$OUT/report.md"
