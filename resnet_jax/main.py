"""Train and evaluate one experiment:

  python -m resnet_jax.main --config=configs/cifar_110.py --workdir=runs/cifar_110 [--config.FIELD=VALUE ...]

Resumes from WORKDIR/checkpoints when a checkpoint is there. The logic lives in trainer.train_and_evaluate.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import checkpoint, data, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and plots.')
_FORCE = flags.DEFINE_bool('force_resume', False, 'Resume even if the model or data fields of the config differ '
                           'from those of the checkpointed run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required, e.g. '
                         '--config=configs/cifar_20.py --workdir=runs/cifar_20')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO; --verbosity=0 shows it
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, force_resume=_FORCE.value)
  except (ValueError, data.DatasetNotFoundError, PermissionError, trainer.NonFiniteLossError) as e:
    # One clear message, not a stack trace: these are mistakes in the config, the data or the workdir.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
