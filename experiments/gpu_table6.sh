#!/usr/bin/env bash
# Table 6 on one GPU, the paper's full recipe (64k iterations, batch 128): the nets of the table at once, in one
# command of at most 9 minutes on a bare GPU machine, resumable across commands.
#
# 1. Here, once, with network, in the repository root: the wheels the GPU image lacks and the images into .carry/
#    (gitignored; experiments/gpu_lib.sh):  bash experiments/gpu_table6.sh --prepare IMAGES
#    IMAGES: a CIFAR-10 image folder (IMAGES/train/<class>/*.jpg) or a tarball of cifar10/train/<class>/ (docs/cifar.md).
# 2. On the GPU machine, with .carry/ beside the repository:  OUT=DIR bash experiments/gpu_table6.sh
#    PLAN says how the runs share the GPU: one process per word, all at once; a word is NET:SEEDS, or several joined
#    by '+' (run one after the other in that process); consecutive seeds of a net train as one program
#    (config.num_seeds). At BUDGET seconds every process gets SIGTERM: the trainer checkpoints and stops. Then Fig. 7
#    and the report are written.
# 3. If the report says CUT SHORT, run the same command again. The runs live in $RUNS (/tmp): on the same machine (a
#    second command while it is still held) they resume from there. On a fresh machine they resume from
#    .carry/runs_*.tar.gz: $OUT/runs_<word>.tar.gz holds each process's runs with their latest checkpoint, written
#    when it is under 15 MiB (the return limit for one file); ResNet-110 with five seeds in one program is larger,
#    so it resumes on the same machine only.
# $OUT receives: gpu_table6.log, report.md, $EXP/fig6.png, $EXP/fig7.png and the tarballs.
#
# Data: the 50k CIFAR-10 training images split 45k/5k (the split the paper chose its schedule on); errors are on the
# 5k validation images, and the report says "val" and prints the example counts.
# Knobs: PLAN (default below), BUDGET (seconds of training, 450), STEPS (0 = the paper's 64k), EXP (the experiment's
# folder and name in the report, table6), DATA_DIR (an extracted image folder; skips the tarball), OURS_ARGS (more
# --set KEY=VALUE for every run, e.g. --set matmul_precision=default with EXP=table6_tf32), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
source experiments/gpu_lib.sh
if [ "${1:-}" = "--prepare" ]; then gpu_prepare "${2:-}"; exit; fi

# The paper's Table 6: ResNet-20/32/44/56 once, ResNet-110 five times (best and mean +- std).
PLAN=${PLAN:-resnet-110:0,1,2,3,4 resnet-56:0 resnet-44:0+resnet-20:0 resnet-32:0}
BUDGET=${BUDGET:-450}
STEPS=${STEPS:-0}
EXP=${EXP:-table6}
OURS_ARGS=${OURS_ARGS:-}
LOG_NAME=gpu_table6.log
gpu_setup && gpu_images || exit 1

pids=() names=()
for word in $PLAN; do
  name=${word//[:,+]/_}
  names+=("$name")
  mkdir -p "$RUNS/logs"
  (
    for part in ${word//+/ }; do
      net=${part%%:*} seeds=${part#*:}
      # shellcheck disable=SC2086
      $PYTHON -m experiments.table6 --runs_dir "$RUNS" --experiment "$EXP" --nets "$net" --seeds "$seeds" --steps "$STEPS" \
        --set data.source=folder --set "data.data_dir=$DATA_DIR" --set data.val_examples=5000 \
        --set keep_checkpoints=1 $OURS_ARGS || exit $?
    done
  ) >> "$RUNS/logs/$name.log" 2>&1 &
  pids+=($!)
done
# Stop every process at the budget (each trainer checkpoints on SIGTERM), or go on as soon as all have finished.
SECONDS=0
while (( SECONDS < BUDGET )); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 2
done
for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null; done
gpu_wait "${pids[@]}"
for name in "${names[@]}"; do echo "== $name"; grep -v '^WARNING' "$RUNS/logs/$name.log" | tail -n 3; done

mkdir -p "$OUT/$EXP"
$PYTHON -m experiments.fig7 "$RUNS/$EXP" && cp "$RUNS/$EXP/fig7.png" "$OUT/$EXP/"
$PYTHON -m experiments.report "$RUNS" && cp "$RUNS/report.md" "$OUT/" && cp "$RUNS/$EXP/fig6.png" "$OUT/$EXP/"
for word in $PLAN; do
  dirs=()
  for part in ${word//+/ }; do dirs+=("$EXP/${part%%:*}"); done
  name=${word//[:,+]/_}
  gpu_pack "$name" "${dirs[@]}"
  if [ "$(stat -c %s "$OUT/runs_$name.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    echo "runs_$name.tar.gz is over 15 MiB: not returned; these runs resume on this machine only"
    rm "$OUT/runs_$name.tar.gz"
  fi
done
ls -la "$OUT"
cat "$OUT/report.md"
