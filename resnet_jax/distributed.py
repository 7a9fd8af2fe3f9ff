"""Multi-host runs on JAX's own multi-controller runtime (`jax.distributed`); see docs/multihost.md.

Every process runs the same program on its own devices; `jax.jit` over a `Mesh` of *all* processes' devices makes
the compiler insert the cross-process collectives. What this module adds around that:

  `initialize(...)`            starts the runtime when the environment or the flags say the run has several
                               processes (TPU VM, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, explicit flags), and
                               does nothing for a run alone.
  `barrier(name)`              all processes wait for each other (a no-op alone).
  `preemption_reached(step)`   the step at which all processes agree to checkpoint and stop after a SIGTERM.
  `exit_with_error(message)`   one message and exit status 1, leaving no process waiting for this one.
"""
import importlib.util
import glob
import os
import sys

import jax
from resnet_jax.errors import ConfigError

MODES = ('auto', 'on', 'off')


def _slurm_tasks() -> int:
  # The variables jax's own SLURM detection reads; one task alone is not a multi-process run.
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  return int(os.environ['SLURM_NTASKS']) if all(v in os.environ for v in needed) else 0


def _on_cloud_tpu_vm() -> bool:
  # A Cloud TPU VM has libtpu installed and TPU chips under /dev (accel* on v2-v4, vfio on v5 and later). jax then
  # finds the slice's hosts from the metadata server; on a single-host slice it is a cluster of one process.
  return importlib.util.find_spec('libtpu') is not None and bool(glob.glob('/dev/accel*') or
                                                                  glob.glob('/dev/vfio/[0-9]*'))


def detect(coordinator_address: str | None = None, num_processes: int | None = None) -> str | None:
  """Why this process should start the distributed runtime, or None when it runs alone."""
  if coordinator_address or (num_processes or 0) > 1:
    return 'flags'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if _slurm_tasks() > 1:
    return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in os.environ and int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if _on_cloud_tpu_vm():
    return 'Cloud TPU VM'
  return None


def initialize(mode: str = 'auto', coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout: int = 300,
               heartbeat_timeout: int = 100) -> bool:
  """Starts `jax.distributed` when `mode` is 'on', or 'auto' and `detect` finds a cluster. Returns whether it did.

  Call it before anything touches a device. Arguments left None are found by jax (TPU metadata, SLURM, Open MPI).
  `heartbeat_timeout` bounds how long the others keep running after one process dies: they stop with an error
  naming the lost process instead of waiting forever in a collective.
  """
  if mode not in MODES:
    raise ConfigError(f'Unknown --distributed={mode!r}; valid choices: {", ".join(MODES)}.')
  if mode == 'off' or jax.distributed.is_initialized():
    return False
  if (coordinator_address is None) != (process_id is None) or (coordinator_address and not num_processes):
    raise ConfigError('Give --coordinator_address, --num_processes and --process_id together (e.g. '
                      '--coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=0 on the first host), '
                      'or none of them to let jax detect the cluster (TPU VM, SLURM, Open MPI).')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id={process_id} must be between 0 and --num_processes-1={num_processes - 1}.')
  if mode == 'auto' and detect(coordinator_address, num_processes) is None:
    return False
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  except (RuntimeError, ValueError) as e:  # jax's own error, with what we know about the setup
    raise ConfigError(
        f'Could not start the distributed runtime (coordinator {coordinator_address or "auto-detected"}, '
        f'{num_processes or "auto-detected"} processes, this one {process_id if process_id is not None else "?"}) '
        f'within {initialization_timeout} s: {e}\nStart every process with the same --coordinator_address '
        '(host:port of process 0, reachable from all hosts) and --num_processes, each with its own --process_id; '
        'or pass --distributed=off for a run alone.') from e
  return True


def describe() -> str:
  return (f'process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} of '
          f'{jax.device_count()} devices here')


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing to wait for alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def exit_with_error(message: str, peers_failed: bool = False, wait_seconds: int = 10):
  """Prints `message` and exits with status 1, without leaving the other processes waiting.

  Alone: a plain exit. With several processes, a mistake in the config or the data is usually found by all of them
  at the same point: when all arrive within `wait_seconds` they leave together through jax's clean shutdown. When
  the others do not come (the mistake is this process's alone, or `peers_failed`: a collective already failed),
  this process leaves at once, so their next collective fails now instead of after jax's shutdown timeout.
  """
  print(message, file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    try:
      from jax._src import distributed as jax_distributed  # the coordination client is private; orbax uses it too
      client = jax_distributed.global_state.client
      if peers_failed or client is None:
        raise TimeoutError
      client.wait_at_barrier('resnet_jax_exit_with_error', wait_seconds * 1000)
    except Exception:  # a timeout, the coordinator is gone, or jax moved its client
      os._exit(1)
  sys.exit(1)


def preemption_reached(step: int) -> bool:
  """True at the step all processes agreed on after any of them got SIGTERM (jax's preemption sync service).
  Must be called at every step by every process; always False alone."""
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
