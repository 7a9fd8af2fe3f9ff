# Shared by every one-command GPU script (benchmarks/gpu.sh, benchmarks/gpu_loop.sh, benchmarks/gpu_imagenet_input.sh,
# experiments/gpu_compare.sh, experiments/gpu_table6.sh); sourced, not run.
#
# The machine they are written for: one GPU, Python 3.12 with jax (CUDA), flax, optax, orbax and torch installed, no
# network, a command limit of about 10 minutes. What it lacks travels in one folder, .carry/ (gitignored), beside the
# repository:
#   .carry/whl/*.whl                     wheels of the packages in GPU_WHEELS (gpu_setup installs those it lacks)
#   .carry/cifar10-train-jpg.tar.gz      the CIFAR-10 training images as DIR/cifar10/train/<class>/*.jpg (the scripts
#                                        that train on CIFAR-10: gpu_loop.sh, gpu_compare.sh, gpu_table6.sh)
#   .carry/runs_<name>.tar.gz            runs of an earlier command, to resume (copied back from its $OUT)
#
# Every script takes `--prepare [IMAGES]`, which runs gpu_prepare:
# gpu_prepare [IMAGES] here, with network: the wheels into .carry/whl, and IMAGES (a folder with train/<class>/, or a
#                      tarball of cifar10/train/<class>/) as .carry/cifar10-train-jpg.tar.gz
# gpu_setup            there: logs to $OUT/$LOG_NAME, installs each carried package the Python lacks (into
#                      $SITE, put on PYTHONPATH), unpacks earlier runs into $RUNS
# gpu_images           there: unpacks the CIFAR-10 images and sets DATA_DIR to them (a DATA_DIR already set skips it)
# gpu_pack NAME DIR..  there: DIR... (relative to $RUNS) as $OUT/runs_NAME.tar.gz, what a later command resumes from
# gpu_wait PID...      there: waits for each trainer process and says how it ended

OUT=${OUT:-/tmp/resnet_jax_gpu_out}
RUNS=${RUNS:-/tmp/resnet_jax_gpu_runs}
PYTHON=${PYTHON:-python3}
CARRY=.carry
SITE=${SITE:-/tmp/site}
# REQUIREMENT:MODULE of what the package and the scripts import and the GPU image lacks: ml_collections (configs),
# grain with the dependencies the image does not bring (the streamed input: the CIFAR-10 folder and ImageNet JPEGs),
# tensorboardX (TensorBoard files beside metrics.jsonl). The versions are constraints.txt's.
GPU_WHEELS="ml_collections==1.1.0:ml_collections grain==0.2.18:grain array_record==0.8.6:array_record
  cloudpickle==3.1.3:cloudpickle portpicker==1.6.0:portpicker tensorboardX==2.6.5:tensorboardX"
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}

gpu_prepare() {
  local images=${1:-} spec reqs=()
  for spec in $GPU_WHEELS; do reqs+=("${spec%%:*}"); done
  mkdir -p "$CARRY/whl"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$CARRY/whl" "${reqs[@]}" || return 1
  if [ -n "$images" ] && [ ! -f "$CARRY/cifar10-train-jpg.tar.gz" ]; then
    if [ -d "$images/train" ]; then
      tar czf "$CARRY/cifar10-train-jpg.tar.gz" -C "$(dirname "$images")" \
        --transform "s,^$(basename "$images"),cifar10," "$(basename "$images")/train" || return 1
    elif [ -f "$images" ]; then
      cp "$images" "$CARRY/cifar10-train-jpg.tar.gz" || return 1
    else
      echo "usage: --prepare [IMAGES], IMAGES a CIFAR-10 image folder (IMAGES/train/<class>/*.jpg) or a tarball of one"
      echo "(cifar10/train/<class>/*.jpg); docs/cifar.md says how to write one from the original release."
      return 1
    fi
  fi
  grep -qx "/$CARRY/" .gitignore || echo "warning: add /$CARRY/ to .gitignore"
  ls -la "$CARRY" "$CARRY/whl"
}

gpu_setup() {
  mkdir -p "$OUT" "$RUNS"
  exec > >(tee -a "$OUT/${LOG_NAME:-gpu.log}") 2>&1
  export PYTHONUNBUFFERED=1
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    || echo "(no nvidia-smi)"
  local spec missing=()
  for spec in $GPU_WHEELS; do
    $PYTHON -c "import ${spec#*:}" 2>/dev/null || missing+=("${spec%%:*}")
  done
  if (( ${#missing[@]} )); then
    echo "== installing from $CARRY/whl: ${missing[*]}"
    $PYTHON -m pip install -q --no-index --find-links "$CARRY/whl" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${missing[@]}" || { echo "${missing[*]}: not all in $CARRY/whl, run --prepare"; return 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  $PYTHON -c 'import jax, flax, ml_collections, grain; print("jax", jax.__version__, jax.devices(), "flax",
    flax.__version__)' || return 1
  local tarball
  for tarball in "$CARRY"/runs_*.tar.gz; do
    [ -f "$tarball" ] || continue
    echo "== resuming from $tarball"
    tar xzf "$tarball" -C "$RUNS" || return 1
  done
  # Each process takes the memory it needs, not 75% of the GPU (JAX's default), so processes can share the GPU.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
}

gpu_images() {
  [ -n "${DATA_DIR:-}" ] && return 0
  mkdir -p /tmp/data && tar xzf "$CARRY/cifar10-train-jpg.tar.gz" -C /tmp/data \
    || { echo "no $CARRY/cifar10-train-jpg.tar.gz: run --prepare IMAGES first"; return 1; }
  DATA_DIR=/tmp/data/cifar10
}

gpu_pack() {
  local name=$1; shift
  tar czf "$OUT/runs_$name.tar.gz" -C "$RUNS" "$@" \
    && echo "packed $OUT/runs_$name.tar.gz ($(du -h "$OUT/runs_$name.tar.gz" | cut -f1))"
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
