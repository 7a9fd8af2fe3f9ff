"""The paper's numbers that our runs are compared with (He et al. 2016; see also docs/experiments.md).

Keys are net names as the runners write them: 'resnet-20', 'plain-56', 'resnet-34-B', ...
"""

# Table 6: CIFAR-10 test error (%), option A, 64k iterations at batch 128. ResNet-110: the best of 5 runs is 6.43,
# the mean 6.61 +- 0.16; we compare the mean (we report means over our seeds too).
TABLE6_TEST_ERROR = {
    'resnet-20': 8.75,
    'resnet-32': 7.51,
    'resnet-44': 7.17,
    'resnet-56': 6.97,
    'resnet-110': 6.61,
    'resnet-1202': 7.93,
}
TABLE6_NOTES = {
    'resnet-110': 'paper: mean of 5 runs 6.61 +- 0.16, best 6.43',
    'resnet-1202': 'paper: overfits (training error < 0.1%)',
}
# Fig. 6 (left) plots the plain nets; the paper gives no table of their errors, only that deeper is worse
# (plain-110 above 60%, not plotted).
FIG6_PLAIN_NOTE = 'Fig. 6 only: the deeper plain net has the higher training and test error'

# Table 2: ImageNet validation top-1 error (%), 10-crop testing; the 18/34-layer nets, option A.
TABLE2_TOP1_ERROR = {
    'plain-18': 27.94,
    'plain-34': 28.54,
    'resnet-18-A': 27.88,
    'resnet-34-A': 25.03,
}

# Table 3: ImageNet validation top-1 / top-5 error (%), 10-crop testing.
TABLE3_TOP1_ERROR = {
    'plain-34': 28.54,
    'resnet-34-A': 25.03,
    'resnet-34-B': 24.52,
    'resnet-34-C': 24.19,
    'resnet-50': 22.85,
    'resnet-101': 21.75,
    'resnet-152': 21.43,
}
TABLE3_TOP5_ERROR = {
    'plain-34': 10.02,
    'resnet-34-A': 7.76,
    'resnet-34-B': 7.46,
    'resnet-34-C': 7.40,
    'resnet-50': 6.71,
    'resnet-101': 6.05,
    'resnet-152': 5.71,
}

# The testing protocol behind each table's numbers (Sec. 4.2: CIFAR tests "the single view of the original 32x32
# image"; Sec. 3.4: the ImageNet comparisons use 10-crop testing). Our own numbers carry their protocol too, so the
# report never puts two protocols side by side unlabelled.
SINGLE_VIEW, CENTRE_CROP, TEN_CROP = 'single view', 'centre crop', '10-crop'
PROTOCOL = {'table6': SINGLE_VIEW, 'table2': TEN_CROP, 'table3': TEN_CROP}

# The recipes' lengths in iterations (Sec. 4.2 and 3.4): a run with fewer planned steps is a reduced recipe.
RECIPE_STEPS = {'cifar10': 64_000, 'imagenet2012': 600_000}


def net_name(model_config) -> str:
  """'resnet-20', 'plain-56', 'resnet-34-B' (ImageNet nets with a basic block name their shortcut option)."""
  kind = 'resnet' if model_config.residual else 'plain'
  name = f'{kind}-{model_config.depth}'
  if model_config.residual and model_config.family == 'imagenet' and model_config.depth in (18, 34):
    name += f'-{model_config.shortcut}'
  return name


def paper_reference(dataset: str, family: str, name: str):
  """(error %, table, protocol) of the paper's number for this net on this dataset, or None when it has none."""
  if dataset == 'cifar10' and family == 'cifar' and name in TABLE6_TEST_ERROR:
    return TABLE6_TEST_ERROR[name], 'Table 6', PROTOCOL['table6']
  if dataset == 'imagenet2012' and family == 'imagenet':
    if name in TABLE3_TOP1_ERROR:
      return TABLE3_TOP1_ERROR[name], 'Table 3', PROTOCOL['table3']
    if name in TABLE2_TOP1_ERROR:
      return TABLE2_TOP1_ERROR[name], 'Table 2', PROTOCOL['table2']
  return None


def paper_error(dataset: str, family: str, name: str):
  """The paper's error (%) for this net on this dataset, or None when the paper has no such number."""
  ref = paper_reference(dataset, family, name)
  return ref[0] if ref else None
