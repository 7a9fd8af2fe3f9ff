"""Fig. 7: the standard deviation of every 3x3 layer's response, after BN and before the ReLU or the addition.

  python -m experiments.fig7 runs/table6 [--nets plain-20,plain-56,resnet-20,resnet-56,resnet-110] [--seed 0]

For each finished (or checkpointed) run of the experiment folder, restores the last checkpoint and runs the test
split (the validation split where the dataset has no test split) through the network in evaluation mode, with the
`intermediates` collection mutable, so `models.py` sows every 3x3 conv's BN output as `bn_3x3`. Writes fig7.json
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

FIG7_JSON, FIG7_PNG = 'fig7.json', 'fig7.png'


def _layer_order(intermediates) -> list:
  """The sown `bn_3x3` arrays in network order: stage, then block, then position within the block."""
  found = []
  for block_name, sub in intermediates.items():
    m = re.fullmatch(r'stage(\d+)_block(\d+)', block_name)
    if m and 'bn_3x3' in sub:
      for i, y in enumerate(sub['bn_3x3']):
        found.append(((int(m.group(1)), int(m.group(2)), i), y))
  return [y for _, y in sorted(found, key=lambda t: t[0])]


def make_moments_fn(model):
  """A jitted fn(variables, x) -> per-layer (sum, sum of squares, count) per channel of the bn_3x3 responses."""
  import jax
  import jax.numpy as jnp

  def moments(variables, x, mask):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    out = []
    m = mask[:, None, None, None]
    for y in _layer_order(state['intermediates']):
      y = y.astype(jnp.float32)
      n = jnp.sum(mask) * y.shape[1] * y.shape[2]
      out.append((jnp.sum(y * m, axis=(0, 1, 2)), jnp.sum(y * y * m, axis=(0, 1, 2)), n))
    return out

  return jax.jit(moments)


def layer_stds(model, variables, images: np.ndarray, mean: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """The std of each 3x3 layer's response (per-channel std over images and positions, averaged over channels),
  in network order, for uint8 `images` with the training split's per-pixel `mean` subtracted."""
  fn = make_moments_fn(model)
  totals = None
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(chunk) < batch_size:  # pad the last batch to the same shape (one compilation) and mask the padding
      mask[len(chunk):] = 0
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
    x = chunk.astype(np.float32) - mean
    parts = [tuple(np.asarray(a, np.float64) for a in layer) for layer in fn(variables, x, mask)]
    totals = parts if totals is None else [tuple(a + b for a, b in zip(t, p)) for t, p in zip(totals, parts)]
  stds = []
  for s, ss, n in totals:
    var = np.maximum(ss / n - (s / n) ** 2, 0.0)
    stds.append(float(np.mean(np.sqrt(var))))
  return np.asarray(stds)


def _eval_split(ds):
  if ds.test_images is not None:
    return ds.test_images, 'test'
  if ds.val_images is not None:
    return ds.val_images, 'val'
  raise ValueError('The dataset has neither a test split nor a validation hold-out; set config.data.val_examples.')


def run_stds(workdir: str, data_cache: dict | None = None) -> dict:
  """Restores the latest checkpoint of a trainer workdir and measures its layer stds."""
  from ml_collections import ConfigDict
  from resnet_jax import augment, checkpoint, data, models, train

  with open(os.path.join(workdir, 'config.json')) as f:
    config = ConfigDict(json.load(f))
  config.lr_boundaries = tuple(config.lr_boundaries)
  key = json.dumps(config.data.to_dict(), sort_keys=True)
  cache = data_cache if data_cache is not None else {}
  if key not in cache:
    cache[key] = data.load(config.data)
  ds = cache[key]
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise ValueError(f'No checkpoint in {workdir}/checkpoints: train the run first.')
  template = train.init_state(config, model, ds.train_images.shape[1:], ds.num_classes)
  state = ckpt.restore(template)
  ckpt.close()
  images, split = _eval_split(ds)
  stds = layer_stds(model, {'params': state.params, 'batch_stats': state.batch_stats}, images,
                    augment.pixel_mean(ds.train_images), config.eval_batch_size)
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
    raise FileNotFoundError(f'No experiment folder {experiment_dir!r}; run e.g. python -m experiments.table6 first.')
  for net in sorted(os.listdir(experiment_dir), key=_net_sort_key):
    workdir = os.path.join(experiment_dir, net, f'seed{seed}')
    if os.path.exists(os.path.join(workdir, 'config.json')) and (not nets or net in nets):
      out[net] = workdir
  if nets:
    missing = sorted(set(nets) - set(out))
    if missing:
      raise FileNotFoundError(f'No run of {", ".join(missing)} (seed {seed}) under {experiment_dir}; found: '
                              f'{", ".join(out) or "none"}.')
  return out


def _net_sort_key(net: str):
  """plain before resnet, then by depth: plain-20, plain-56, resnet-20, resnet-56, resnet-110."""
  kind, _, rest = net.partition('-')
  depth = re.match(r'\d+', rest)
  return (kind, int(depth.group()) if depth else 0, rest)


def analyse(experiment_dir: str, nets=None, seed: int = 0, log=print) -> dict:
  runs = find_runs(experiment_dir, nets, seed)
  if not runs:
    raise FileNotFoundError(f'No runs (net/seed{seed}/config.json) under {experiment_dir}.')
  cache, results = {}, {}
  for net, workdir in runs.items():
    results[net] = run_stds(workdir, cache)
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
  args = parser.parse_args(argv)
  nets = [n for n in args.nets.split(',') if n]
  try:
    analyse(args.experiment_dir, nets, args.seed)
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  print(f'wrote {os.path.join(args.experiment_dir, FIG7_PNG)} and {FIG7_JSON}')


if __name__ == '__main__':
  main()
