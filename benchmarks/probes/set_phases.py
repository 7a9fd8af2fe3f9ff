"""Times, in one process, the phases of work the test suite repeats, so that two installed sets (the pinned and the
newest) can be compared phase by phase:

  python benchmarks/probes/set_phases.py            # run it with each set's Python, a few times, in turn

Phases: importing the package (`resnet_jax.train_step`, with jax and flax), tracing only (`summary.count`: an
`eval_shape` of `init`) for CIFAR ResNet-110 and ResNet-1202, an eager (not jitted) `model.init` of ResNet-8 with the
number of programs it compiles (each primitive run outside `jit` is compiled on first use), and 30 small `jax.jit`
functions compiled and run. Each phase prints its wall and process CPU seconds; on a shared machine the CPU seconds
are the figure to compare. The training step's own compile time is `python -m resnet_jax.time_step --json`'s
`compile_s`. Runs on the CPU with 4 devices, as the tests do (tests/conftest.py).
"""
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def timed(results, name, fn):
  c0, t0 = time.process_time(), time.perf_counter()
  out = fn()
  results[name] = (time.perf_counter() - t0, time.process_time() - c0)
  return out


def main():
  results = {}
  timed(results, 'import', lambda: __import__('resnet_jax.train_step'))
  import jax
  import jax.numpy as jnp
  from jax import monitoring
  from resnet_jax import config_base, models, summary

  compiles = []

  def on_duration(event, secs, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':  # one per program XLA compiles
      compiles.append(secs)
  monitoring.register_event_duration_secs_listener(on_duration)
  for depth in (110, 1202):
    timed(results, f'trace ResNet-{depth}', lambda: summary.count(config_base.cifar(depth).model, 32))
  model = models.create_model(config_base.cifar(8).model)
  x = jnp.ones((2, 32, 32, 3))
  before = len(compiles)
  timed(results, 'eager init ResNet-8', lambda: jax.block_until_ready(model.init(jax.random.key(0), x, train=False)))
  eager_programs = len(compiles) - before

  def small_jits():
    for i in range(30):
      jax.block_until_ready(jax.jit(lambda a, i=i: jnp.tanh(a * i).sum(0) + i)(jnp.ones((8, i + 1))))
  timed(results, '30 small jits', small_jits)
  print(f'jax {jax.__version__}, Python {sys.version.split()[0]}')
  for name, (wall, cpu) in results.items():
    extra = f'  ({eager_programs} programs compiled)' if name.startswith('eager') else ''
    print(f'  {name:24} {wall:7.2f} s wall {cpu:7.2f} s CPU{extra}')


if __name__ == '__main__':
  main()
