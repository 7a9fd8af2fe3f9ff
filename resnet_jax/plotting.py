"""Training curves like the paper's Fig. 6: training error dashed, test (or validation) error bold, vs iterations."""


def plot_curves(runs: dict, path: str, title: str = '') -> bool:
  """`runs` maps a label to a list of metrics rows. Returns False when matplotlib is not installed."""
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
    for key, style, width, suffix in (('train_error', '--', 1.0, 'train'), ('val_error', '-', 2.0, 'val'),
                                      ('test_error', '-', 2.0, 'test')):
      pts = [(r['step'], 100 * r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), style, color=color, linewidth=width, label=f'{label} {suffix}')
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
