"""Turns finished (and unfinished) runs into a Markdown report next to the paper's numbers.

  python -m experiments.report RUNS_DIR [--out RUNS_DIR/report.md]

Reads every run under RUNS_DIR: a directory with config.json and metrics.jsonl (and run_info.json when a sweep made
it). RUNS_DIR may be one `python -m resnet_jax.main --workdir=DIR` workdir, a folder of such workdirs, or a sweep's
RUNS_DIR/<experiment>/<net>/seed<k>/ layout. A run of several seeds in one program (config.num_seeds > 1) keeps each
seed's config.json and metrics.jsonl in WORKDIR/seed<s>/, so each seed is read as a run of its own. Runs are grouped by experiment (the first folder below RUNS_DIR in a
sweep, else RUNS_DIR itself), then by net and seed as each run's config.json names them. Per experiment and net:
our final error (best, and mean +- std and n over the seeds that finished, as Table 6 gives ResNet-110), the split and testing protocol it was measured with, the
paper's number with its table and protocol, the difference, steps run, wall time; runs cut short (fewer steps than
they planned) are listed on their own rows, labelled, and never averaged with finished ones; shortened recipes are
labelled as such. Writes fig6.png per
experiment (Fig. 6 style) and embeds it, and embeds fig7.png where `experiments.fig7` has written one.
"""
import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys

import ml_collections

from experiments import paper, plots, sweep
from resnet_jax import metrics_io, run_record
from resnet_jax.errors import MissingFileError


@dataclasses.dataclass
class Run:
  experiment: str
  experiment_dir: str       # where the experiment's fig6.png goes (and experiments.fig7 writes fig7.png)
  net: str
  seed: int
  workdir: str
  dataset: str
  family: str
  planned_steps: int
  steps_run: int
  error: float | None       # final held-out error (%), None when no evaluation was logged
  train_error: float | None  # training error (%) of the last logged window
  split: str                # 'test' or 'val'
  protocol: str             # how `error` was measured: paper.SINGLE_VIEW, CENTRE_CROP or TEN_CROP
  wall_seconds: float | None
  note: str
  device: str
  rows: list
  trainer: str = 'resnet_jax'  # which code trained it: 'resnet_jax', or 'pytorch' (benchmarks/pytorch_cifar.py)
  examples: dict = dataclasses.field(default_factory=dict)  # {'train': N, 'val': n, 'test': m} as the run recorded

  @property
  def label(self) -> str:
    """The net, and the trainer where it is not ours: 'resnet-20', 'resnet-20 (pytorch)'."""
    return self.net if self.trainer == 'resnet_jax' else f'{self.net} ({self.trainer})'

  @property
  def best(self):
    """(lowest held-out error %, its step) over the run's evaluations: chosen on the held-out split itself, so it
    flatters the run; the final error is the honest number."""
    evals = [(100 * r[f'{self.split}_error'], r['step']) for r in self.rows if f'{self.split}_error' in r]
    return min(evals) if evals else (None, None)

  @property
  def finished(self) -> bool:
    return self.error is not None and self.steps_run >= self.planned_steps

  @property
  def recipe(self) -> str:
    full = paper.RECIPE_STEPS.get(self.dataset)
    if full is None:
      return f'{self.planned_steps} steps (no paper recipe for {self.dataset})'
    if self.planned_steps < full:
      return f'reduced recipe: {self.planned_steps} of the paper\'s {full} steps'
    return 'full recipe'


