"""Fig. 7: the standard deviation of every 3x3 layer's response, after BN and before the ReLU or the addition.

  python -m experiments.fig7 runs/table6 [--nets plain-20,plain-56,resnet-20,resnet-56,resnet-110] [--seed 0] \
      [--set data.data_dir=DIR]

For each finished (or checkpointed) run of the experiment folder, reads the run's own config.json (`--set` changes
only the fields it names, e.g. where the data now lives), restores the last checkpoint and runs the test
split (the validation split where the dataset has no test split) through the network in evaluation mode, with the
`intermediates` collection mutable, so `models.py` sows every 3x3 conv's BN output as `bn_3x3`, the first layer's
included (scanned stages too). The images go through the evaluation core of resnet_jax.evaluate. Writes fig7.json
(the stds per net, in layer order) and fig7.png (top: layers in network order; bottom: sorted by magnitude) into
the experiment folder.

The std of a layer: for each channel, the standard deviation over all images and positions; then the mean over
the layer's channels. (The paper does not spell out how it pools channels; per-channel std keeps the per-channel
BN shift beta out of the number.)
"""
import argparse
import json
import os
import re
import sys

import numpy as np

from experiments import sweep
from resnet_jax.errors import DataError, MissingFileError

FIG7_JSON, FIG7_PNG = 'fig7.json', 'fig7.png'


def layer_order(intermediates) -> list:
  """The sown `bn_3x3` arrays in network order: the first layer, then stage, block, position within the block.
  Scanned stages (`scan_blocks`) sow one array per position with a leading block axis: it is split into blocks."""
  found = []
  for i, y in enumerate(intermediates.get('bn_3x3', ())):  # the first layer (CIFAR's 3x3 stem)
    found.append(((0, 0, i), y))
  for name, sub in intermediates.items():
    m = re.fullmatch(r'stage(\d+)_block(\d+)', name)
    if m and 'bn_3x3' in sub:
      for i, y in enumerate(sub['bn_3x3']):
        found.append(((int(m.group(1)), int(m.group(2)), i), y))
    m = re.fullmatch(r'stage(\d+)_blocks(\d+)to(\d+)', name)
    if m and 'bn_3x3' in sub.get('block', {}):
      for i, y in enumerate(sub['block']['bn_3x3']):
        for j in range(y.shape[0]):
          found.append(((int(m.group(1)), int(m.group(2)) + j, i), y[j]))
  return [y for _, y in sorted(found, key=lambda t: t[0])]


def make_moments_fn(model):
  """fn(variables, batch) -> per-layer (sum, sum of squares, count) per channel of the bn_3x3 responses of the
  batch's real examples (evaluation mode), for evaluate.sum_batches."""
  import jax.numpy as jnp

  def moments(variables, batch):
    _, state = model.apply(variables, batch['images'], train=False, mutable=['intermediates'])
    out = []
    mask = batch['mask']
    m = mask[:, None, None, None]
    for y in layer_order(state['intermediates']):
      y = y.astype(jnp.float32)
      n = jnp.sum(mask) * y.shape[1] * y.shape[2]
      out.append((jnp.sum(y * m, axis=(0, 1, 2)), jnp.sum(y * y * m, axis=(0, 1, 2)), n))
    return out

  return moments


_MOMENTS_FNS = {}


def layer_stds(model, variables, batches) -> np.ndarray:
  """The std of each 3x3 layer's response (per-channel std over images and positions, averaged over channels),
  in network order, over an input's evaluation batches (every image once, padding masked)."""
  from resnet_jax import evaluate
  key = id(model)
  if key not in _MOMENTS_FNS:  # one function per model, so the evaluation core compiles it once
    _MOMENTS_FNS[key] = (model, make_moments_fn(model))
  totals = evaluate.sum_batches(_MOMENTS_FNS[key][1], variables, batches)
  stds = []
  for s, ss, n in totals:
    var = np.maximum(ss / n - (s / n) ** 2, 0.0)
    stds.append(float(np.mean(np.sqrt(var))))
  return np.asarray(stds)


