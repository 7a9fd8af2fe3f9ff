"""Runs our benchmark and the PyTorch reference on the same network and batch, one after the other, and prints the
ratio (ours / PyTorch images/s: above 1 means we are faster).

  python benchmarks/compare.py --case=cifar:20 --case=cifar:56 [--dtype=float32|bfloat16] [--torch-mode=eager]
      [--torch-amp=none] [--torch-channels-last] [--steps=N] [--repeats=R] [--jax-python=...] [--torch-python=...]
      [--out=results.json] [--jax-arg=--config.bn_group_size=64 ...]

Each side runs in its own process (so the two never compete for the device and the JAX and PyTorch environments
may differ). `--gemm` adds the ceiling of the same run: a dense float32 matrix multiply (PyTorch, the same threads,
n=2048) in GFLOP/s, and prints each side's model GFLOP/s (6 x forward multiply-adds x images/s) as a fraction of it. Ours runs with `--config.bn_group_size=0` (BN over the whole batch, as nn.BatchNorm2d) unless
`--jax-arg` overrides it, so both sides do the same arithmetic.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {('cifar', d): f'configs/cifar_{d}.py' for d in (20, 32, 44, 56, 110, 1202)}
CONFIGS.update({('imagenet', d): f'configs/imagenet_{d}.py' for d in (18, 34, 50, 101, 152)})
TORCH_AMP = {'float32': 'none', 'bfloat16': 'bf16', 'float16': 'fp16'}


def _last_json(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise ValueError('no JSON line in the output')


def _run(cmd, env=None, timeout=None) -> dict:
  print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout} s'}
  if p.returncode:
    return {'error': (p.stderr or p.stdout).strip().splitlines()[-1:] or [f'exit {p.returncode}']}
  try:
    return _last_json(p.stdout)
  except ValueError as e:
    return {'error': str(e)}


def ours(net, depth, dtype, steps, repeats, python, extra, timeout):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  cmd = [python, '-m', 'resnet_jax.time_step', f'--config={CONFIGS[(net, depth)]}', f'--steps={steps}',
         f'--repeats={repeats}', '--json', f'--config.model.dtype={dtype}', '--config.bn_group_size=0', *extra]
  return _run(cmd, env, timeout)


GEMM_SNIPPET = """
import json, sys, time, torch
n, threads = int(sys.argv[1]), int(sys.argv[2])
if threads:
  torch.set_num_threads(threads)
a, b = torch.randn(n, n), torch.randn(n, n)
for _ in range(3):
  a @ b
times = []
for _ in range(5):
  t = time.perf_counter()
  for _ in range(5):
    a @ b
  times.append((time.perf_counter() - t) / 5)
