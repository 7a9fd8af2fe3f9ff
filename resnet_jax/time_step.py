"""Times the real training step of an experiment config:

  python -m resnet_jax.time_step --config=configs/cifar_20.py [--steps=N] [--repeats=R] [--json]
                                 [--config.model.dtype=bfloat16 ...]

It builds the step of `xla_workarounds.StepCaller` (the one `resnet_jax.main` runs: config.steps_per_call steps per
call in one device loop on accelerators, one step per program on the CPU), compiles it once (lowering and compile times reported separately), runs `--warmup` calls that are not timed,
then `--repeats` timed windows of `--steps` calls each, blocking on the result only at the end of a window (as the
training loop, which reads the device only at log points). The step time is the median over windows of the window's
time divided by its steps.

Data stays on the devices, as in training. CIFAR-family configs: a synthetic uint8 training set of the dataset's
size (random pixels; the step gathers its batch from the epoch permutation and runs the crop/flip augmentation
inside the step, exactly as in training). ImageNet configs: a synthetic on-device pool of `--pool` images at the
config's size that the same step gathers from (with the flip; no crop padding), so no input pipeline is timed.

With --config.num_seeds=K the step trains K seeds at once (vmapped over the state, as in training): images/s is
summed over the K replicas. Memory: XLA's estimate for the compiled step (state, batch, activations; per device)
and the peak the device reports (accelerators), or the process's peak resident memory (CPU).

Reported: step time, images/s, memory, model FLOP/s and, where the device's peak is known, utilisation. Model FLOPs count
a training step as 3x the forward pass and a multiply-add as 2 FLOPs, with the forward multiply-adds of
`summary.py` (convolutions and the fc layer): 6 x MACs x images. This is the usual "model FLOPs" convention, so
utilisation is comparable with published MFU figures; it ignores BN, ReLU and the optimiser.
"""
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import flags

from resnet_jax import (cli, cpu_devices, data, input_pipeline, mesh as mesh_lib, models, seeds, summary, train_step,
                        validation, xla_workarounds)
from resnet_jax.errors import ConfigError

# Dense peak FLOP/s of the tensor units by device kind and compute dtype (vendor datasheets, no sparsity).
# float32 on NVIDIA GPUs runs convolutions and matmuls as TF32 under XLA's default precision, so its peak is
# the TF32 one. CPUs are not listed: their peak depends on the clock and the vector units, and we do not guess.
PEAK_FLOPS = {
    'H100': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494e12},   # H100 SXM
    'H200': {'bfloat16': 989e12, 'float16': 989e12, 'float32': 494e12},
    'A100': {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12},
}
# Training-set sizes of the in-memory datasets, for the synthetic stand-in.
DATASET_EXAMPLES = {'cifar10': 50_000, 'digits': 1_500}


def peak_flops(device_kind: str, dtype: str):
  """The device's dense peak for `dtype`, or None when we do not know it."""
  for name, peaks in PEAK_FLOPS.items():
    if name in device_kind.upper():
      return peaks.get(dtype)
  return None


def synthetic_data(config, pool: int = 512, examples: int = 0, seed: int = 0):
  """(uint8 images, int32 labels) on the host, shaped as the config's training set."""
  size = config.data.image_size
  if config.model.family == 'imagenet':
    n = pool
  else:
    n = examples or DATASET_EXAMPLES.get(config.data.dataset, 50_000)
  if n < config.batch_size:
    raise ConfigError(f'The synthetic training set ({n} images) must hold at least one batch of '
                      f'{config.batch_size}; raise --pool or --examples.')
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, config.model.num_classes, (n,), dtype=np.int32)
  return images, labels


def _block(tree):
  jax.block_until_ready(tree)


def synthetic_input(config, mesh, pool: int = 512, examples: int = 0):
  """The in-memory input of the training run over synthetic data of the config's shape."""
  images, labels = synthetic_data(config, pool, examples)
  ds = data.Dataset(train_images=images, train_labels=labels, test_images=None, test_labels=None,
                    class_names=[str(i) for i in range(config.model.num_classes)])
  return input_pipeline.InMemoryInput(config, mesh, ds)


