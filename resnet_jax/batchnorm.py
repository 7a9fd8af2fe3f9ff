"""Batch normalisation whose training statistics are taken over fixed groups of examples.

The paper's CIFAR runs used a mini-batch of 128 on two GPUs, so each BatchNorm layer normalised over 64 examples
(Sec. 4.2). `group_size` reproduces that independently of how many devices run the step: the global batch is split
into consecutive groups of `group_size` examples and each group is normalised with its own mean and variance.
`group_size=0` normalises over the whole global batch.

Under `jax.jit` with the batch sharded over a mesh, the reshape below tells the compiler which examples belong
together: a group that lies inside one device's shard is reduced locally (no communication); a group that spans
devices is reduced across them by the collective the compiler inserts. No hand-written `psum` is needed.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from resnet_jax.errors import ConfigError


class BatchNorm(nn.Module):
  """BN after a conv, before the ReLU (Sec. 3.4). Parameter names match `flax.linen.BatchNorm`.

  Attributes:
    use_running_average: evaluation mode (use the moving averages in `batch_stats`).
    group_size: examples per normalisation group in training (0 = the whole batch).
    momentum: moving-average decay, `avg = momentum * avg + (1 - momentum) * batch_value`
      (0.9 equals PyTorch's default `momentum=0.1`).
    epsilon: added to the variance (1e-5, as Caffe and PyTorch).
    dtype: output dtype. Statistics are always computed in float32; scale and bias are float32 parameters.
    scale_init: initialiser of the scale (ones; zeros for the optional zero-initialised last BN of a block).
  """
  use_running_average: bool = False
  group_size: int = 0
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param('scale', self.scale_init, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))

    if self.use_running_average:
      inv = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return (x * inv.astype(x.dtype) + (bias - ra_mean.value * inv).astype(x.dtype)).astype(self.dtype)

    batch = x.shape[0]
    group = self.group_size or batch
    if batch % group:
      raise ConfigError(f'BatchNorm group_size={group} does not divide the batch of {batch} examples; '
                        'choose a bn_group_size that divides the global batch size.')
    xg = x.reshape((batch // group, group) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))  # examples in the group and spatial positions
    # One pass over the activations, accumulated in float32: E[x] and E[x^2] (as flax.linen.BatchNorm does).
    mean = jnp.mean(xg, axes, dtype=jnp.float32, keepdims=True)
    mean_sq = jnp.mean(jnp.square(xg.astype(jnp.float32)), axes, keepdims=True)
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)

    if not self.is_initializing():
      # Moving averages: the mean over groups of each group's statistics.
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.reshape(-1, channels).mean(0)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var.reshape(-1, channels).mean(0)

    # Fold normalisation and the affine transform into one multiply-add per element.
    inv = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * inv
    y = xg * inv.astype(x.dtype) + shift.astype(x.dtype)
    return y.reshape(x.shape).astype(self.dtype)