def run_stds(workdir: str, data_cache: dict | None = None, overrides: dict | None = None) -> dict:
  """Restores the latest checkpoint of a trainer workdir and measures its layer stds on the test split (the
  validation split where there is no test split)."""
  from resnet_jax import checkpoint, errors, evaluate, input_pipeline, mesh as mesh_lib, run_record

  config = sweep.apply_overrides(run_record.load_config(workdir), overrides or {})
  mesh = mesh_lib.make_mesh()
  key = json.dumps(config.data.to_dict(), sort_keys=True)
  cache = data_cache if data_cache is not None else {}
  if key not in cache:
    cache[key] = input_pipeline.create(config, mesh)
  inp = cache[key]
  splits = inp.eval_splits()
  if not splits:
    raise DataError('The dataset has neither a test split nor a validation hold-out; set config.data.val_examples.')
  split = 'test' if 'test' in splits else splits[0]
  try:
    model, state, step = checkpoint.restore_from_workdir(config, workdir, mesh)
  except errors.CheckpointNotFoundError as e:
    raise MissingFileError(f'{e} Train the run first.') from e
  stds = layer_stds(model, evaluate.local_variables(state), inp.eval_batches(split))
  return {'stds': stds.tolist(), 'split': split, 'step': int(step), 'depth': config.model.depth,
          'residual': bool(config.model.residual)}


def plot_fig7(results: dict, path: str, title: str = '') -> bool:
  """results: net -> {'stds': [...]}; top panel in layer order, bottom sorted by magnitude (as the paper)."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(2, 1, figsize=(6, 6))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (net, r) in enumerate(results.items()):
    stds = np.asarray(r['stds'])
    style = '-' if net.startswith('resnet') else '--'
    for ax, ys in ((axes[0], stds), (axes[1], np.sort(stds)[::-1])):
      ax.plot(np.arange(1, len(ys) + 1), ys, style, color=colors[i % len(colors)], linewidth=1.2, label=net)
  axes[0].set_xlabel('layer index (original)')
  axes[1].set_xlabel('layer index (sorted by magnitude)')
  for ax in axes:
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    axes[0].set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def find_runs(experiment_dir: str, nets=None, seed: int = 0) -> dict:
  """net -> workdir of the given seed, for every net folder with a config.json, in a stable order."""
  out = {}
  if not os.path.isdir(experiment_dir):
    raise MissingFileError(f'No experiment folder {experiment_dir!r}; run e.g. python -m experiments.table6 first.')
  for net in sorted(os.listdir(experiment_dir), key=_net_sort_key):
    workdir = os.path.join(experiment_dir, net, f'seed{seed}')
    if os.path.exists(os.path.join(workdir, 'config.json')) and (not nets or net in nets):
      out[net] = workdir
  if nets:
    missing = sorted(set(nets) - set(out))
    if missing:
      raise MissingFileError(f'No run of {", ".join(missing)} (seed {seed}) under {experiment_dir}; found: '
                             f'{", ".join(out) or "none"}.')
  return out


def _net_sort_key(net: str):
  """plain before resnet, then by depth: plain-20, plain-56, resnet-20, resnet-56, resnet-110."""
  kind, _, rest = net.partition('-')
  depth = re.match(r'\d+', rest)
  return (kind, int(depth.group()) if depth else 0, rest)


def analyse(experiment_dir: str, nets=None, seed: int = 0, log=print, overrides: dict | None = None) -> dict:
  runs = find_runs(experiment_dir, nets, seed)
  if not runs:
    raise MissingFileError(f'No runs (net/seed{seed}/config.json) under {experiment_dir}.')
  cache, results = {}, {}
  for net, workdir in runs.items():
    results[net] = run_stds(workdir, cache, overrides)
    log(f'{net}: {len(results[net]["stds"])} layers, mean std {np.mean(results[net]["stds"]):.3f} '
        f'({results[net]["split"]} split, step {results[net]["step"]})')
  with open(os.path.join(experiment_dir, FIG7_JSON), 'w') as f:
    json.dump(results, f, indent=1)
  plot_fig7(results, os.path.join(experiment_dir, FIG7_PNG),
            f'std of 3x3 responses ({os.path.basename(os.path.normpath(experiment_dir))})')
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('experiment_dir', help='An experiment folder, e.g. runs/table6.')
  parser.add_argument('--nets', default='', help='Comma-separated nets (default: every net with a run).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='Change a field of each run\'s recorded config, e.g. --set data.data_dir=DIR where the '
                           'data has moved. Repeatable.')
  args = parser.parse_args(argv)
  nets = [n for n in args.nets.split(',') if n]
  try:
    analyse(args.experiment_dir, nets, args.seed, overrides=sweep.parse_overrides(args.set))
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  print(f'wrote {os.path.join(args.experiment_dir, FIG7_PNG)} and {FIG7_JSON}')


if __name__ == '__main__':
  main()
