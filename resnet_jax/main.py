"""Train and evaluate one experiment:

  python -m resnet_jax.main --config=configs/cifar_110.py [--workdir=runs/cifar_110] [--config.FIELD=VALUE ...]
      # --workdir defaults to runs/<config file name>

  python -m resnet_jax.main --config=configs/cifar_20.py --config.num_steps=4000
      # a shortened run: the learning-rate drops follow num_steps (at 50% and 75% of the run)

  python -m resnet_jax.main --config=configs/cifar_110.py --workdir=runs/cifar_110_s0-4 --config.num_seeds=5
      # seeds 0..4 in one program, each seed's metrics in WORKDIR/seed<s>/

Resumes from WORKDIR/checkpoints when a checkpoint is there; `--workdir` alone resumes the run recorded there (its
config.json). The logic lives in train.train_and_evaluate.
Exit status: 0 when done or stopped by SIGTERM (checkpoint written), 130 when stopped by SIGINT (checkpoint written),
1 with one `error: ...` line for a mistake in the flags, the config, the data or the workdir.
"""
import os
import signal
import sys

import jax
from absl import flags

from resnet_jax import cli, distributed, train

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_bool('force_resume', False, 'Resume even if the model, data or recipe fields of the config differ from '
                    'those of the checkpointed run (the earlier config.json is kept as config.json.1, .2, ...).')
  # Multi-host runs (docs/multihost.md): the same command on every host; jax.distributed starts only when needed.
  flags.DEFINE_enum('distributed', 'auto', distributed.MODES, 'auto: start jax.distributed when the flags below or '
                    'the environment (TPU VM, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) say the run has several '
                    'processes; on: always; off: never.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, the same for all processes.')
  flags.DEFINE_integer('num_processes', None, 'How many processes the run has.')
  flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes-1.')
  flags.DEFINE_integer('heartbeat_timeout', 100, 'Seconds without a heartbeat after which a process counts as dead '
                       'and the others stop with an error (jax.distributed).')
  flags.DEFINE_integer('initialization_timeout', 300, 'Seconds to wait for all processes to join.')


def main(config, workdir: str) -> None:
  if not workdir:
    workdir = os.path.join('runs', cli.config_name())
    print(f'Writing to {workdir} (--workdir=DIR to choose another).', flush=True)
  if distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                            initialization_timeout=FLAGS.initialization_timeout,
                            heartbeat_timeout=FLAGS.heartbeat_timeout):
    print(f'jax.distributed: {distributed.describe()}.', flush=True)
  try:
    last = train.train_and_evaluate(config, workdir, force_resume=FLAGS.force_resume)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    distributed.exit_with_error(
        f'error: {distributed.describe()}: a step with the other processes failed, most likely because one of them '
        f'stopped (see its log). Restart all processes with the same command to resume from the last checkpoint.\n'
        f'{type(e).__name__}: {str(e)[:2000]}', peers_failed=True)
  if last.get('stopped_by_signal') == signal.SIGINT:
    sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
  cli.run(main, define_flags, workdir_help='Directory for metrics, checkpoints and plots (default: runs/<config file '
          'name>); without --config, the run recorded there is resumed.')
