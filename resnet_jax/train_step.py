"""The training step: one SGD update of the network on one batch, pure.

  state = step(state, *inputs)

The input (input_pipeline.py) turns the step's inputs into its batch, sharded over the mesh; `update` runs the
network in training mode, takes the gradient, applies the recipe (recipe.py: SGD with momentum and weight decay at
the learning rate of Sec. 4.2 / 3.4, the ResNet-110 warm-up) and adds the loss and errors to the open log window.
The state is replicated; `jax.jit` over the mesh makes the compiler insert the gradient all-reduce. BatchNorm
statistics are grouped by `config.bn_group_size` (batchnorm.py). The loop around the step is train.py.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from resnet_jax import mesh as mesh_lib, recipe, seeds


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  warmup_done: jax.Array   # ResNet-110/1202: has the lr returned from the warm-up value (Sec. 4.2)?
  error_ema: jax.Array     # moving average of the batch training error that decides the warm-up
  train_sums: Any          # loss and error sums since the last log point (checkpointed: windows survive a resume)
  loss_scale: Any = None   # float16 dynamic loss scaling {'scale', 'good_steps'}; None (no leaves) when disabled


def zero_sums():
  return {'loss': jnp.zeros((), jnp.float32), 'errors': jnp.zeros((), jnp.float32),
          'count': jnp.zeros((), jnp.float32), 'lr': jnp.zeros((), jnp.float32),
          'nonfinite': jnp.zeros((), jnp.int32), 'first_nonfinite': jnp.zeros((), jnp.int32)}


def init_state(config, model, image_shape, num_classes: int, seed=None) -> TrainState:
  """The initial state of one network: initialised from `seed` (config.seed when None; a traced value when
  several seeds are initialised together)."""
  seed = config.seed if seed is None else seed
  variables = model.init(jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=recipe.make_optimizer(config, params).init(params),
                    warmup_done=jnp.asarray(not config.warmup.enabled),
                    error_ema=jnp.asarray(1.0 - 1.0 / num_classes, jnp.float32), train_sums=zero_sums(),
                    loss_scale=recipe.init_loss_scale(config))


def create_state(config, model, mesh, abstract: bool = False) -> TrainState:
  """The run's initial state, replicated over `mesh` (with config.num_seeds > 1, the seeds' states stacked: see
  seeds.py). With `abstract`, shapes, dtypes and shardings only (nothing computed): the template a checkpoint
  restores into, and a way to refuse a checkpoint of another model before compiling anything."""
  size = config.data.image_size
  init = seeds.initial_state(config, lambda seed: init_state(config, model, (size, size, 3),
                                                             config.model.num_classes, seed))
  init = jax.jit(init, out_shardings=mesh_lib.replicated(mesh))
  return jax.eval_shape(init) if abstract else init()


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def update(config, model, state: TrainState, x, y) -> TrainState:
  """One SGD update on a ready batch: `x` augmented float32 images, `y` labels (both sharded over the mesh)."""

  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                                   mutable=['batch_stats'])
    loss = cross_entropy(logits, y).mean()
    scaled = loss if state.loss_scale is None else loss * state.loss_scale['scale']
    return scaled, (loss, logits, new_vars['batch_stats'])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  loss_scale = state.loss_scale
  if loss_scale is not None:
    grads, finite, loss_scale = recipe.update_loss_scale(config, loss_scale, grads)
  lr = recipe.learning_rate(config, state.step, state.warmup_done)
  updates, opt_state = recipe.make_optimizer(config, state.params, lr).update(grads, state.opt_state, state.params)
  size = recipe.step_size(config, lr)
  params = jax.tree_util.tree_map(lambda p, u: p - size * u, state.params, updates)
  if loss_scale is not None:  # an overflowing step changes nothing but the scale
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state, batch_stats = keep((params, opt_state, batch_stats),
                                          (state.params, state.opt_state, state.batch_stats))

  errors = jnp.sum(jnp.argmax(logits, -1) != y).astype(jnp.float32)
  n = float(config.batch_size)
  warmup_done, error_ema = recipe.update_warmup(config, state.step, state.warmup_done, state.error_ema, errors / n)
  sums = state.train_sums
  sums = {**sums, 'loss': sums['loss'] + loss * n, 'errors': sums['errors'] + errors, 'count': sums['count'] + n,
          'lr': lr}
  new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                   warmup_done=warmup_done, error_ema=error_ema, train_sums=sums, loss_scale=loss_scale)
  return guard_nonfinite(config, state, new, loss)


def guard_nonfinite(config, old: TrainState, new: TrainState, loss) -> TrainState:
  """Counts a step whose loss or updated parameters are not finite (`train_sums['nonfinite']`, and the first such
  step in `first_nonfinite`). config.nonfinite_loss='stop' keeps the update: the loop stops at its next log or
  checkpoint point. 'skip' drops it: everything stays as before the step except the step counter (the run moves on
  to the next batch) and the counts."""
  finite = jnp.isfinite(loss)
  for p in jax.tree_util.tree_leaves(new.params):
    finite = finite & jnp.all(jnp.isfinite(p))
  counts = {'nonfinite': old.train_sums['nonfinite'] + (~finite).astype(jnp.int32),
            'first_nonfinite': jnp.where((old.train_sums['first_nonfinite'] == 0) & ~finite, new.step,
                                         old.train_sums['first_nonfinite'])}
  if config.nonfinite_loss == 'skip':
    skipped = old.replace(step=new.step, train_sums={**old.train_sums, 'lr': new.train_sums['lr']})
    new = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, skipped)
  return new.replace(train_sums={**new.train_sums, **counts})


def make_step(config, model, mesh, inp):
  """The step as the run calls it: step(state, *inputs) -> state, where `inputs` are what `inp` feeds per step and
  `inp.device_batch` turns into the batch inside the step (for the run's seed, or for each of several seeds)."""
  batch = mesh_lib.batch_sharding(mesh)

  def step(state, seed, *inputs):
    x, y = inp.device_batch(state.step, *inputs, seed=seed)
    x, y = (jax.lax.with_sharding_constraint(a, batch) for a in (x, y))
    return update(config, model, state, x, y)

  return seeds.over_replicas(config, mesh, step)