def compile_only(config, devices=None) -> dict:
  """Lowers and compiles the training step from abstract shapes only (no initialisation, no data): the compile
  cost of a network too deep to train here."""
  config = config.copy_and_resolve_references()
  mesh = mesh_lib.make_mesh(devices, config.mesh)
  validation.validate(config, mesh.devices.size)
  inp = synthetic_input(config, mesh, examples=config.batch_size)
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  state = train_step.create_state(config, model, mesh, abstract=True)
  spec = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  args = [spec(a, sh) for a, sh in zip(next(inp.train_inputs(0)), inp.input_shardings)]
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = xla_workarounds.StepCaller(train_step.make_step(config, model, mesh, inp), config, mesh,
                                       inp.input_shardings).lower(state, *args)
  t1 = time.perf_counter()
  lowered.compile()
  c2, t2 = time.process_time(), time.perf_counter()
  return dict(config=dict(family=config.model.family, depth=config.model.depth, dtype=config.model.dtype,
                          batch_size=config.batch_size, scan_blocks=config.model.scan_blocks),
              device=dict(platform=jax.devices()[0].platform, kind=jax.devices()[0].device_kind),
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              lower_s=t1 - t0, compile_s=t2 - t1, lower_and_compile_cpu_s=c2 - c0)


def run(config, steps: int = 20, repeats: int = 3, warmup: int = 2, pool: int = 512, examples: int = 0,
        devices=None, device_loop: bool | None = None) -> dict:
  """Compiles and times the training step of `config`; returns the measurements as a dict (see module doc)."""
  if steps < 1 or repeats < 1 or warmup < 0:
    raise ConfigError(f'--steps ({steps}) and --repeats ({repeats}) must be >= 1 and --warmup ({warmup}) >= 0.')
  config = config.copy_and_resolve_references() if hasattr(config, 'copy_and_resolve_references') else config
  if config.model.family == 'imagenet':
    config.data.pad = 0  # the pool images are already at the crop size; the flip still runs in the step
  mesh = mesh_lib.make_mesh(devices, config.mesh)
  num_devices = mesh.devices.size
  validation.validate(config, num_devices)
  inp = synthetic_input(config, mesh, pool, examples)
  args = next(inp.train_inputs(0))
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  state = train_step.create_state(config, model, mesh)
  _block((state, args))

  step_fn = xla_workarounds.StepCaller(train_step.make_step(config, model, mesh, inp), config, mesh,
                                       inp.input_shardings, device_loop=device_loop)
  per_call = step_fn.steps_per_program  # each call of the compiled program takes this many steps
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = step_fn.lower(state, *args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  c2, t2 = time.process_time(), time.perf_counter()

  for _ in range(warmup):
    state = compiled(state, *args)
  _block(state)
  windows, cpu_windows = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state = compiled(state, *args)
    _block(state)
    windows.append((time.perf_counter() - start) / (steps * per_call))
    cpu_windows.append((time.process_time() - cpu_start) / (steps * per_call))
  sums = jax.device_get(state.train_sums)
  loss = float(np.sum(sums['loss'])) / float(np.sum(sums['count']))  # over every seed

  step_time = statistics.median(windows)
  unrolled = config.model.copy_and_resolve_references()
  unrolled.scan_blocks = False  # summary counts each conv call it sees; a scanned block is traced once
  params, macs = summary.count(unrolled, config.data.image_size)
  images_per_sec = config.num_seeds * config.batch_size / step_time  # summed over the seeds
  model_flops = 6 * macs * images_per_sec
  device = jax.devices()[0] if devices is None else devices[0]
  peak = peak_flops(device.device_kind, config.model.dtype)
  stats = device.memory_stats() if device.platform != 'cpu' else None
  peak_total = peak * num_devices if peak else None
  return dict(
      config=dict(family=config.model.family, depth=config.model.depth, residual=config.model.residual,
                  shortcut=config.model.shortcut, dtype=config.model.dtype, batch_size=config.batch_size,
                  bn_group_size=config.bn_group_size, image_size=config.data.image_size,
                  scan_blocks=config.model.scan_blocks, loss_scale=config.loss_scale.enabled,
                  num_seeds=config.num_seeds, steps_per_call=step_fn.per_call, steps_per_program=per_call,
                  device_loop=step_fn.device_loop,
                  seed_batching=seeds.seed_batching(config, mesh) if config.num_seeds > 1 else None),
      device=dict(platform=device.platform, kind=device.device_kind, count=num_devices,
                  cpu_devices=cpu_devices.describe() if device.platform == 'cpu' else None,
                  host=platform.processor() or platform.machine(), cpu_count=os.cpu_count()),
      versions=dict(jax=jax.__version__, python=platform.python_version()),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      lower_s=t1 - t0, compile_s=t2 - t1, lower_and_compile_cpu_s=c2 - c0,
      steps=steps, repeats=repeats, warmup=warmup,
      step_time_s=step_time, step_times_s=windows,
      # CPU seconds this process used per step (all threads): on a shared CPU it moves less than the wall time
      # when other processes compete, so it helps tell a real change from contention.
      process_cpu_s_per_step=statistics.median(cpu_windows),
      images_per_sec=images_per_sec,
      step_memory_bytes=validation.step_memory_bytes(compiled),
      # The device's own peak where it reports one; on the CPU the process's peak resident memory (everything).
      peak_memory_bytes=(stats or {}).get('peak_bytes_in_use') if device.platform != 'cpu' else _peak_rss_bytes(),
      params=params, macs_per_image=macs, model_flops_per_sec=model_flops,
      peak_flops_per_sec=peak_total, utilisation=(model_flops / peak_total) if peak_total else None,
      final_train_loss=loss)


def _peak_rss_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def format_result(r: dict) -> str:
  c = r['config']
  name = f'{c["family"]} {"ResNet" if c["residual"] else "plain"}-{c["depth"]} {c["dtype"]} batch {c["batch_size"]}'
  if c['num_seeds'] > 1:
    name += f' x {c["num_seeds"]} seeds'
  mib = lambda b: f'{b / 2 ** 20:,.0f} MiB' if b is not None else 'n/a'
  util = f', utilisation {100 * r["utilisation"]:.1f}%' if r['utilisation'] is not None else ''
  return (f'{name} on {r["device"]["count"]}x {r["device"]["kind"]} ({r["device"]["platform"]})\n'
          f'  compile {r["compile_s"]:.1f} s (+ lowering {r["lower_s"]:.1f} s; '
          f'{r["lower_and_compile_cpu_s"]:.1f} s of process CPU time for both)\n'
          f'  step {1e3 * r["step_time_s"]:.2f} ms (median of {r["repeats"]} x {r["steps"]} steps; windows '
          + ', '.join(f'{1e3 * t:.2f}' for t in r['step_times_s']) + ' ms; '
          f'{1e3 * r["process_cpu_s_per_step"]:.0f} ms of process CPU time per step)\n'
          f'  {r["images_per_sec"]:,.0f} images/s, {r["model_flops_per_sec"] / 1e12:.3f} model TFLOP/s{util}\n'
          f'  memory: step estimate {mib(r["step_memory_bytes"])} per device, peak {mib(r["peak_memory_bytes"])}')


def define_flags():
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the text.')
  flags.DEFINE_integer('steps', 20, 'Timed calls of the step per window (each config.steps_per_call steps).')
  flags.DEFINE_integer('repeats', 3, 'Timed windows; the step time is their median.')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
  flags.DEFINE_integer('pool', 512, 'ImageNet configs: synthetic images kept on the devices.')
  flags.DEFINE_integer('examples', 0, 'CIFAR-family configs: size of the synthetic training set (0: the dataset\'s, '
                       '50,000 for CIFAR-10).')
  flags.DEFINE_bool('compile_only', False, 'Only lower and compile the step (from shapes, no initialisation) and '
                    'report the times.')
  flags.DEFINE_integer('num_devices', 0, 'Use the first N devices (0: all).')
  flags.DEFINE_enum('device_loop', 'auto', ['auto', 'on', 'off'], 'Run the steps of a call in a loop on the device '
                    '(auto: on accelerators, not on the CPU; xla_workarounds.StepCaller).')


def main(config, workdir) -> None:
  del workdir
  f = flags.FLAGS
  cpu_devices.configure(config)  # before jax.devices() below starts the backends
  devices = jax.devices()[:f.num_devices] if f.num_devices else None
  if f.compile_only:
    result = compile_only(config, devices)
    print(json.dumps(result) if f.json else
          f'compile {result["compile_s"]:.1f} s + lowering {result["lower_s"]:.1f} s '
          f'({result["lower_and_compile_cpu_s"]:.1f} s of process CPU time)', flush=True)
    return
  loop = {'auto': None, 'on': True, 'off': False}[f.device_loop]
  result = run(config, f.steps, f.repeats, f.warmup, f.pool, f.examples, devices, loop)
  print(json.dumps(result) if f.json else format_result(result), flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags, workdir_help='A run\'s directory: without --config, time the step of the run it holds.')
