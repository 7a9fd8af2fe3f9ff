"""Train and evaluate one experiment:

  python -m resnet_jax.main --config=configs/cifar_110.py --workdir=runs/cifar_110 [--config.FIELD=VALUE ...]

  python -m resnet_jax.main --config=configs/cifar_110.py --workdir=runs/cifar_110_s0-4 --config.num_seeds=5
      # seeds 0..4 in one program, each seed's metrics in WORKDIR/seed<s>/

Resumes from WORKDIR/checkpoints when a checkpoint is there. The logic lives in trainer.train_and_evaluate.
Exit status: 0 when done or stopped by SIGTERM (checkpoint written), 130 when stopped by SIGINT (checkpoint written),
1 with one `error: ...` line for a mistake in the flags, the config, the data or the workdir.
"""
import difflib
import glob
import os
import runpy
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and plots.')
_FORCE = flags.DEFINE_bool('force_resume', False, 'Resume even if the model, data or recipe fields of the config '
                           'differ from those of the checkpointed run (the earlier config.json is kept as '
                           'config.json.1, .2, ...).')
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


def _known_configs() -> str:
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
  names = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(here, '*.py')))
  return ', '.join(names) if names else '(no configs/ directory next to the package)'


def _config_arg(argv) -> str:
  """The config file named by --config=PATH[:ARGS] (the last one, as absl takes the last value)."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  return values[-1].split(':')[0] if values else '<none>'


def _unknown_field_message(argv, error) -> str:
  """One line for --config.FIELD=... where FIELD is not in the config (ml_collections raises a bare AttributeError
  or KeyError): the flag, the field and its section, the closest field of that section, and the section's fields."""
  try:  # the flag holds no config after a failed parse: read the file again to find the field
    config = runpy.run_path(_config_arg(argv))['get_config']()
  except Exception:  # a config file that cannot be read twice: name what ml_collections said
    return f'error: the config has no field {str(error).splitlines()[0]}.'
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node, section = config, 'config'
    for field in arg.split('=', 1)[0][len('--config.'):].split('.'):
      if not hasattr(node, 'keys'):
        return f'error: {arg}: {section} is a value, not a section with fields.'
      if field not in node:
        fields = sorted(node.keys())
        close = difflib.get_close_matches(field, fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else '.'
        return f"error: {arg}: {section} has no field '{field}'{hint} Fields of {section}: {', '.join(fields)}."
      node, section = node[field], f'{section}.{field}'
  return f'error: the config has no field {str(error).splitlines()[0]}.'


def _config_file_message(path: str) -> str:
  return f'error: cannot load the config file {path!r}: no such file. Configs: {_known_configs()}.'


def _parse_flags(argv):
  """absl's flag parsing, with one `error:` line for the config mistakes that otherwise end in a stack trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --helpshort to see the flags.')
  except OSError:  # --config.FIELD=... overrides on a config file that could not be loaded
    sys.exit(_config_file_message(_config_arg(argv)))
  except (AttributeError, KeyError) as e:
    sys.exit(_unknown_field_message(argv, e))


def _load_config():
  config = _CONFIG.value
  if config is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required, e.g. '
                         '--config=configs/cifar_20.py --workdir=runs/cifar_20')
  try:
    config.keys()  # ml_collections defers a config file's load error to the first use of the config
  except OSError:
    sys.exit(_config_file_message(flags.FLAGS['config'].config_filename))
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _load_config()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO; --verbosity=0 shows it
  try:
    _start_distributed()
    last = trainer.train_and_evaluate(config, _WORKDIR.value, force_resume=_FORCE.value)
  except trainer.USER_ERRORS as e:
    # One clear message, not a stack trace: these are mistakes in the config, the data or the workdir.
    distributed.exit_with_error(f'error: {e}')
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    distributed.exit_with_error(
        f'error: {distributed.describe()}: a step with the other processes failed, most likely because one of them '
        f'stopped (see its log). Restart all processes with the same command to resume from the last checkpoint.\n'
        f'{type(e).__name__}: {str(e)[:2000]}', peers_failed=True)
  if last.get('stopped_by_signal') == signal.SIGINT:
    sys.exit(128 + signal.SIGINT)


def _start_distributed():
  if distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                            initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT.value):
    print(f'jax.distributed: {distributed.describe()}.', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
