"""The run record: what a workdir says about the run it belongs to, and who holds it.

  WORKDIR/config.json   the run's resolved config. Written when a run starts; a later run in the same workdir must
                        agree on the model, the data and the recipe (each option's resume rule in
                        config_base.OPTIONS) unless forced; read back by
                        the tools (evaluate, fig7, report) over today's defaults, so a field added since the run
                        reads as its default.
  WORKDIR/data.json     what the run trains and is evaluated on: the examples of each split and the class names.
  WORKDIR/run.lock      one run at a time: whatever writes into a workdir (a training run, a sweep's books, the
                        evaluator) holds an OS lock on this file for as long as it works there (`hold`); a second one
                        stops before writing anything, naming the holder (host, pid, start, command) recorded in the
                        file. The OS releases the lock when the holder ends in any way, SIGKILL included.

A resume that changes config.json (forced, or a dataset moved to another directory) keeps the earlier one as
config.json.1, then .2, ...
"""
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile

from ml_collections import ConfigDict

from resnet_jax import config_base
from resnet_jax.errors import CheckpointNotFoundError, ConfigMismatchError, DamagedRecordError, WorkdirError, writing

CONFIG_FILE, DATA_FILE, LOCK_FILE = 'config.json', 'data.json', 'run.lock'
_held = {}  # real path of a workdir this process holds -> [lock file descriptor, nesting depth]


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `workdir` for this process while the block runs (see the module doc), creating it if needed. Nested
  holds of the same workdir in one process (a sweep around the trainer) share the lock. Raises WorkdirError, with
  the holder and what to do, when another process holds it. A workdir this call created is removed again if the
  block fails before anything but the lock was written there (with the parents this call created)."""
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  created = None  # the outermost directory this call creates (the workdir, or a parent such as runs/)
  d = os.path.abspath(workdir)
  while not os.path.exists(d):
    created, d = d, os.path.dirname(d)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 4096).decode(errors='replace').strip()
    os.close(fd)
    try:
      who = json.loads(holder)
      who = f'pid {who["pid"]} on {who["host"]}, started {who["started"]} ({who["command"]})'
    except (ValueError, KeyError, TypeError):
      who = 'another process'
    raise WorkdirError(f'{workdir} is in use by another run: {who}. Wait for it to end (or stop it), or use '
                       'another --workdir.') from None
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                           'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
                           'command': ' '.join(sys.argv)[:500]}).encode())
  _held[key] = [fd, 1]
  try:
    yield
  except BaseException:
    if created and os.listdir(workdir) == [LOCK_FILE]:  # nothing of the run was written: leave no workdir behind
      os.remove(path)
      d = os.path.abspath(workdir)
      while True:
        os.rmdir(d)
        if d == created:
          break
        d = os.path.dirname(d)
    raise
  finally:
    del _held[key]
    os.ftruncate(fd, 0)  # an empty lock file: nobody holds the workdir
    os.close(fd)  # closing releases the lock


def check_writable(workdir: str) -> None:
  """Raises PermissionError unless `workdir` can be written (or created); leaves nothing behind."""
  existing = os.path.abspath(workdir)
  while not os.path.isdir(existing):  # the nearest existing ancestor is where the workdir would be created
    if os.path.exists(existing):
      raise PermissionError(f'The workdir {workdir!r} cannot be created: {existing} is a file; choose another '
                            '--workdir.')
    existing = os.path.dirname(existing)
  try:
    probe = tempfile.mkdtemp(prefix='.write_test', dir=existing)
    os.rmdir(probe)
  except OSError as e:
    raise PermissionError(f'The workdir {workdir!r} is not writable ({e.strerror} in {existing}); choose another '
                          '--workdir.') from e


def config_to_dict(config: ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> dict | None:
  """WORKDIR/config.json as a dict, None when there is none; ValueError, saying what to do, when it is damaged."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise DamagedRecordError(f'{path} is not valid JSON ({e}); it records the config of the run in this workdir. '
                             'Restore it (an earlier copy may be config.json.1), or use another --workdir.') from e
  if not isinstance(saved, dict):
    raise DamagedRecordError(f'{path} does not hold a config (a JSON object); restore it, or use another --workdir.')
  return saved


