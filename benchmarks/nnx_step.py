"""One jitted training step of the same network through Linen (as the training core writes it) and through the NNX
wrapper (nnx_models.py), in the ways NNX offers to jit it; prints the time per step of each (docs/design.md,
"Flax NNX").

  python benchmarks/nnx_step.py [--config=configs/cifar_20.py] [--batch=32] [--image_size=32] [--steps=20]
      [--repeats=5] [--out=FILE.json]

The step is the paper's: cross-entropy, SGD with momentum 0.9 and weight decay 1e-4 (optax), BN statistics over the
whole batch updated in training mode. Variants:
  linen           jax.jit over (params, batch_stats, opt_state, x, y), as the training core;
  nnx.jit         @nnx.jit over (model, optimizer, x, y): the graph of modules is split and merged at every call;
  nnx.jit_tree    the same with graph=False (NNX's tree mode: modules as plain pytrees), where flax has it;
  cached_partial  nnx.cached_partial(step, model, optimizer): the graph traversal cached between calls;
  split_merge     nnx.split once, a jax.jit of a pure function that merges, steps and returns the new state.
All start from the same variables; after one step the script checks that every variant computed the same loss,
parameters and BN statistics as Linen (`max_abs_diff`), so they time the same arithmetic. Each repetition times
--steps steps of every variant in turn (interleaved, so that load from other work falls on all alike), blocking
on the result of each step; the report gives the median and the minimum over repetitions of the mean step time,
and the first call's time (trace + compile), and the median CPU time per step of this process (all its threads: less
sensitive than the wall time to other work on a shared machine).
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from resnet_jax import models, nnx_models  # noqa: E402


def load_config(path):
  spec = importlib.util.spec_from_file_location('config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def optimizer():
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


def loss_of(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def linen_variant(linen, variables):
  tx = optimizer()
  state = (variables['params'], variables['batch_stats'], tx.init(variables['params']))

  @jax.jit
  def step(state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, new = linen.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                mutable=['batch_stats'])
      return loss_of(logits, y), new['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  box = {'state': state}

  def call(x, y):
    box['state'], loss = step(box['state'], x, y)
    return loss

  return call, lambda: {'params': box['state'][0], 'batch_stats': box['state'][1]}


def nnx_step(model, opt, x, y):
  def loss_fn(model):
    return loss_of(model(x, train=True), y)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def nnx_variant(linen, variables, how):
  # Built with shapes only (nothing drawn or compiled), then given the Linen variant's variables.
  model = nnx.eval_shape(lambda: nnx_models.NNXResNet(linen, rngs=nnx.Rngs(0), input_shape=(8, 8, 3)))
  nnx_models.load_linen_variables(model, variables)
  opt = nnx.Optimizer(model, optimizer(), wrt=nnx.Param)
  result = lambda: nnx_models.linen_variables(model)
  if how == 'nnx.jit':
    step = nnx.jit(nnx_step)
    return (lambda x, y: step(model, opt, x, y)), result
  if how == 'nnx.jit_tree':
    step = nnx.jit(nnx_step, graph=False)
    return (lambda x, y: step(model, opt, x, y)), result
  if how == 'cached_partial':
    step = nnx.cached_partial(nnx.jit(nnx_step), model, opt)
    return step, result
  assert how == 'split_merge'
  graphdef, state = nnx.split((model, opt))

  @jax.jit
  def pure(state, x, y):
    model, opt = nnx.merge(graphdef, state)
    loss = nnx_step(model, opt, x, y)
    return nnx.state((model, opt)), loss

  box = {'state': state}

  def call(x, y):
    box['state'], loss = pure(box['state'], x, y)
    return loss

  def result():
    model, _ = nnx.merge(graphdef, box['state'])
    return nnx_models.linen_variables(model)

  return call, result


def max_abs_diff(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/cifar_20.py')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  config = load_config(args.config)
  linen = models.create_model(config.model, bn_group_size=0)
  variables = linen.init(jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)), train=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((args.batch, args.image_size, args.image_size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, config.model.num_classes, args.batch), jnp.int32)

  names = ['linen', 'nnx.jit', 'nnx.jit_tree', 'cached_partial', 'split_merge']
  variants, first_call, losses, after_one = {}, {}, {}, {}
  for name in names:
    try:
      call, result = linen_variant(linen, variables) if name == 'linen' else nnx_variant(linen, variables, name)
      t0 = time.perf_counter()
      losses[name] = float(jax.block_until_ready(call(x, y)))
    except Exception as e:  # a variant this flax does not offer (tree mode before its introduction)
      print(f'{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:200]})', file=sys.stderr)
      continue
    first_call[name] = time.perf_counter() - t0
    after_one[name] = result()
    variants[name] = call

  per_step = {name: [] for name in variants}
  cpu_per_step = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, call in variants.items():
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        jax.block_until_ready(call(x, y))
      per_step[name].append((time.perf_counter() - t0) / args.steps)
      cpu_per_step[name].append((time.process_time() - c0) / args.steps)

  report = {
      'config': args.config, 'batch': args.batch, 'image_size': args.image_size, 'steps': args.steps,
      'repeats': args.repeats, 'python': platform.python_version(), 'jax': jax.__version__,
      'flax': flax.__version__, 'optax': optax.__version__, 'devices': str(jax.devices()),
      'cpu_count': os.cpu_count(), 'variants': {}}
  for name in variants:
    times = per_step[name]
    report['variants'][name] = {
        'median_ms': 1e3 * statistics.median(times), 'min_ms': 1e3 * min(times),
        'cpu_median_ms': 1e3 * statistics.median(cpu_per_step[name]),
        'first_call_s': first_call[name], 'loss': losses[name],
        'max_abs_diff_vs_linen': max_abs_diff(after_one[name], after_one['linen'])}
  base = report['variants']['linen']['median_ms']
  print(f'{"variant":<16} {"median ms":>10} {"min ms":>8} {"vs linen":>9} {"cpu ms":>8} {"1st call s":>11} '
        f'{"diff vs linen":>14}')
  for name, r in report['variants'].items():
    print(f'{name:<16} {r["median_ms"]:>10.2f} {r["min_ms"]:>8.2f} {r["median_ms"] / base:>9.3f} '
          f'{r["cpu_median_ms"]:>8.2f} {r["first_call_s"]:>11.2f} {r["max_abs_diff_vs_linen"]:>14.2e}')
  print(json.dumps(report))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
