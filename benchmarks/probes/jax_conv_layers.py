"""Our time for one 3x3 conv layer of each CIFAR stage (batch 128, NHWC, float32): forward, and forward with the
input and weight gradients. The counterpart of `benchmarks/probes/torch_conv_layers.py`; run it with and without
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce` (convs on XLA's Eigen kernels, not YNNPACK) and
pinned to one core or not, to see which conv library uses how many threads.

  [XLA_FLAGS=...] [taskset -c 0] python benchmarks/probes/jax_conv_layers.py [--repeats 20] [--batch 128] [--im2col]

`--im2col` also times the same layer written as one matrix multiply over the nine shifted copies of the padded
input ((B*H*W, 9*C) @ (9*C, C)), the form a conv library would pick for few channels.
"""
import argparse
import os
import time

import jax
from jax import lax


def _ms(fn, *args, repeats):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--repeats', type=int, default=20)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--im2col', action='store_true')
  args = ap.parse_args()
  print(f'jax {jax.__version__}, {len(os.sched_getaffinity(0))} core(s), XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  def im2col(x, w):
    b, h, wd, c = x.shape
    p = jax.numpy.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jax.numpy.concatenate([p[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    return (cols.reshape(b * h * wd, 9 * c) @ w.reshape(9 * c, -1)).reshape(b, h, wd, -1)

  variants = [('conv', conv)] + ([('im2col', im2col)] if args.im2col else [])
  for channels, size in ((16, 32), (32, 16), (64, 8)):
    x = jax.random.normal(jax.random.key(0), (args.batch, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    for name, f in variants:
      grads = lambda x, w, f=f: jax.grad(lambda x, w: (f(x, w) * x).sum(), (0, 1))(x, w)
      print(f'{channels:3d} channels at {size}x{size}, {name:6s}: forward {_ms(f, x, w, repeats=args.repeats):6.2f} '
            f'ms, forward + input and weight gradients {_ms(grads, x, w, repeats=args.repeats):6.2f} ms')


if __name__ == '__main__':
  main()
