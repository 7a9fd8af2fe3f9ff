"""A resumable sweep: a list of (experiment, net, seed, config) runs, each in its own trainer workdir.

RUNS_DIR/<experiment>/<net>/seed<k>/ holds what `resnet_jax.train.train_and_evaluate` writes (metrics.jsonl,
config.json, checkpoints/, curves.png) plus run_info.json: the wall time summed over every invocation that worked on
the run. Running a sweep again skips the finished runs and resumes the unfinished ones from their last checkpoint
(the trainer resumes by itself; this module decides what to start and keeps the books).

A run that is stopped (SIGTERM/SIGINT: the trainer checkpoints and returns early) stops the whole sweep, so that
`timeout` or a scheduler can cut a sweep anywhere and the same command continues it.
"""
import ast
import dataclasses
import importlib.util
import json
import os
import time

from resnet_jax import errors, metrics_io, run_record
from resnet_jax.errors import ConfigError, MissingFileError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, 'configs')
RUN_INFO = 'run_info.json'
# Mistakes in a config, the data or the runs folder: the commands print one line for these, not a stack trace.
USER_ERRORS = errors.USER_ERRORS


@dataclasses.dataclass
class RunSpec:
  experiment: str
  net: str
  seed: int
  config: object  # ml_collections.ConfigDict; config.seed is set to `seed`
  note: str = ''  # what the report should say about this run (e.g. "image-folder subset, not ImageNet")

  def workdir(self, runs_dir: str) -> str:
    """RUNS_DIR/<experiment>/<net>/seed<k>/, or .../seeds<k>-<k+K-1>/ for K seeds trained in one program (each
    seed's metrics then in its seed<s>/ below)."""
    k = self.config.num_seeds
    name = f'seed{self.seed}' if k == 1 else f'seeds{self.seed}-{self.seed + k - 1}'
    return os.path.join(runs_dir, self.experiment, self.net, name)


