"""Real torchvision ResNets -> our models: logits parity for 18/34/50/101/152 (run where torchvision is installed).

  python scripts/torchvision_parity.py [--device=cuda] [--out=DIR]

The unit test (tests/test_imagenet.py) checks the converter against a torch ResNet written with torchvision's
names, because no CPU torchvision wheel is available here. This script closes that gap on a machine that has
torchvision (the GPU machine): each torchvision.models.resnetN (random weights, no download; BN running statistics
made non-trivial by a few training-mode passes) is converted and its float32 logits compared with ours on the same
input. Needs jax, flax, numpy, torch, torchvision; not ml_collections or TensorFlow. Writes OUT/parity.json.
With --allow_fallback and no torchvision it uses the test's copy of the layout (to check the script itself).
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnet_jax import models, torchvision_weights  # noqa: E402


class ModelConfig(dict):
  """The few `config.model` fields the converter reads (ml_collections is not needed)."""
  __getattr__ = dict.__getitem__


def torchvision_resnet(depth, allow_fallback):
  try:
    import torchvision
    return getattr(torchvision.models, f'resnet{depth}')(weights=None), f'torchvision {torchvision.__version__}'
  except ImportError:
    if not allow_fallback:
      raise SystemExit('torchvision is not installed; pass --allow_fallback to use the test\'s copy of its layout.')
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
    from test_imagenet import torch_resnet
    return torch_resnet(depth, 1000), 'fallback: tests/test_imagenet.py layout'


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
  ap.add_argument('--depths', default='18,34,50,101,152')
  ap.add_argument('--out', default=os.environ.get('OUT', '.'))
  ap.add_argument('--allow_fallback', action='store_true')
  args = ap.parse_args()
  jax.config.update('jax_default_matmul_precision', 'highest')  # no TF32 on either side: a float32 comparison
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  rows = []
  for depth in map(int, args.depths.split(',')):
    t = time.time()
    net, source = torchvision_resnet(depth, args.allow_fallback)
    torch.manual_seed(depth)
    with torch.no_grad():
      for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
          m.weight.uniform_(0.5, 1.5)
          m.bias.uniform_(-0.2, 0.2)
          m.momentum = None
      net.train()
      for _ in range(2):
        net(torch.randn(8, 3, 64, 64))
    net.eval().to(args.device)
    sd = {k: v.cpu().numpy() for k, v in net.state_dict().items()}
    config = ModelConfig(family='imagenet', depth=depth, residual=True, shortcut='B', bottleneck='v1.5',
                         dtype='float32', num_classes=1000, bn_momentum=0.9, bn_epsilon=1e-5,
                         zero_init_last_bn=False, head_init='he')
    params, batch_stats = torchvision_weights.convert(sd, config)
    x = np.random.default_rng(depth).normal(size=(4, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
      want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(args.device)).cpu().numpy()
    model = models.create_model(config)
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {'params': params, 'batch_stats': batch_stats}, x))
    row = {'depth': depth, 'source': source, 'keys': len(sd), 'max_abs_diff': float(np.abs(got - want).max()),
           'max_abs_logit': float(np.abs(want).max()), 'seconds': round(time.time() - t, 1)}
    row['ok'] = row['max_abs_diff'] < 1e-4 * max(1.0, row['max_abs_logit'])
    print(json.dumps(row), flush=True)
    rows.append(row)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'parity.json'), 'w') as f:
    json.dump({'jax': jax.__version__, 'torch': torch.__version__, 'device': str(jax.devices()[0]), 'rows': rows},
              f, indent=2)
  sys.exit(0 if all(r['ok'] for r in rows) else 1)


if __name__ == '__main__':
  main()