def over_defaults(saved: dict) -> ConfigDict:
  """A config.json's values over config_base's defaults: a field the record predates reads as its default."""
  config = config_base.base()

  def merge(node, values):
    for k, v in values.items():
      if isinstance(v, dict):
        if k not in node:
          node[k] = ConfigDict()
        merge(node[k], v)
      else:
        node[k] = tuple(v) if isinstance(v, list) else v
  merge(config, saved)
  return config


def load_config(workdir: str) -> ConfigDict:
  """The config of the run in `workdir`, over today's defaults; CheckpointNotFoundError when there is no run."""
  saved = read_config(workdir)
  if saved is None:
    raise CheckpointNotFoundError(f'No run in {workdir}: it has no {CONFIG_FILE}. Pass the run\'s workdir, or '
                                  '--config=configs/... for a config file.')
  return over_defaults(saved)


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def _resume_fields(config: ConfigDict) -> dict:
  """The values a resumed run must keep: every field whose option's resume rule is SAME (a field the options do not
  know is kept too), and the learning-rate schedule the SCHEDULE fields give, as steps."""
  rule = lambda k: config_base.OPTIONS[k].resume if k in config_base.OPTIONS else config_base.SAME
  fields = {k: v for k, v in _flatten(config_to_dict(config)).items() if rule(k) == config_base.SAME}
  fields['lr drops at steps'] = list(config_base.schedule_boundaries(config))
  return fields


def check_resume(workdir: str, config: ConfigDict) -> None:
  """Raises ConfigMismatchError naming every model, data or recipe field (config_base.OPTIONS, resume rule SAME) in
  which `config` differs from the run recorded in `workdir`, with both values. Nothing to check in a workdir without
  a record."""
  saved = read_config(workdir)
  if saved is None:
    return
  old, new = _resume_fields(over_defaults(saved)), _resume_fields(config)
  show = lambda d, k: repr(d[k]) if k in d else '<absent>'
  diffs = [f'  {k}: checkpoint has {show(old, k)}, this run has {show(new, k)}'
           for k in sorted(set(old) | set(new)) if old.get(k, KeyError) != new.get(k, KeyError)]
  if diffs:
    raise ConfigMismatchError(
        'The workdir holds a checkpoint of a run whose model, data or recipe differ from this config:\n'
        + '\n'.join(diffs)
        + '\nUse another --workdir, restore those values, or pass --force_resume to resume anyway (the earlier '
        'config.json is kept as config.json.1, .2, ...).')


def write_json(path: str, value) -> None:
  """Writes `value` to `path` atomically (a temporary file renamed over it)."""
  with writing(path):
    with open(path + '.tmp', 'w') as f:
      json.dump(value, f, indent=2)
    os.replace(path + '.tmp', path)


def write(workdir: str, config: ConfigDict, data_record: dict | None = None) -> None:
  """Records the run's config (and its data, when given) in `workdir`. An earlier config.json that differs is kept
  as config.json.N."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_to_dict(config)
  if os.path.exists(path):
    try:
      same = read_config(workdir) == new
    except ValueError:  # damaged (a forced resume does not read it): keep it too
      same = False
    if not same:
      n = 1
      while os.path.exists(f'{path}.{n}'):
        n += 1
      os.replace(path, f'{path}.{n}')
  write_json(path, new)
  if data_record is not None:
    write_json(os.path.join(workdir, DATA_FILE), data_record)


def data_record(inp) -> dict:
  """data.json of an input: {'train_examples': N, 'val_examples': n, ..., 'class_names': [...]}."""
  return {f'{split}_examples': n for split, n in inp.split_sizes().items()} | {'class_names': list(inp.class_names)}
