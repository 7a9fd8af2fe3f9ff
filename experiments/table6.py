"""Table 6 and Fig. 6: the CIFAR-10 sweep over configs/cifar_{20..110}.py and configs/cifar_plain_*.py.

  python -m experiments.table6 --runs_dir runs                                   # the paper: 10 nets, seed 0
  python -m experiments.table6 --runs_dir runs --nets resnet-110 --seeds 0,1,2,3,4   # one program of 5 seeds
  python -m experiments.table6 --runs_dir runs --nets resnet-1202                # only when asked
  # a reduced Fig. 6 on the CIFAR JPEG folder, 45k/5k split, 200 steps per net:
  python -m experiments.table6 --runs_dir runs --experiment cifar_reduced --steps 200 \
      --nets plain-20,plain-56,resnet-20,resnet-56 --set data.source=folder \
      --set data.data_dir=data/cifar10 --set data.val_examples=5000

Consecutive seeds of a net train together in one program (config.num_seeds; runs/table6/<net>/seeds0-4/seed<s>/),
each seed as it would train alone; the report gives best (mean ± std, n) as Table 6 does for ResNet-110.
Finished runs are skipped and unfinished ones resumed, so the same command continues a cut sweep. Afterwards:
`python -m experiments.fig7 runs/table6` and `python -m experiments.report runs`.
"""
import argparse
import os
import sys

from experiments import paper, sweep
from resnet_jax.errors import ConfigError

RESIDUAL_DEPTHS = (20, 32, 44, 56, 110)
PLAIN_DEPTHS = (20, 32, 44, 56, 110)
DEFAULT_NETS = [f'plain-{d}' for d in PLAIN_DEPTHS] + [f'resnet-{d}' for d in RESIDUAL_DEPTHS]
VALID_NETS = DEFAULT_NETS + ['resnet-1202']


def config_path(net: str, config_dir: str = sweep.CONFIG_DIR) -> str:
  if net not in VALID_NETS:
    raise ConfigError(f'Unknown CIFAR net {net!r}; valid: {", ".join(VALID_NETS)}.')
  kind, depth = net.split('-')
  return os.path.join(config_dir, f'cifar_{"plain_" if kind == "plain" else ""}{depth}.py')


def seed_groups(seeds) -> list:
  """The seeds split into runs of consecutive values, each trained as one program: [0,1,2,7] -> [[0,1,2],[7]]."""
  groups = []
  for seed in seeds:
    if groups and seed == groups[-1][-1] + 1:
      groups[-1].append(seed)
    else:
      groups.append([seed])
  return groups


def make_specs(nets, seeds, steps: int = 0, overrides: dict | None = None, experiment: str = 'table6',
               config_dir: str = sweep.CONFIG_DIR):
  """One run per net and group of consecutive seeds (config.num_seeds = the group's size)."""
  specs = []
  for net in nets:
    for group in seed_groups(seeds):
      seed = group[0]
      c = sweep.load_config_file(config_path(net, config_dir))
      if paper.net_name(c.model) != net:
        raise ConfigError(f'{config_path(net, config_dir)} builds {paper.net_name(c.model)}, not {net}.')
      if steps:
        sweep.shorten(c, steps)
      sweep.apply_overrides(c, overrides or {})
      c.seed, c.num_seeds = seed, len(group)
      specs.append(sweep.RunSpec(experiment, net, seed, c))
  return specs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sweep.add_common_flags(parser)
  parser.add_argument('--nets', default=','.join(DEFAULT_NETS),
                      help=f'Comma-separated nets (default: the 10 of Fig. 6). Valid: {", ".join(VALID_NETS)}.')
  parser.add_argument('--experiment', default='table6', help='Subfolder of RUNS_DIR for this sweep.')
  args = parser.parse_args(argv)
  try:
    nets = [n.strip() for n in args.nets.split(',') if n.strip()]
    specs = make_specs(nets, sweep.parse_seeds(args.seeds), args.steps, sweep.parse_overrides(args.set),
                       args.experiment)
    results = sweep.run_sweep(specs, args.runs_dir, dry_run=args.dry_run)
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  return 3 if 'stopped' in results.values() else 0


if __name__ == '__main__':
  sys.exit(main())
