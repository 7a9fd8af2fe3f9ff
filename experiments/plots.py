"""Fig. 6-style panels: plain nets left, residual nets right; training error dashed, test error solid (validation
error where the run has no test split), one colour per depth, the same colour for a depth in both panels. Where a
net has several seeds, each seed is a thin line and the mean over the seeds a bold one."""
import re


def _depth(net: str) -> int:
  m = re.search(r'-(\d+)', net)
  return int(m.group(1)) if m else 0


def _series(rows, key):
  return {r['step']: 100 * r[key] for r in rows if key in r}


def _mean_over_seeds(series: list) -> list:
  """(step, mean) at the steps every seed logged."""
  steps = sorted(set.intersection(*(set(s) for s in series)))
  return [(step, sum(s[step] for s in series) / len(series)) for step in steps]


def _per_seed(curves: dict) -> dict:
  """net -> [rows of seed, ...], dropping empty runs and nets."""
  out = {}
  for net, runs in curves.items():
    runs = [runs] if runs and isinstance(runs[0], dict) else [rows for rows in runs if rows]
    if runs:
      out[net] = runs
  return out


def draw_fig6(curves: dict, title: str = ''):
  """The figure (matplotlib) of `curves`: net name ('plain-20', 'resnet-56', 'resnet-34-B') -> the metrics rows of
  one run, or a list of such row lists, one per seed."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  curves = _per_seed(curves)
  panels = [k for k in ('plain', 'resnet') if any(n.startswith(k) for n in curves)]
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False,
                           sharey=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  variants = sorted({n.split('-', 1)[1] for n in curves}, key=lambda v: (_depth('-' + v), v))
  color_of = {v: colors[i % len(colors)] for i, v in enumerate(variants)}
  for ax, kind in zip(axes[0], panels):
    for net in sorted((n for n in curves if n.startswith(kind)), key=lambda n: (_depth(n), n)):
      runs = curves[net]
      color = color_of[net.split('-', 1)[1]]
      split = 'test' if any('test_error' in r for rows in runs for r in rows) else 'val'
      several = len(runs) > 1
      for key, style in (('train_error', '--'), (f'{split}_error', '-')):
        series = [s for s in (_series(rows, key) for rows in runs) if s]
        if not series:
          continue
        held = key != 'train_error'
        if several:
          for s in series:
            ax.plot(*zip(*sorted(s.items())), style, color=color, linewidth=0.6, alpha=0.45)
          points = _mean_over_seeds(series)
        else:
          points = sorted(series[0].items())
        if points:
          label = f'{net} ({split}' + (f', mean of {len(series)} seeds)' if several else ')') if held else None
          ax.plot(*zip(*points), style, color=color, linewidth=(2.0 if held else 0.9) + (0.6 if several else 0),
                  label=label)
    ax.set_xlabel('iterations')
    ax.set_title(('plain' if kind == 'plain' else 'ResNet') + (f' — {title}' if title else ''), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title='dashed: training, solid: held-out' + ('; thin: each seed' if any(
        len(curves[n]) > 1 for n in curves if n.startswith(kind)) else ''), title_fontsize=7)
  axes[0][0].set_ylabel('error (%)')
  fig.tight_layout()
  return fig


def plot_fig6(curves: dict, path: str, title: str = '') -> bool:
  """Writes `draw_fig6(curves, title)` to `path`. Returns False when matplotlib is not installed or there is
  nothing to plot."""
  try:
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  if not _per_seed(curves):
    return False
  fig = draw_fig6(curves, title)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
