"""Train and evaluate one experiment:

  python -m resnet_jax.main --config=configs/cifar_110.py --workdir=runs/cifar_110 [--config.FIELD=VALUE ...]

Resumes from WORKDIR/checkpoints when a checkpoint is there. The logic lives in trainer.train_and_evaluate.
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import checkpoint, data, distributed, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and plots.')
_FORCE = flags.DEFINE_bool('force_resume', False, 'Resume even if the model or data fields of the config differ '
                           'from those of the checkpointed run.')
# Multi-host runs (docs/multihost.md): the same command on every host; jax.distributed starts only when needed.
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', distributed.MODES, 'auto: start jax.distributed when the '
                                 'flags below or the environment (TPU VM, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) '
                                 'say the run has several processes; on: always; off: never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, the same for all processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'How many processes the run has.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes-1.')
_HEARTBEAT = flags.DEFINE_integer('heartbeat_timeout', 100, 'Seconds without a heartbeat after which a process '
                                  'counts as dead and the others stop with an error (jax.distributed).')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout', 300, 'Seconds to wait for all processes to join.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required, e.g. '
                         '--config=configs/cifar_20.py --workdir=runs/cifar_20')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO; --verbosity=0 shows it
  try:
    _start_distributed()
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_resume=_FORCE.value)
  except (ValueError, data.DatasetNotFoundError, PermissionError, trainer.NonFiniteLossError) as e:
    # One clear message, not a stack trace: these are mistakes in the config, the data or the workdir.
    distributed.exit_with_error(f'error: {e}')
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    distributed.exit_with_error(
        f'error: {distributed.describe()}: a step with the other processes failed, most likely because one of them '
        f'stopped (see its log). Restart all processes with the same command to resume from the last checkpoint.\n'
        f'{type(e).__name__}: {str(e)[:2000]}', peers_failed=True)


def _start_distributed():
  if distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                            initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT.value):
    print(f'jax.distributed: {distributed.describe()}.', flush=True)


if __name__ == '__main__':
  app.run(main)
