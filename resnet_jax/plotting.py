"""Training curves like the paper's Fig. 6: training error dashed, test (or validation) error bold, vs iterations.
A run of several seeds draws the mean over its seeds with a band of +- one standard deviation."""
import numpy as np


def mean_and_std(runs: list, key: str):
  """(steps, mean, std) of `key` in % at the steps every seed logged."""
  series = [{r['step']: 100 * r[key] for r in rows if key in r} for rows in runs]
  steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
  values = np.asarray([[s[step] for step in steps] for s in series])
  return steps, values.mean(0) if steps else [], values.std(0) if steps else []


def plot_curves(runs: dict, path: str, title: str = '') -> bool:
  """`runs` maps a label to a list of metrics rows, or to a list of such lists (one per seed): then the mean over
  the seeds is drawn with a +- one-std band. Returns False when matplotlib is not installed."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, rows) in enumerate(runs.items()):
    color = colors[i % len(colors)]
    seeds = rows if rows and isinstance(rows[0], list) else [rows]
    for key, style, width, suffix in (('train_error', '--', 1.0, 'train'), ('val_error', '-', 2.0, 'val'),
                                      ('test_error', '-', 2.0, 'test')):
      steps, mean, std = mean_and_std(seeds, key)
      if not steps:
        continue
      name = f'{label} {suffix}' + (f' (mean of {len(seeds)} seeds, ±1 std)' if len(seeds) > 1 else '')
      ax.plot(steps, mean, style, color=color, linewidth=width, label=name,
              marker='o' if len(steps) == 1 else None)  # a single log point is no line
      if len(seeds) > 1:
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
  ax.set_xlabel('iterations')
  ax.set_ylabel('error (%)')
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
