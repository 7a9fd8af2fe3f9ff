"""Table 3: ImageNet shortcut options. plain-34, ResNet-34 with options A, B and C, and ResNet-50 (option B).

  # On ImageNet (an image folder or tfds ArrayRecord, docs/imagenet.md):
  python -m experiments.table3 --runs_dir runs [--set data.data_dir=/path/to/imagenet] [--steps N]
  # Without ImageNet: the same five nets on a small image folder DIR/train/<class>/*.jpg (DIR/test/ optional),
  # at a small resolution and a shortened recipe; the report says it is not ImageNet and compares nothing:
  python -m experiments.table3 --runs_dir runs --subset_dir DIR [--image_size 64] [--steps 1000]

Each net is a configs/imagenet_*.py (the paper's Sec. 3.4 recipe) with the shortcut option overridden where
Table 3 varies it; every run goes through resnet_jax.train.train_and_evaluate, so it resumes where it stopped.
The paper's Table 3 errors are 10-crop. A training run evaluates the centre crop, and the report labels that number
'centre crop' beside the paper's '10-crop'; for the paper's protocol, evaluate the finished run's workdir with
`python -m resnet_jax.evaluate --workdir=RUN --protocol=10crop`, and the report uses that error instead
(labelled '10-crop'). The subset runs compare nothing with the paper: they show the five nets train, at toy scale.
"""
import argparse
import os
import sys

from experiments import sweep
from resnet_jax.errors import ConfigError, MissingFileError

# net -> (config file, overrides): Table 3's rows.
NETS = {
    'plain-34': ('imagenet_plain_34.py', {}),
    'resnet-34-A': ('imagenet_34.py', {'model.shortcut': 'A'}),
    'resnet-34-B': ('imagenet_34.py', {'model.shortcut': 'B'}),
    'resnet-34-C': ('imagenet_34.py', {'model.shortcut': 'C'}),
    'resnet-50': ('imagenet_50.py', {}),
}
SUBSET_DATASET = 'imagenet-folder-subset'  # not 'imagenet2012': the report then compares nothing with the paper


def subset_overrides(subset_dir: str, image_size: int) -> dict:
  """Config fields for a small image folder instead of ImageNet: classes counted from the folder, a validation
  hold-out of 10% when there is no test split, batch 64 with BN over groups of 32 (the paper's group size)."""
  train_dir = os.path.join(subset_dir, 'train')
  if not os.path.isdir(train_dir):
    raise MissingFileError(f'--subset_dir needs {train_dir}/<class>/*.jpg (and optionally {subset_dir}/test/); '
                           f'e.g. a few ImageNet classes, or the CIFAR-10 JPEG folder.')
  classes = [c for c in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, c))]
  if len(classes) < 2:
    raise MissingFileError(f'{train_dir} has {len(classes)} class folders; Table 3 needs at least 2.')
  num_images = sum(len(os.listdir(os.path.join(train_dir, c))) for c in classes)
  out = {'data.source': 'folder', 'data.data_dir': subset_dir, 'data.dataset': SUBSET_DATASET,
         'data.image_size': image_size, 'model.num_classes': len(classes), 'batch_size': 64, 'bn_group_size': 32,
         'eval_batch_size': 100}
  if not os.path.isdir(os.path.join(subset_dir, 'test')):
    out['data.val_examples'] = max(1, num_images // 10)
  return out


def make_specs(nets, seeds, steps: int = 0, overrides: dict | None = None, subset_dir: str = '',
               image_size: int = 64, config_dir: str = sweep.CONFIG_DIR):
  unknown = [n for n in nets if n not in NETS]
  if unknown:
    raise ConfigError(f'Unknown Table 3 net(s) {", ".join(unknown)}; valid: {", ".join(NETS)}.')
  base = subset_overrides(subset_dir, image_size) if subset_dir else {}
  note = (f'image-folder subset {subset_dir} at {image_size}x{image_size}, NOT ImageNet' if subset_dir
          else 'ImageNet; the paper tests 10 crops, a training run the centre crop')
  specs = []
  for net in nets:
    file, net_overrides = NETS[net]
    for seed in seeds:
      c = sweep.load_config_file(os.path.join(config_dir, file))
      sweep.apply_overrides(c, net_overrides)
      if steps:
        sweep.shorten(c, steps)
      sweep.apply_overrides(c, {**base, **(overrides or {})})
      c.seed = seed
      specs.append(sweep.RunSpec('table3' + ('_subset' if subset_dir else ''), net, seed, c, note=note))
  return specs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sweep.add_common_flags(parser)
  parser.add_argument('--nets', default=','.join(NETS), help=f'Comma-separated; valid: {", ".join(NETS)}.')
  parser.add_argument('--subset_dir', default='', help='Image folder to use instead of ImageNet (see above).')
  parser.add_argument('--image_size', type=int, default=64, help='Image size for --subset_dir.')
  args = parser.parse_args(argv)
  try:
    steps = args.steps or (1000 if args.subset_dir else 0)
    specs = make_specs([n for n in args.nets.split(',') if n], sweep.parse_seeds(args.seeds), steps,
                       sweep.parse_overrides(args.set), args.subset_dir, args.image_size)
    results = sweep.run_sweep(specs, args.runs_dir, dry_run=args.dry_run)
  except sweep.USER_ERRORS as e:
    sys.exit(f'error: {e}')
  return 3 if 'stopped' in results.values() else 0


if __name__ == '__main__':
  sys.exit(main())