times.sort()
print(json.dumps(dict(n=n, threads=torch.get_num_threads(), gflops=2 * n ** 3 / times[len(times) // 2] / 1e9)))
"""


def gemm(python, n=2048, threads=0, timeout=None):
  """Dense float32 GEMM GFLOP/s on the CPU (median of 5 windows of 5 multiplies), in its own process."""
  return _run([python, '-c', GEMM_SNIPPET, str(n), str(threads)], timeout=timeout)


def cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      flags = next(l for l in f if l.startswith('flags')).split()
  except (OSError, StopIteration):
    return 'unknown'
  wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16')
  return ' '.join(w for w in wanted if w in flags) or 'none of ' + ' '.join(wanted)


def theirs(net, depth, dtype, steps, repeats, python, mode, amp, channels_last, extra, timeout):
  cmd = [python, os.path.join(ROOT, 'benchmarks', 'pytorch_reference.py'), f'--net={net}', f'--depth={depth}',
         f'--steps={steps}', f'--repeats={repeats}', f'--mode={mode}', f'--amp={amp or TORCH_AMP[dtype]}',
         '--json', *(['--channels-last'] if channels_last else []), *extra]
  return _run(cmd, timeout=timeout)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--case', action='append', default=[], help='NET:DEPTH, e.g. cifar:20 or imagenet:50')
  p.add_argument('--dtype', default='float32', choices=sorted(TORCH_AMP))
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--torch-mode', default='eager', choices=['eager', 'compile'])
  p.add_argument('--torch-amp', default='', choices=['', 'none', 'bf16', 'fp16'],
                 help='default: the autocast dtype matching --dtype')
  p.add_argument('--torch-channels-last', action='store_true')
  p.add_argument('--jax-python', default=sys.executable)
  p.add_argument('--torch-python', default=sys.executable)
  p.add_argument('--jax-arg', action='append', default=[], help='extra flag for resnet_jax.time_step')
  p.add_argument('--torch-arg', action='append', default=[], help='extra flag for pytorch_reference.py')
  p.add_argument('--timeout', type=float, default=None, help='seconds per side per case')
  p.add_argument('--out', default='', help='append one JSON line per case to this file')
  p.add_argument('--gemm', action='store_true', help='also measure the dense float32 GEMM ceiling (CPU)')
  a = p.parse_args()
  cases = []
  for c in a.case or ['cifar:20']:
    net, _, depth = c.partition(':')
    if (net, int(depth or 0)) not in CONFIGS:
      raise SystemExit(f'error: unknown case {c!r}; valid: ' + ', '.join(f'{n}:{d}' for n, d in CONFIGS))
    cases.append((net, int(depth)))

  ceiling = gemm(a.torch_python, timeout=a.timeout) if a.gemm else None
  rows = []
  for net, depth in cases:
    j = ours(net, depth, a.dtype, a.steps, a.repeats, a.jax_python, a.jax_arg, a.timeout)
    t = theirs(net, depth, a.dtype, a.steps, a.repeats, a.torch_python, a.torch_mode, a.torch_amp,
               a.torch_channels_last, a.torch_arg, a.timeout)
    ratio = (j['images_per_sec'] / t['images_per_sec']) if 'error' not in j and 'error' not in t else None
    cpu_ratio = (t['process_cpu_s_per_step'] / j['process_cpu_s_per_step']
                 if ratio is not None and j['process_cpu_s_per_step'] > 0 else None)
    row = dict(net=net, depth=depth, dtype=a.dtype, torch_mode=a.torch_mode,
               torch_channels_last=a.torch_channels_last, ours=j, pytorch=t, ratio=ratio, cpu_time_ratio=cpu_ratio,
               cpu_flags=cpu_flags(), gemm=ceiling)
    rows.append(row)
    if a.out:
      with open(a.out, 'a') as f:
        f.write(json.dumps(row) + '\n')

  print(f'{"network":<18} {"dtype":<9} {"ours ms":>9} {"ours img/s":>11} {"torch ms":>9} {"torch img/s":>12} '
        f'{"ratio":>6}  {"ours compile s":>14} {"64k steps, min":>14}')
  for r in rows:
    j, t = r['ours'], r['pytorch']
    name = f'{r["net"]} ResNet-{r["depth"]}'
    fmt = lambda d, k, s=1e3: f'{s * d[k]:.1f}' if 'error' not in d else 'error'
    ratio = f'{r["ratio"]:.2f}' if r['ratio'] else '-'
    recipe = f'{(64_000 * j["step_time_s"] + j["compile_s"]) / 60:.1f}' if 'error' not in j else '-'
    print(f'{name:<18} {r["dtype"]:<9} {fmt(j, "step_time_s"):>9} {fmt(j, "images_per_sec", 1):>11} '
          f'{fmt(t, "step_time_s"):>9} {fmt(t, "images_per_sec", 1):>12} {ratio:>6}  '
          f'{fmt(j, "compile_s", 1):>14} {recipe:>14}')
    for side, d in (('ours', j), ('pytorch', t)):
      if 'error' in d:
        print(f'  {side} failed: {d["error"]}')
  if ceiling and 'error' not in ceiling:
    print(f'dense float32 GEMM (n={ceiling["n"]}, {ceiling["threads"]} threads): {ceiling["gflops"]:.1f} GFLOP/s; '
          f'CPU flags: {cpu_flags()}')
    for r in rows:
      j, t = r['ours'], r['pytorch']
      share = lambda d: (f'{d["model_flops_per_sec"] / 1e9:.1f} GFLOP/s '
                         f'({100 * d["model_flops_per_sec"] / 1e9 / ceiling["gflops"]:.0f}% of GEMM)'
                         if 'error' not in d else 'error')
      print(f'  {r["net"]} ResNet-{r["depth"]}: ours {share(j)}, PyTorch {share(t)}')
  print('(64k steps: our projected wall time of the paper\'s CIFAR recipe, 64,000 steps plus compilation, '
        'evaluation not counted)')
  print(f'(PyTorch: {a.torch_mode}, amp {a.torch_amp or TORCH_AMP[a.dtype]}, '
        f'channels-last {a.torch_channels_last}; ratio = ours images/s / PyTorch images/s)')


if __name__ == '__main__':
  main()
