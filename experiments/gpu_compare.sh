#!/usr/bin/env bash
# Our CIFAR-10 recipe beside an independent PyTorch trainer (benchmarks/pytorch_cifar.py), on the same images, the
# same 45k/5k split and the same GPU, in one command of at most 9 minutes on a bare GPU machine, resumable across
# commands. Both trainers run at once (one process for our seeds, trained as one program; one PyTorch process per
# seed): these small nets leave a GPU mostly idle, so the processes share it better than they would take turns.
#
# 1. Here, once, with network, in the repository root: the wheels the GPU image lacks and the images into .carry/
#    (gitignored; experiments/gpu_lib.sh):  bash experiments/gpu_compare.sh --prepare IMAGES
#    IMAGES: a CIFAR-10 image folder (IMAGES/train/<class>/*.jpg) or a tarball of cifar10/train/<class>/ (docs/cifar.md).
# 2. On the GPU machine, with .carry/ beside the repository:  OUT=DIR bash experiments/gpu_compare.sh
#    At BUDGET seconds every trainer gets SIGTERM, checkpoints and stops. Then the report is written
#    ($OUT/report.md: both trainers, per seed final and best validation error, example counts, wall time) and each
#    net's runs are packed into $OUT/runs_<net>.tar.gz.
# 3. If the report says CUT SHORT: copy $OUT/runs_*.tar.gz into .carry/ and run the same command again; finished
#    runs are skipped, the others resume from their checkpoints.
# $OUT receives at most 8 files: gpu_compare.log, report.md, compare/fig6.png and one tarball per net.
#
# Knobs: NETS (resnet-20; resnet-56 as well if the time allows), SEEDS (0,1), STEPS (0: the paper's 64k; N: the
# recipe shortened to N steps, drops at 50% and 75%), BUDGET (seconds of training, 450), DEVICE (cuda; cpu to try the
# script on a machine without a GPU), DATA_DIR (an extracted image folder; skips the tarball), OURS_ARGS (more
# `--set KEY=VALUE` for our runs), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
source experiments/gpu_lib.sh
if [ "${1:-}" = "--prepare" ]; then gpu_prepare "${2:-}"; exit; fi

NETS=${NETS:-resnet-20}
SEEDS=${SEEDS:-0,1}
STEPS=${STEPS:-0}
BUDGET=${BUDGET:-450}
DEVICE=${DEVICE:-cuda}
OURS_ARGS=${OURS_ARGS:-}
EXP=compare
LOG_NAME=gpu_compare.log
gpu_setup && gpu_images || exit 1

pids=()
for net in ${NETS//,/ }; do
  depth=${net#resnet-}
  mkdir -p "$RUNS/$EXP/$net" "$RUNS/$EXP/$net-pytorch"
  # shellcheck disable=SC2086
  timeout --signal=TERM --kill-after=60 "$BUDGET" $PYTHON -m experiments.table6 --runs_dir "$RUNS" --experiment "$EXP" \
    --nets "$net" --seeds "$SEEDS" --steps "$STEPS" --set data.source=folder --set "data.data_dir=$DATA_DIR" \
    --set data.val_examples=5000 --set keep_checkpoints=1 $OURS_ARGS >> "$RUNS/$EXP/$net/train.log" 2>&1 &
  pids+=($!)
  for seed in ${SEEDS//,/ }; do
    timeout --signal=TERM --kill-after=60 "$BUDGET" $PYTHON benchmarks/pytorch_cifar.py --data_dir="$DATA_DIR" \
      --depth="$depth" --workdir="$RUNS/$EXP/$net-pytorch/seed$seed" --steps="$STEPS" --seed="$seed" \
      --val_examples=5000 --device="$DEVICE" >> "$RUNS/$EXP/$net-pytorch/train_seed$seed.log" 2>&1 &
    pids+=($!)
  done
done
gpu_wait "${pids[@]}"
for log in "$RUNS/$EXP"/*/train*.log; do echo "== $log"; grep -v '^WARNING' "$log" | tail -n 3; done

mkdir -p "$OUT/$EXP"
$PYTHON -m experiments.report "$RUNS" && cp "$RUNS/report.md" "$OUT/" && cp "$RUNS/$EXP/fig6.png" "$OUT/$EXP/"
for net in ${NETS//,/ }; do gpu_pack "$net" "$EXP/$net" "$EXP/$net-pytorch"; done
ls -la "$OUT"
cat "$OUT/report.md"
