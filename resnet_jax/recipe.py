"""The paper's training recipe as functions of the config: the optimiser, which parameters decay, the learning rate
and its warm-up, and (not in the paper) float16 loss scaling. The step (train_step.py) calls these; nothing here
touches data or devices.

  Sec. 4.2 (CIFAR-10): "We use a weight decay of 0.0001 and momentum of 0.9 ... We start with a learning rate of 0.1,
  divide it by 10 at 32k and 48k iterations, and terminate training at 64k iterations ... In this case [110 layers],
  we find that the initial learning rate of 0.1 is slightly too large to start converging. So we use 0.01 to warm up
  the training until the training error is below 80% (about 400 iterations), and then go back to 0.1."
  Sec. 3.4 (ImageNet): SGD, mini-batch 256, lr 0.1 divided by 10 when the error plateaus, weight decay 0.0001,
  momentum 0.9, up to 60e4 iterations.
"""
import jax
import jax.numpy as jnp
import optax

from resnet_jax import config_base


# ---------------------------------------------------------------------------------------------------------------
# The optimiser: SGD with momentum and L2 weight decay.

def weight_decay_mask(params, which: str):
  """None (every parameter decays) for 'all'; for 'kernels', True at the conv and fc weights only."""
  if which == 'all':
    return None
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(config, params, lr=1.0) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient (g' = g + wd w), in config.momentum_form:

    'caffe' (the paper's):  v = m v + lr g';  w -= v   (Caffe's v = m v - lr g'; w += v, with v's sign flipped)
    'pytorch':              v = m v + g';     w -= lr v

  The update it returns is v; `step_size` says what to multiply it by before subtracting it from w. The learning
  rate is an argument, not a schedule inside the optimiser, because the ResNet-110 warm-up makes it depend on the
  training error (the step computes it). In the Caffe form it scales the gradient before it enters the velocity.
  Both forms have the same state (the velocity), so the state's layout does not depend on the form."""
  return optax.chain(
      optax.chain(
          optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask(params, config.weight_decay_on)),
          optax.scale(lr if config.momentum_form == 'caffe' else 1.0)),
      optax.trace(decay=config.momentum, nesterov=False))


def step_size(config, lr):
  """What the velocity is multiplied by in w -= step_size * v: 1 in the Caffe form (lr is inside v), else lr."""
  return 1.0 if config.momentum_form == 'caffe' else lr


# ---------------------------------------------------------------------------------------------------------------
# The learning rate: steps down at fixed iterations, after the warm-up of the deepest nets.

def learning_rate(config, step, warmup_done):
  """lr of the update at `step` (0-based): config.learning_rate times lr_decay_factor for each boundary b with
  step >= b (config_base.schedule_boundaries); the warm-up lr until `warmup_done` when config.warmup.enabled.
  Drops that fall on the same step (a very short run) multiply."""
  scales = {}
  for b in config_base.schedule_boundaries(config):
    scales[b] = scales.get(b, 1.0) * config.lr_decay_factor
  lr = optax.piecewise_constant_schedule(config.learning_rate, scales)(step)
  if config.warmup.enabled:
    lr = jnp.where(warmup_done, lr, config.warmup.learning_rate)
  return jnp.asarray(lr, jnp.float32)


def update_warmup(config, state_step, warmup_done, error_ema, batch_error):
  """Ends the warm-up once the moving-average training error is below `until_error`, or at `max_steps` at the
  latest, so the run can never stay at the warm-up learning rate."""
  ema = config.warmup.ema * error_ema + (1 - config.warmup.ema) * batch_error
  done = warmup_done | (ema < config.warmup.until_error) | (state_step + 1 >= config.warmup.max_steps)
  return done, ema


# ---------------------------------------------------------------------------------------------------------------
# Dynamic loss scaling for float16 compute (config.loss_scale; not in the paper, which trained in float32).

def init_loss_scale(config):
  if not config.loss_scale.enabled:
    return None
  return {'scale': jnp.asarray(config.loss_scale.initial, jnp.float32), 'good_steps': jnp.zeros((), jnp.int32)}


def update_loss_scale(config, loss_scale, grads):
  """Unscales `grads`; returns (grads, all finite?, next loss-scale state): halve on overflow, grow by `factor`
  after `growth_interval` finite steps in a row."""
  scale = loss_scale['scale']
  grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
  good = jnp.where(finite, loss_scale['good_steps'] + 1, 0)
  grow = good >= config.loss_scale.growth_interval
  new_scale = jnp.where(finite, jnp.where(grow, scale * config.loss_scale.factor, scale),
                        jnp.maximum(scale / config.loss_scale.factor, 1.0))
  return grads, finite, {'scale': new_scale, 'good_steps': jnp.where(grow, 0, good)}
