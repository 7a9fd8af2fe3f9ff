"""A reduced Fig. 6 on the embedded digits: plain vs residual nets at two depths, on a CPU, in minutes.

  python -m experiments.digits_degradation --runs_dir runs [--depths 20,56] [--steps 600] [--image_size 8]

The CIFAR-family nets of the paper (option A, its optimiser, BN groups and augmentation) on scikit-learn's 1,500
training and 297 test digits (configs/digits.py), at the digits' native 8x8 (the three stages run on 8/4/2 maps)
so that the 56-layer nets fit a 2-core CPU: the paper's phenomenon, at toy scale. Then the Fig. 7 analysis of the
same runs and the report: RUNS_DIR/digits_degradation/{fig6.png, fig7.png} and RUNS_DIR/report.md.
Finished runs are skipped, cut ones resumed.
"""
import argparse
import os
import sys

from experiments import fig7, report, sweep

EXPERIMENT = 'digits_degradation'


def make_specs(depths=(20, 56), seeds=(0,), steps: int = 600, image_size: int = 8, overrides=None,
               experiment: str = EXPERIMENT):
  specs = []
  for residual in (False, True):
    for depth in depths:
      for seed in seeds:
        c = sweep.load_config_file(os.path.join(sweep.CONFIG_DIR, 'digits.py'))
        c.model.depth, c.model.residual = depth, residual
        c.data.image_size = image_size
        c.data.pad = max(1, image_size // 8)  # the paper's 4 pixels of 32, scaled
        if steps and steps != c.num_steps:
          sweep.shorten(c, steps)
        sweep.apply_overrides(c, overrides or {})
        c.seed = seed
        net = f'{"resnet" if residual else "plain"}-{depth}'
        specs.append(sweep.RunSpec(experiment, net, seed, c, note=f'embedded digits at {image_size}x{image_size}'))
  return specs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sweep.add_common_flags(parser)
  parser.set_defaults(steps=600)
  parser.add_argument('--depths', default='20,56', help='Comma-separated CIFAR depths (6n+2).')
  parser.add_argument('--image_size', type=int, default=8, help='8 (native) or 16, 24, 32 (upscaled; slower).')
  parser.add_argument('--no_analysis', action='store_true', help='Train only: skip Fig. 7 and the report.')
  args = parser.parse_args(argv)
  try:
    depths = [int(d) for d in args.depths.split(',') if d]
    specs = make_specs(depths, sweep.parse_seeds(args.seeds), args.steps, args.image_size,
                       sweep.parse_overrides(args.set))
    results = sweep.run_sweep(specs, args.runs_dir, dry_run=args.dry_run)
    if 'stopped' in results.values():
      return 3
    if not args.dry_run and not args.no_analysis:
      fig7.analyse(os.path.join(args.runs_dir, EXPERIMENT), seed=sweep.parse_seeds(args.seeds)[0])
      out = os.path.join(args.runs_dir, 'report.md')
      report.render(args.runs_dir, out)
      print(f'wrote {out}')
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
