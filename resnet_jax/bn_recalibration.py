"""BatchNorm recalibration: replace the moving averages by the statistics of many training examples.

The authors' released ImageNet models did not keep BN moving averages: after training, the mean and variance of
every BN layer were recomputed over a large set of training images. `recalibrate` does that for any checkpoint:
the network runs in training mode on each batch (every BN normalises with that batch's own statistics, as in
training), and each layer's statistics are accumulated over all the examples seen, weighted by batch size:

  mean = E[x],  var = E[x^2] - E[x]^2   over every example and spatial position that reached the layer,

so the result is exactly the mean and (biased) variance of the layer inputs of the data it saw, not a moving
average and not a mean of per-batch variances. Use it from the evaluator: `python -m resnet_jax.evaluate ...
--recalibrate_bn=N`.
"""
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import mesh as mesh_lib
from resnet_jax.errors import ConfigError, DataError


def batch_moments_fn(model):
  """A function (variables, x) -> per-layer {'mean': E[x], 'sq': E[x^2]} over the batch `x` in training mode."""
  # momentum 0 turns the moving-average update into "this batch's statistics"; one group = the whole batch.
  stats_model = model.clone(bn_momentum=0.0, bn_group_size=0)

  def moments(variables, x):
    _, new = stats_model.apply(variables, x, train=True, mutable=['batch_stats'])
    return jax.tree_util.tree_map(lambda m, v: {'mean': m, 'sq': v + jnp.square(m)},
                                  _leaf_pairs(new['batch_stats'], 'mean'), _leaf_pairs(new['batch_stats'], 'var'))
  return moments


def _leaf_pairs(stats, key):
  """The tree of BN layers with one array per layer (the `key` entry of each layer's {'mean', 'var'})."""
  if set(stats) == {'mean', 'var'}:
    return stats[key]
  return {k: _leaf_pairs(v, key) for k, v in stats.items()}


def recalibrate(model, variables, batches):
  """New variables whose `batch_stats` are the exact statistics of the BN inputs over all examples of `batches`
  (an iterable of float32 image arrays (B, H, W, 3), B may vary), computed on this process's devices. `params` are
  unchanged."""
  mesh = mesh_lib.local_mesh()
  replicated = mesh_lib.replicated(mesh)
  variables = jax.device_put(variables, replicated)
  fn = jax.jit(batch_moments_fn(model))
  total, count = None, 0
  for x in batches:
    x = np.asarray(x)
    k = x.shape[0]
    sharding = mesh_lib.batch_sharding(mesh) if k % mesh.devices.size == 0 else replicated
    m = jax.device_get(fn(variables, jax.device_put(x, sharding)))
    m = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) * k, m)
    total = m if total is None else jax.tree_util.tree_map(np.add, total, m)
    count += k
  if total is None:
    raise DataError('BN recalibration saw no examples.')
  return _finish(variables, total, count)


def _finish(variables, total, count):
  if jax.process_count() > 1:  # each host saw its own examples: add the sums over hosts
    from jax.experimental import multihost_utils
    total = jax.tree_util.tree_map(lambda a: np.sum(multihost_utils.process_allgather(a), 0), total)
    count = int(np.sum(multihost_utils.process_allgather(np.int64(count))))
  moments = jax.tree_util.tree_map(lambda a: a / count, total)
  is_layer = lambda t: isinstance(t, dict) and set(t) == {'mean', 'sq'}
  stats = jax.tree_util.tree_map(
      lambda t: {'mean': jnp.asarray(t['mean'], jnp.float32),
                 'var': jnp.asarray(np.maximum(t['sq'] - np.square(t['mean']), 0.0), jnp.float32)},
      moments, is_leaf=is_layer)
  return {'params': variables['params'], 'batch_stats': stats}


def recalibrate_from_input(config, model, variables, inp, num_examples: int):
  """Recalibrates on `num_examples` training examples drawn through the input's training views (the paper's
  augmentation), in batches of config.batch_size (split over the hosts)."""
  if num_examples < config.batch_size:
    raise ConfigError(f'--recalibrate_bn={num_examples} is fewer than one batch of config.batch_size='
                      f'{config.batch_size}.')
  return recalibrate(model, variables, inp.training_batches(num_examples // config.batch_size, config.batch_size))