def load_config_file(path: str):
  """Calls get_config() of a configs/*.py file, the way `--config=` does in resnet_jax.main."""
  if not os.path.isfile(path):
    raise MissingFileError(f'No config file {path!r}; the configs are in {CONFIG_DIR}.')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_overrides(items) -> dict:
  """['num_steps=200', 'data.source=folder'] -> {'num_steps': 200, 'data.source': 'folder'} (values as Python
  literals where they parse, else strings)."""
  out = {}
  for item in items or ():
    if '=' not in item:
      raise ConfigError(f'Override {item!r} is not KEY=VALUE (e.g. num_steps=200 or data.source=folder).')
    key, value = item.split('=', 1)
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def apply_overrides(config, overrides: dict):
  """Sets dotted fields of a ConfigDict; an unknown field is an error that lists the valid ones."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      if p not in target:
        raise ConfigError(f'Unknown config section {p!r} in {key!r}; valid: {", ".join(sorted(target.keys()))}.')
      target = target[p]
    if leaf not in target:
      raise ConfigError(f'Unknown config field {key!r}; valid fields here: {", ".join(sorted(target.keys()))}.')
    if isinstance(target[leaf], float) and isinstance(value, int):
      value = float(value)
    if isinstance(target[leaf], tuple) and isinstance(value, (int, list)):
      value = tuple(value) if isinstance(value, list) else (value,)
    try:
      target[leaf] = value
    except TypeError as e:  # ml_collections refuses a value of another type than the field's
      raise ConfigError(f'{key}={value!r}: {e}') from None
  return config


def shorten(config, num_steps: int):
  """The recipe scaled to `num_steps`: the lr boundaries keep their fractions of the run (CIFAR: 32k and 48k of
  64k = 50% and 75%); logging, evaluation and checkpoints at ~20, ~10 and ~5 points of the run."""
  old = config.num_steps
  config.lr_boundaries = tuple(max(1, round(b * num_steps / old)) for b in config.lr_boundaries)
  config.warmup.max_steps = max(1, round(config.warmup.max_steps * num_steps / old))
  config.num_steps = num_steps
  config.log_every_steps = max(1, num_steps // 20)
  config.eval_every_steps = max(1, num_steps // 10)
  config.checkpoint_every_steps = max(1, num_steps // 5)
  return config


def run_status(workdir: str, num_steps: int) -> str:
  """'finished' (the final step is logged with its evaluation, for every seed of a program of several), 'partial'
  (a checkpoint or metrics exist) or 'new'."""
  paths = [os.path.join(workdir, 'metrics.jsonl')]
  if not os.path.exists(paths[0]) and os.path.isdir(workdir):  # several seeds: WORKDIR/seed<s>/metrics.jsonl
    paths = [os.path.join(workdir, d, 'metrics.jsonl') for d in sorted(os.listdir(workdir)) if d.startswith('seed')]
  runs = [metrics_io.read_metrics(p) for p in paths]
  finished = lambda rows: any(r['step'] >= num_steps and ('test_error' in r or 'val_error' in r) for r in rows)
  if runs and all(finished(rows) for rows in runs):
    return 'finished'
  if any(runs) or os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return 'partial'
  return 'new'


def read_run_info(workdir: str) -> dict:
  path = os.path.join(workdir, RUN_INFO)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_run_info(workdir: str, info: dict) -> None:
  path = os.path.join(workdir, RUN_INFO)
  with open(path + '.tmp', 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(path + '.tmp', path)


def run_sweep(specs, runs_dir: str, dry_run: bool = False, log=print) -> dict:
  """Runs every spec not yet finished. Returns {workdir: 'skipped' | 'finished' | 'stopped' | 'diverged' | status
  for dry runs}. Stops at the first run that was stopped by a signal."""
  results = {}
  for spec in specs:
    workdir = spec.workdir(runs_dir)
    status = run_status(workdir, spec.config.num_steps)
    if status == 'finished':
      log(f'[skip] {workdir}: finished')
      results[workdir] = 'skipped'
      continue
    if dry_run:
      log(f'[would {"resume" if status == "partial" else "start"}] {workdir}')
      results[workdir] = status
      continue
    log(f'[{"resume" if status == "partial" else "start"}] {workdir}')
    with run_record.hold(workdir):  # one run per workdir: the trainer inside holds it through this hold
      outcome = _train(spec, workdir, log)
    results[workdir] = outcome
    if outcome == 'stopped':
      log(f'[stopped] {workdir}: checkpointed; run the same command to resume the sweep.')
      break
  return results


def _train(spec, workdir: str, log) -> str:
  """Trains one spec in its (held) workdir and keeps its books in run_info.json; returns the outcome."""
  import jax
  from resnet_jax import train  # imports jax; kept out of module import so --help and dry runs stay light
  info = read_run_info(workdir)
  info.update(experiment=spec.experiment, net=spec.net, seed=spec.seed, num_seeds=spec.config.num_seeds,
              note=spec.note, planned_steps=spec.config.num_steps)
  info.setdefault('wall_seconds', 0.0)
  info.setdefault('invocations', 0)
  t0 = time.time()
  outcome = 'error'  # what run_info says if the trainer raises anything else (the exception propagates)
  try:
    last = train.train_and_evaluate(spec.config, workdir)
    # A signal ends the run early: the trainer says so ('stopped_by_signal'), or its last step is short.
    stopped = last.get('stopped_by_signal') or last.get('step', spec.config.num_steps) < spec.config.num_steps
    outcome = 'stopped' if stopped else 'finished'
  except errors.NonFiniteLossError as e:
    log(f'[diverged] {workdir}: {e}')
    outcome = 'diverged'
  finally:
    info['wall_seconds'] += time.time() - t0
    # Read after the trainer has chosen the devices (JAX's backends start once, with the trainer's choice).
    info['device'] = f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})'
    info['invocations'] += 1
    info['last_outcome'] = outcome
    write_run_info(workdir, info)
  return outcome


def add_common_flags(parser) -> None:
  parser.add_argument('--runs_dir', default='runs', help='Where runs go: RUNS_DIR/<experiment>/<net>/seed<k>/.')
  parser.add_argument('--seeds', default='0', help='Comma-separated seeds, e.g. 0,1,2,3,4.')
  parser.add_argument('--steps', type=int, default=0,
                      help='Shorten the recipe to this many steps (lr boundaries keep their fractions). '
                           '0: the paper\'s full recipe.')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Override a config field for every run, e.g. --set data.source=folder '
                           '--set data.data_dir=data/cifar10 --set data.val_examples=5000. Repeatable.')
  parser.add_argument('--dry_run', action='store_true', help='List what would start, resume or be skipped.')


def parse_seeds(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise ConfigError(f'--seeds={text!r} must be comma-separated integers, e.g. 0,1,2.') from None
