"""Fig. 6-style panels: plain nets left, residual nets right; training error dashed, test error bold (validation
error where the run has no test split), one colour per depth, the same colour for a depth in both panels."""
import re


def _depth(net: str) -> int:
  m = re.search(r'-(\d+)', net)
  return int(m.group(1)) if m else 0


def plot_fig6(curves: dict, path: str, title: str = '') -> bool:
  """`curves` maps a net name ('plain-20', 'resnet-56', 'resnet-34-B') to its metrics rows. Returns False when
  matplotlib is not installed or there is nothing to plot."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  if not curves:
    return False
  panels = [k for k in ('plain', 'resnet') if any(n.startswith(k) for n in curves)]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  variants = sorted({n.split('-', 1)[1] for n in curves}, key=lambda v: (_depth('-' + v), v))
  color_of = {v: colors[i % len(colors)] for i, v in enumerate(variants)}
  for ax, kind in zip(axes[0], panels):
    for net in sorted((n for n in curves if n.startswith(kind)), key=lambda n: (_depth(n), n)):
      rows = curves[net]
      color = color_of[net.split('-', 1)[1]]
      train = [(r['step'], 100 * r['train_error']) for r in rows if 'train_error' in r]
      split = 'test' if any('test_error' in r for r in rows) else 'val'
      held = [(r['step'], 100 * r[f'{split}_error']) for r in rows if f'{split}_error' in r]
      if train:
        ax.plot(*zip(*train), '--', color=color, linewidth=0.9)
      if held:
        ax.plot(*zip(*held), '-', color=color, linewidth=2.0, label=f'{net} ({split})')
    ax.set_xlabel('iterations')
    ax.set_title(('plain' if kind == 'plain' else 'ResNet') + (f' — {title}' if title else ''), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title='dashed: training, bold: held-out', title_fontsize=7)
  axes[0][0].set_ylabel('error (%)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
