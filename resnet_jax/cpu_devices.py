"""How many JAX devices a run has on the CPU backend: one per core by default.

XLA:CPU makes one device of the whole host, and its convolution kernels (YNNPACK) run each convolution on one
thread, so a one-device step leaves the other cores mostly idle. With one device per core the data-parallel step
runs a slice of the batch on every core. The numerics do not change with the device count: BN statistics are taken
over groups of `bn_group_size` examples whatever the devices (batchnorm.py), and a test checks 1 vs 4 devices.

`configure(config)` must run before JAX starts its backends (before the first array or `jax.devices()`); the entry
points (`train_and_evaluate`, `resnet_jax.evaluate`, the benchmark) call it first. It changes nothing on GPU or TPU
runs: `jax_num_cpu_devices` only shapes the CPU backend, which those runs do not compute on.

Who decides, first match wins:
  config.cpu_devices > 0                     that many devices
  XLA_FLAGS=--xla_force_host_platform_device_count=N or JAX_NUM_CPU_DEVICES=N in the environment
                                             left to JAX (the user's choice)
  otherwise                                  the largest count <= the cores this process may use that divides the
                                             batch and the evaluation batch and keeps each BN group on one device
                                             (or a whole number of devices)
"""
import os

import jax

_ENV_FLAG = '--xla_force_host_platform_device_count'
_decision = 'JAX default'  # what the last configure() decided, for the start-of-run line


def cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. under taskset), not all the host's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def fits(config, n: int) -> bool:
  """Whether `n` devices can hold the batch: it divides the batch and the evaluation batch, and every BN group
  lies on one device or spans whole devices (train.validate's rules)."""
  b, g = config.batch_size, config.bn_group_size
  if b % n or config.eval_batch_size % n:
    return False
  per_device = b // n
  return not g or per_device % g == 0 or g % per_device == 0


def choose(config, available: int) -> int:
  """The largest device count <= `available` that `fits` the config (1 always does)."""
  return next(n for n in range(max(1, available), 0, -1) if n == 1 or fits(config, n))


def configure(config) -> str:
  """Sets the CPU device count for this process as the module doc says; returns (and remembers for `describe`)
  a short account of the choice. Harmless when JAX has already started: then nothing can change, and it says so."""
  global _decision
  if config.cpu_devices < 0:
    raise ValueError(f'config.cpu_devices={config.cpu_devices} must be >= 0 (0: one device per CPU core).')
  if config.cpu_devices:
    n, why = config.cpu_devices, 'config.cpu_devices'
  elif _ENV_FLAG in os.environ.get('XLA_FLAGS', '') or os.environ.get('JAX_NUM_CPU_DEVICES'):
    _decision = 'set in the environment'
    return _decision
  elif jax.distributed.is_initialized():
    # Several processes share the host's cores in ways this process cannot see; keep JAX's default.
    _decision = 'JAX default (several processes)'
    return _decision
  else:
    n, why = choose(config, cores()), f'one per core of {cores()}'
    if n < cores():
      why += f', the most that fit batch {config.batch_size}'
  try:
    jax.config.update('jax_num_cpu_devices', n)
    _decision = why
  except RuntimeError:  # JAX has started (e.g. a notebook that already ran a computation): keep what it has
    _decision = 'fixed when JAX started'
  return _decision


def describe() -> str:
  return _decision