def load_run(experiment: str, experiment_dir: str, workdir: str) -> Run:
  """The run in `workdir`; its net and seed come from its config.json."""
  config = run_record.read_config(workdir)
  examples = {}
  data_record = os.path.join(workdir, run_record.DATA_FILE)
  if os.path.exists(data_record):
    with open(data_record) as f:
      examples = {k[:-len('_examples')]: v for k, v in json.load(f).items() if k.endswith('_examples')}
  rows = metrics_io.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  info = sweep.read_run_info(workdir)
  program = os.path.dirname(os.path.abspath(workdir))
  if not info and os.path.exists(os.path.join(program, 'config.json')):
    info = sweep.read_run_info(program)  # one seed of a program of several (WORKDIR/seed<s>/): the program's books
  evals = [r for r in rows if 'test_error' in r or 'val_error' in r]
  last_eval = evals[-1] if evals else None
  split = 'test' if last_eval and 'test_error' in last_eval else 'val'
  trains = [r for r in rows if 'train_error' in r]
  steps_run = max((r['step'] for r in rows), default=0)
  error = 100 * last_eval[f'{split}_error'] if last_eval else None
  # The trainer evaluates ImageNet (streamed) runs on the centre crop and the in-memory sets on the single original
  # view; `python -m resnet_jax.evaluate --protocol=10crop` at the final step gives the paper's ImageNet protocol.
  protocol = paper.CENTRE_CROP if config['data'].get('streaming') else paper.SINGLE_VIEW
  ten_crop = os.path.join(workdir, f'eval_10crop_step{steps_run}.json')
  if os.path.exists(ten_crop):
    with open(ten_crop) as f:
      error, split, protocol = 100 * json.load(f)['top1_error'], 'val', paper.TEN_CROP
  return Run(experiment=experiment, experiment_dir=experiment_dir,
             net=paper.net_name(ml_collections.ConfigDict(config['model'])), seed=int(config['seed']),
             workdir=workdir, dataset=config['data']['dataset'],
             family=config['model']['family'], planned_steps=int(config['num_steps']),
             steps_run=steps_run, error=error,
             train_error=100 * trains[-1]['train_error'] if trains else None, split=split, protocol=protocol,
             wall_seconds=info.get('wall_seconds'), note=info.get('note', ''), device=info.get('device', ''),
             rows=rows, trainer=config.get('trainer', 'resnet_jax'), examples=examples)


RUN_FILES = (run_record.CONFIG_FILE, 'metrics.jsonl')


def find_runs(runs_dir: str) -> list:
  """Every directory under runs_dir (runs_dir itself included) that holds a run's config.json and metrics.jsonl."""
  found = []
  for root, dirs, files in os.walk(runs_dir):
    if all(f in files for f in RUN_FILES):
      found.append(root)
      dirs[:] = []  # a run's own folders (checkpoints, ...) hold no further runs
    else:
      dirs.sort()
  return sorted(found)


def collect(runs_dir: str) -> dict:
  """experiment -> net -> [Run, ...] for every run under runs_dir. A run two or more levels down (a sweep's
  <experiment>/<net>/seed<k>) belongs to the experiment of its first folder; runs_dir itself, or a workdir
  directly in it, to the experiment named after runs_dir."""
  if not os.path.isdir(runs_dir):
    raise MissingFileError(f'No runs folder {runs_dir!r}; run an experiment first, e.g. '
                           'python -m experiments.digits_degradation --runs_dir runs.')
  out = {}
  for workdir in find_runs(runs_dir):
    parts = os.path.relpath(workdir, runs_dir).split(os.sep)
    if len(parts) >= 2:
      experiment, experiment_dir = parts[0], os.path.join(runs_dir, parts[0])
    else:
      experiment, experiment_dir = os.path.basename(os.path.abspath(runs_dir)), runs_dir
    run = load_run(experiment, experiment_dir, workdir)
    out.setdefault(experiment, {}).setdefault(run.label, []).append(run)
  for nets in out.values():
    for runs in nets.values():
      runs.sort(key=lambda r: (r.seed, r.workdir))
  return out


def _fmt_wall(seconds) -> str:
  if seconds is None:
    return 'n/a'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


def _mean_std(values) -> str:
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _best_mean_std(values) -> str:
  """As Table 6 gives ResNet-110: the best error, then (mean ± std, n) over the seeds."""
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{min(values):.2f} ({_mean_std(values)}, n={len(values)})'


