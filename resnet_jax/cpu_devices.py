"""How many JAX devices a run has on the CPU backend: one per core by default.

XLA:CPU makes one device of the whole host, and its convolution kernels (YNNPACK) run each convolution on one
thread, so a one-device step leaves the other cores mostly idle. With one device per core the data-parallel step
runs a slice of the batch on every core. The numerics do not change with the device count: BN statistics are taken
over groups of `bn_group_size` examples whatever the devices (batchnorm.py), and a test checks 1 vs 4 devices.

`configure(config)` must run before JAX starts its backends (before the first array or `jax.devices()`); the entry
points (`train_and_evaluate`, `resnet_jax.evaluate`, `resnet_jax.time_step`) call it first. It changes nothing on GPU
or TPU runs: `jax_num_cpu_devices` only shapes the CPU backend, which those runs do not compute on.

Several CPU devices meet at every gradient all-reduce, and XLA:CPU ends the process (SIGABRT) when one device's
thread has waited there for 60 s, as can happen on a machine busy with other work. With several devices,
`configure` therefore also tells XLA to wait without limit (`wait_at_collectives`), unless XLA_FLAGS sets that timeout
itself.

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

from resnet_jax import validation

_ENV_FLAG = '--xla_force_host_platform_device_count'
# XLA:CPU ends the whole process when one device's thread waits more than 20 + 40 s for the others at a collective
# (the gradient all-reduce), which a busy machine can cause. A negative value means wait as long as it takes.
COLLECTIVE_TIMEOUT_FLAG = '--xla_cpu_collective_call_terminate_timeout_seconds'
_decision = 'JAX default'  # what the last configure() decided, for the start-of-run line


def cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. under taskset), not all the host's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def choose(config, available: int) -> int:
  """The largest device count <= `available` that fits the config (validation.devices_fit; 1 always does)."""
  return next(n for n in range(max(1, available), 0, -1) if n == 1 or validation.devices_fit(config, n))


def configure(config) -> str:
  """Sets the CPU device count for this process as the module doc says; returns (and remembers for `describe`)
  a short account of the choice. Harmless when JAX has already started: then nothing can change, and it says so."""
  global _decision
  if config.cpu_devices > 0:
    n, why = config.cpu_devices, 'config.cpu_devices'
  elif _ENV_FLAG in os.environ.get('XLA_FLAGS', '') or os.environ.get('JAX_NUM_CPU_DEVICES'):
    _decision = 'set in the environment'
    wait_at_collectives()
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
  if n > 1:
    wait_at_collectives()
  return _decision


def wait_at_collectives() -> None:
  """Lets a starved CPU device thread wait at a collective instead of aborting the process: adds
  COLLECTIVE_TIMEOUT_FLAG=-1 to XLA_FLAGS, unless the user's XLA_FLAGS set it already. Effective only before JAX
  starts its backends (XLA reads its flags once); left alone where an accelerator plugin is installed (the run
  computes there, and its XLA may not know this CPU flag)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if COLLECTIVE_TIMEOUT_FLAG in flags or _accelerator_plugin_installed() or not _xla_knows(COLLECTIVE_TIMEOUT_FLAG):
    return
  os.environ['XLA_FLAGS'] = f'{flags} {COLLECTIVE_TIMEOUT_FLAG}=-1'.strip()


def _accelerator_plugin_installed() -> bool:
  from importlib import metadata, util
  return bool(metadata.entry_points(group='jax_plugins')) or util.find_spec('libtpu') is not None


def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA defines `flag` (an unknown flag in XLA_FLAGS aborts the process): its name is in
  one of jaxlib's shared libraries (jaxlib 0.10.2: near the start of libjax_common.so, found in milliseconds)."""
  import glob
  import mmap
  import jaxlib
  name = flag.lstrip('-').encode()
  libraries = glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), '**', '*.so*'), recursive=True)
  for path in sorted(libraries, key=os.path.getsize, reverse=True):
    try:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(name) >= 0:
          return True
    except (OSError, ValueError):  # unreadable or empty
      continue
  return False


def describe() -> str:
  return _decision
