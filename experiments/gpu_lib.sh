# Shared by the one-command GPU scripts (experiments/gpu_table6.sh, experiments/gpu_compare.sh); sourced, not run.
#
# The machine they are written for: one GPU, jax with CUDA, flax, optax, orbax and torch installed, no network, no
# ml_collections, a command limit of about 10 minutes. What it lacks travels in .carry/ (gitignored) beside the
# repository:
#   .carry/whl/*.whl                     wheels of the missing packages (ml_collections)
#   .carry/cifar10-train-jpg.tar.gz      the CIFAR-10 training images as DIR/cifar10/train/<class>/*.jpg
#   .carry/runs_<name>.tar.gz            runs of an earlier command, to resume (copied back from its $OUT)
#
# gpu_prepare IMAGES   here, with network: the wheels, and IMAGES (a folder with train/<class>/, or a tarball of
#                      cifar10/train/<class>/) as .carry/cifar10-train-jpg.tar.gz
# gpu_setup            there: installs the wheels, unpacks the images (DATA_DIR skips that) and earlier runs into
#                      $RUNS, and starts logging to $OUT/$LOG_NAME
# gpu_pack NAME DIR..  there: DIR... (relative to $RUNS) as $OUT/runs_NAME.tar.gz, what a later command resumes from

OUT=${OUT:-/tmp/resnet_jax_gpu_out}
RUNS=${RUNS:-/tmp/resnet_jax_gpu_runs}
PYTHON=${PYTHON:-python3}

gpu_prepare() {
  local images=${1:-}
  mkdir -p .carry/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .carry/whl ml_collections==1.1.0 \
    || return 1
  if [ ! -f .carry/cifar10-train-jpg.tar.gz ]; then
    if [ -d "$images/train" ]; then
      tar czf .carry/cifar10-train-jpg.tar.gz -C "$(dirname "$images")" --transform "s,^$(basename "$images"),cifar10," \
        "$(basename "$images")/train" || return 1
    elif [ -f "$images" ]; then
      cp "$images" .carry/cifar10-train-jpg.tar.gz || return 1
    else
      echo "usage: --prepare IMAGES, IMAGES a CIFAR-10 image folder (IMAGES/train/<class>/*.jpg) or a tarball of one"
      echo "(cifar10/train/<class>/*.jpg); docs/cifar.md says how to write one from the original release."
      return 1
    fi
  fi
  grep -qx '/.carry/' .gitignore || echo "warning: add /.carry/ to .gitignore"
  ls -la .carry .carry/whl
}

gpu_setup() {
  mkdir -p "$OUT" "$RUNS"
  exec > >(tee -a "$OUT/${LOG_NAME:-gpu.log}") 2>&1
  export PYTHONUNBUFFERED=1
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  if ! $PYTHON -c 'import ml_collections' 2>/dev/null; then
    ls .carry/whl/*.whl >/dev/null 2>&1 || { echo "ml_collections missing and no .carry/whl: run --prepare first"; return 1; }
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .carry/whl/*.whl || return 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  $PYTHON -c 'import jax, flax; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__)' || return 1
  if [ -z "${DATA_DIR:-}" ]; then
    mkdir -p /tmp/data && tar xzf .carry/cifar10-train-jpg.tar.gz -C /tmp/data \
      || { echo "no .carry/cifar10-train-jpg.tar.gz: run --prepare first"; return 1; }
    DATA_DIR=/tmp/data/cifar10
  fi
  local tarball
  for tarball in .carry/runs_*.tar.gz; do
    [ -f "$tarball" ] || continue
    echo "== resuming from $tarball"
    tar xzf "$tarball" -C "$RUNS" || return 1
  done
  # Each process takes the memory it needs, not 75% of the GPU (JAX's default), so processes can share the GPU.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
}

gpu_pack() {
  local name=$1; shift
  tar czf "$OUT/runs_$name.tar.gz" -C "$RUNS" "$@" && echo "packed $OUT/runs_$name.tar.gz ($(du -h "$OUT/runs_$name.tar.gz" | cut -f1))"
}

gpu_wait() {  # gpu_wait PID...: waits for each trainer process and says how it ended
  local pid rc
  for pid in "$@"; do
    wait "$pid"; rc=$?
    case $rc in
      0) echo "process $pid finished" ;;
      3|124) echo "process $pid stopped at the budget, checkpointed: run the same command to resume" ;;
      *) echo "process $pid FAILED with exit status $rc (the tail of its log follows)" ;;
    esac
  done
}