def _row(net: str, runs: list, status: str) -> str:
  errors = [r.error for r in runs if r.error is not None]
  trains = [r.train_error for r in runs if r.train_error is not None]
  first = runs[0]
  protocols = sorted({r.protocol for r in runs})
  ours = f'{_best_mean_std(errors)} ({", ".join(protocols)})' if errors else 'no evaluation yet'
  ref = paper.paper_reference(first.dataset, first.family, first.net)
  if ref is not None:
    value, table, protocol = ref
    ref_s = f'{value:.2f} ({table}, {protocol})'
    diff = f'{statistics.mean(errors) - value:+.2f}' if errors and status.startswith('finished') else '—'
    caveats = []
    if diff != '—' and protocols != [protocol]:
      caveats.append(f'{", ".join(protocols)} vs {protocol}')
    if diff != '—' and first.split != 'test' and first.family != 'imagenet':  # ImageNet's numbers are on val
      caveats.append('val vs test')
    if caveats:
      diff += f' ({"; ".join(caveats)})'
  else:
    ref_s, diff = '—', '—'
  steps = sorted({r.steps_run for r in runs})
  steps_s = '/'.join(str(s) for s in steps) + f' of {first.planned_steps}'
  walls = [r.wall_seconds for r in runs if r.wall_seconds is not None]
  wall_s = _fmt_wall(statistics.mean(walls)) if walls else 'n/a'
  seeds = ','.join(str(r.seed) for r in runs)
  notes = [status] + sorted({r.recipe for r in runs if r.recipe != 'full recipe'}) + sorted(
      {r.note for r in runs if r.note})
  return (f'| {net} | {seeds} | {ours} | {_mean_std(trains) if trains else "—"} | {first.split} | '
          f'{_examples(runs)} | {ref_s} | {diff} | {steps_s} | {wall_s} | {"; ".join(notes)} |')


def _examples(runs) -> str:
  """'45000 / 5000': training and held-out examples as the runs recorded them; '?' where a run did not record
  them; several values when runs of one row differ (they should not be compared then)."""
  show = lambda r, k: str(r.examples[k]) if k in r.examples else '?'
  return ', '.join(sorted({f'{show(r, "train")} / {show(r, r.split)}' for r in runs}))


def _seed_rows(label: str, runs: list) -> list:
  """One line per seed: final and best held-out error, the training error, the counts, steps and wall time."""
  lines = []
  for r in runs:
    best, at = r.best
    lines.append(f'| {label} | {r.seed} | {_pct(r.error)} | {_pct(best)}' + (f' (step {at})' if at else '')
                 + f' | {_pct(r.train_error)} | {r.split} | {_examples([r])} | {r.steps_run} of {r.planned_steps} | '
                 f'{_fmt_wall(r.wall_seconds)} |')
  return lines


def _pct(value) -> str:
  return '—' if value is None else f'{value:.2f}'


def _reference_notes(nets, runs) -> list:
  families = {r.family for r in runs}
  datasets = {r.dataset for r in runs}
  lines = []
  if 'cifar' in families:
    lines += [f'- {n}: {paper.TABLE6_NOTES[n]}.' for n in nets if n in paper.TABLE6_NOTES]
    if any(n.startswith('plain') for n in nets):
      lines.append(f'- plain nets: {paper.FIG6_PLAIN_NOTE}.')
  if 'imagenet' in families and datasets != {'imagenet2012'}:
    refs = []
    for table, numbers in (('Table 2', paper.TABLE2_TOP1_ERROR), ('Table 3', paper.TABLE3_TOP1_ERROR)):
      listed = ', '.join(f'{n} {e:.2f}' for n, e in numbers.items() if n in nets)
      if listed:
        refs.append(f'{table} top-1 errors on ImageNet ({paper.TEN_CROP}): {listed}')
    lines.append(f'- Not ImageNet ({", ".join(sorted(datasets))}): not comparable with the paper.'
                 + (f' For reference only, {"; ".join(refs)}.' if refs else ''))
  if 'imagenet' in families and any(r.protocol != paper.TEN_CROP for r in runs):
    lines.append(f'- Our ImageNet errors are {paper.CENTRE_CROP} (the training run\'s evaluation) unless labelled '
                 f'{paper.TEN_CROP}; `python -m resnet_jax.evaluate --protocol=10crop` at the final step gives the '
                 'paper\'s protocol, which the report then uses.')
  return lines


