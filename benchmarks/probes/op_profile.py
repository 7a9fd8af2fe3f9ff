"""Where the time of one CIFAR forward+backward goes, kernel by kernel, on the CPU (or any backend jax traces).

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 python benchmarks/probes/op_profile.py --depth 20 [--top 25]

Compiles jit(grad(loss)) of the model alone (BN over the whole batch, float32, batch 128), runs it once under
`jax.profiler.trace`, and sums the duration of every XLA kernel (thunk) in the trace by kind: convolutions by window
and output shape (a 3x3 window is a forward or input-gradient conv, a 32x32/16x16/8x8 window a weight-gradient conv),
transposes/copies, reductions and other elementwise fusions. On one core without Eigen's thread pool the kernels
run one after another, so the sum is the step time; with several threads, kernels overlap and the sum exceeds it.
`--relu max` profiles the network with max(x, 0) instead of `xla_workarounds.relu`, `--scan_blocks` the scanned variant
(see docs/performance.md).
"""
import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import flax.linen as nn

from resnet_jax import config_base, models


def _kinds(hlo: str) -> dict:
  """Maps each top-level HLO instruction name to a short description of what its kernel does."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^%?([\w.-]+) .*\{$', line)
    if head and not line.startswith(' '):
      current = head.group(1)
      bodies[current] = []
    elif current and line.startswith('  '):
      bodies[current].append(line)
  kinds = {}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (\S+) ([a-z][\w-]*)\(', line)
    if not m:
      continue
    name, shape, _ = m.groups()
    callee = re.search(r'calls=%([\w.-]+)', line)
    body = bodies.get(callee.group(1), []) if callee else [line]
    ops = [o.group(1) for o in (re.search(r'= \S+ ([a-z][\w-]*)\(', b) for b in body) if o]
    engine = 'YNNPACK' if '__ynn_fusion' in line else 'XLA'
    if 'convolution' in ops:
      conv = next(b for b in body if ' convolution(' in b)
      window = re.search(r'window=\{size=(\S+)', conv).group(1)
      out = re.search(r'= (\S+) convolution', conv).group(1).split('{')[0]
      kinds[name] = f'conv {window} -> {out} ({engine})'
    elif 'reduce' in ops:
      kinds[name] = f'reduce -> {shape.split("{")[0]}'
    elif 'transpose' in ops or 'copy' in ops:
      kinds[name] = f'transpose/copy -> {shape.split("{")[0]}'
    elif 'dot' in ops:
      kinds[name] = 'dot'
    else:
      kinds[name] = 'elementwise'
  return kinds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--depth', type=int, default=20)
  ap.add_argument('--batch', type=int, default=128)
  ap.add_argument('--top', type=int, default=25)
  ap.add_argument('--relu', choices=('ours', 'max'), default='ours')
  ap.add_argument('--scan_blocks', action='store_true', help='Profile the scanned-blocks variant of the model.')
  args = ap.parse_args()
  if args.relu == 'max':
    models.relu = nn.relu
  model_config = config_base.cifar(args.depth).model
  model_config.scan_blocks = args.scan_blocks
  model = models.create_model(model_config, bn_group_size=0)
  x = jax.random.normal(jax.random.key(1), (args.batch, 32, 32, 3))
  variables = model.init(jax.random.key(0), x[:2], train=False)

  def loss(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
                         mutable=['batch_stats'])
    return out.sum()

  step = jax.jit(jax.grad(loss)).lower(variables['params']).compile()
  kinds = _kinds(step.as_text())
  jax.block_until_ready(step(variables['params']))
  start = time.perf_counter()
  jax.block_until_ready(step(variables['params']))
  wall = time.perf_counter() - start

  from jax._src.lib import _profile_data  # the reader of jax.profiler's trace files
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(step(variables['params']))
    trace = _profile_data.ProfileData.from_file(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0])
  seconds, count = collections.Counter(), collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      if 'XLA' not in line.name:
        continue
      for event in line.events:
        if event.name in kinds:
          seconds[kinds[event.name]] += event.duration_ns / 1e9
          count[kinds[event.name]] += 1
  total = sum(seconds.values())
  print(f'ResNet-{args.depth} (relu={args.relu}, scan_blocks={args.scan_blocks}), batch {args.batch}: step {wall * 1e3:.1f} ms wall, '
        f'kernels {total * 1e3:.1f} ms in all')
  print(f'{"ms":>8} {"kernels":>7} {"share":>6}  kind')
  for kind, s in seconds.most_common(args.top):
    print(f'{s * 1e3:8.1f} {count[kind]:7d} {100 * s / total:5.1f}%  {kind}')


if __name__ == '__main__':
  main()
