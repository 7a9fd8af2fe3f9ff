"""What the commands share (main, evaluate, summary, time_step, torchvision_weights): `--config`, `--workdir`, and
one line for a mistake.

  --config=configs/X.py [--config.FIELD=VALUE ...]   a config file, with overrides
  --workdir=W [--config.FIELD=VALUE ...]             without --config, the config of the run in W (its config.json,
                                                     over today's defaults); an override changes only what it names,
                                                     typically where the data now lives (--config.data.data_dir=DIR)

A mistake in the flags, the config, the data or the workdir (errors.USER_ERRORS, raised where the project detects
it) ends the command with one `error: ...` line and exit status 1, never a stack trace; anything else, a ValueError
from inside jax or orbax included, is a bug and keeps its stack trace.
"""
import contextlib
import difflib
import glob
import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import distributed, errors, run_record

FLAGS = flags.FLAGS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def run(main, define_flags=None, *, workdir_help: str, config_from_workdir: bool = True) -> None:
  """Runs a command: defines its flags (`define_flags()`), --workdir and --config, parses the command line with
  one-line answers to mistakes, and calls `main(config, workdir)`, where a USER_ERRORS exception becomes one line."""
  if define_flags is not None:
    define_flags()
  if 'workdir' not in FLAGS:
    flags.DEFINE_string('workdir', None, workdir_help)

  def command(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO; --verbosity=0 shows it
    with one_line_errors():
      return main(config(), FLAGS.workdir)
  app.run(command, flags_parser=lambda argv: parse(argv, config_from_workdir))


@contextlib.contextmanager
def one_line_errors():
  """The project's errors (errors.USER_ERRORS) as one `error: ...` line and exit status 1."""
  try:
    yield
  except errors.USER_ERRORS as e:
    distributed.exit_with_error(f'error: {e}')


def _last_value(argv, name: str) -> str | None:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  return values[-1] if values else None


def parse(argv, config_from_workdir: bool = True) -> list:
  """absl's flag parsing, after defining --config from the command line: a config file when --config is given,
  else (with `config_from_workdir`) the record of the run in --workdir when it has one."""
  if 'config' in FLAGS:  # parsed before in this process (a test): define it afresh for this command line
    delattr(FLAGS, 'config')
  config_file, workdir = _last_value(argv, 'config'), _last_value(argv, 'workdir')
  base = None
  if config_file is None and config_from_workdir and workdir:
    try:
      if run_record.read_config(workdir) is not None:
        base = run_record.load_config(workdir)
    except errors.DamagedRecordError as e:
      sys.exit(f'error: {e}')
  if base is not None:
    config_flags.DEFINE_config_dict('config', base, f'The run\'s config ({workdir}/config.json).', lock_config=True,
                                    sys_argv=argv)
  else:
    config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True,
                                    sys_argv=argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}\nPass --helpshort to see the flags.')
  except OSError:  # --config.FIELD=... overrides on a config file that could not be loaded
    sys.exit(_config_file_message((config_file or '').split(':')[0]))
  except (AttributeError, KeyError) as e:
    sys.exit(_unknown_field_message(argv, e, base, (config_file or '').split(':')[0]))


def config_name() -> str | None:
  """The name of the config file given with --config, without directory and .py (None without one)."""
  path = getattr(FLAGS['config'], 'config_filename', None)
  return os.path.splitext(os.path.basename(path.split(':')[0]))[0] if path else None


def config():
  """The parsed config; a usage error when there is none."""
  value = FLAGS.config
  if value is None:
    raise app.UsageError('--config is required (e.g. --config=configs/cifar_20.py), or --workdir of a run, whose '
                         'config.json is then read.')
  try:
    value.keys()  # ml_collections defers a config file's load error to the first use of the config
  except OSError:
    sys.exit(_config_file_message(FLAGS['config'].config_filename))
  return value


def _known_configs() -> str:
  names = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, '*.py')))
  return ', '.join(names) if names else '(no configs/ directory next to the package)'


def _config_file_message(path: str) -> str:
  return f'error: cannot load the config file {path!r}: no such file. Configs: {_known_configs()}.'


def _unknown_field_message(argv, error, base, config_file: str) -> str:
  """One line for --config.FIELD=... where FIELD is not in the config (ml_collections raises a bare AttributeError
  or KeyError): the flag, the field and its section, the closest field of that section, and the section's fields."""
  config = base
  if config is None:
    try:  # the flag holds no config after a failed parse: read the file again to find the field
      config = runpy.run_path(config_file)['get_config']()
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