def render(runs_dir: str, out_path: str, plot: bool = True) -> str:
  experiments = collect(runs_dir)
  out_dir = os.path.dirname(os.path.abspath(out_path))
  lines = [f'# Results under `{runs_dir}`', '',
           f'Generated {datetime.date.today().isoformat()} by `python -m experiments.report {runs_dir}`. '
           'Errors in %, at the last step each run logged (never the best checkpoint), each labelled with its testing '
           'protocol (single view, centre crop or 10-crop). "train" is the training '
           'error of the last logged window (augmented batches). "held-out" is the test split where the data has '
           'one, else the validation hold-out (then compared with the paper\'s test error only as a rough guide). '
           'Seeds that did not finish are listed on their own rows and never averaged with finished ones.', '']
  if not experiments:
    lines.append('No runs found: a run is a directory with config.json and metrics.jsonl, as '
                 '`python -m resnet_jax.main --workdir=DIR` and the experiment sweeps write.')
  for experiment, nets in experiments.items():
    all_runs = [r for rs in nets.values() for r in rs]
    exp_dir = all_runs[0].experiment_dir
    devices = sorted({r.device for r in all_runs if r.device})
    lines += [f'## {experiment}', '',
              f'Dataset: {", ".join(sorted({r.dataset for r in all_runs}))}; recipe: '
              f'{"; ".join(sorted({r.recipe for r in all_runs}))}; hardware: {", ".join(devices) or "not recorded"}.',
              '',
              '| net | seeds | held-out error: best (mean ± std, n) | train error | split | examples: train / held-out '
              '| paper | ours − paper | steps | wall time (per run) | status |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for net in sorted(nets, key=plots_order):
      runs = nets[net]
      done = [r for r in runs if r.finished]
      cut = [r for r in runs if not r.finished]
      if done:
        lines.append(_row(net, done, 'finished' if len(done) > 1 else 'finished (1 seed)'))
      if cut:
        lines.append(_row(net, cut, 'CUT SHORT: ' + ', '.join(
            f'seed {r.seed} stopped at step {r.steps_run} of {r.planned_steps}' for r in cut)))
    lines += ['', 'Per seed (final: the last evaluation; best: the lowest evaluation of the run, chosen on the held-out '
              'split itself, so it flatters):', '',
              '| net | seed | final error | best error | train error | split | examples: train / held-out | steps | '
              'wall time |', '|---|---|---|---|---|---|---|---|---|']
    for net in sorted(nets, key=plots_order):
      lines += _seed_rows(net, nets[net])
    lines.append('')
    lines += _reference_notes(sorted({r.net for r in all_runs}, key=plots_order), all_runs)
    if plot:
      curves = {net: [r.rows for r in rs if r.rows] for net, rs in nets.items()}  # every seed
      fig6 = os.path.join(exp_dir, 'fig6.png')
      if plots.plot_fig6(curves, fig6, experiment):
        lines += ['', f'![Fig. 6 style curves of {experiment}]({os.path.relpath(fig6, out_dir)})']
    fig7 = os.path.join(exp_dir, 'fig7.png')
    if os.path.exists(fig7):
      lines += ['', f'![Fig. 7 style layer responses of {experiment}]({os.path.relpath(fig7, out_dir)})']
    lines.append('')
  text = '\n'.join(lines) + '\n'
  with open(out_path, 'w') as f:
    f.write(text)
  return text


def plots_order(net: str):
  kind, _, rest = net.partition('-')
  digits = ''.join(ch for ch in rest.split('-')[0] if ch.isdigit())
  return (kind, int(digits) if digits else 0, rest)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('runs_dir')
  parser.add_argument('--out', default='', help='Markdown file to write (default: RUNS_DIR/report.md).')
  parser.add_argument('--no_plots', action='store_true')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.runs_dir, 'report.md')
  try:
    render(args.runs_dir, out, plot=not args.no_plots)
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
