"""Splits the CIFAR step's cost into forward and forward+backward, per depth, to locate where time goes on a CPU.

  python benchmarks/probes/forward_backward.py --depths 20 56 110 [--batch 128] [--repeats 3] [--relu ours|max]

Times jit(forward) and jit(grad(forward)) of the model alone (BN in training mode over the whole batch, no optimiser,
no augmentation), float32, on the default device. Prints one JSON line per (depth, part).

`--relu max` swaps our `xla_workarounds.relu` (x * (x > 0)) for `flax.linen.relu` (max(x, 0)), the A/B of the change that
stopped XLA rebuilding every residual activation from all earlier blocks in the backward pass (docs/performance.md).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import flax.linen as nn

from resnet_jax import config_base, models


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depths', type=int, nargs='+', default=[20, 56])
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--relu', choices=('ours', 'max'), default='ours')
  args = ap.parse_args()
  if args.relu == 'max':
    models.relu = nn.relu
  for depth in args.depths:
    model = models.create_model(config_base.cifar(depth).model, bn_group_size=0)
    x = jnp.ones((args.batch, 32, 32, 3))
    variables = model.init(jax.random.key(0), x[:2], train=False)

    def forward(params, batch_stats):
      out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'])
      return out.sum()

    for part, fn in (('forward', jax.jit(forward)), ('forward+backward', jax.jit(jax.grad(forward)))):
      jax.block_until_ready(fn(variables['params'], variables['batch_stats']))  # compile and warm up
      start = time.perf_counter()
      for _ in range(args.repeats):
        out = fn(variables['params'], variables['batch_stats'])
      jax.block_until_ready(out)
      seconds = (time.perf_counter() - start) / args.repeats
      print(json.dumps({'depth': depth, 'part': part, 'relu': args.relu, 'batch': args.batch,
                        'seconds': round(seconds, 4),
                        'device': jax.devices()[0].platform}), flush=True)


if __name__ == '__main__':
  main()
