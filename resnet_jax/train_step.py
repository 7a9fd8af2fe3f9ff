"""The training step, pure: an explicit `TrainState`, the recipe's pieces, and the one jitted step built from them.

What the step does: the input (input_pipeline.py) turns its inputs into the step's batch, sharded over the mesh;
the update (`sgd_update`) runs the network in training mode, SGD with momentum and weight decay at the learning
rate of `learning_rate` (the recipe of Sec. 4.2 / 3.4), and adds the loss and errors to the open log window. The
state is replicated; `jax.jit` over the mesh makes the compiler insert the gradient all-reduce. BatchNorm
statistics are grouped by `config.bn_group_size` (batchnorm.py). The loop around the step is train_loop.py.
"""
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from resnet_jax import mesh as mesh_lib, models


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


# ---------------------------------------------------------------------------------------------------------------
# Recipe pieces: optimiser and learning rate.

def weight_decay_mask(params, which: str):
  """None (every parameter decays) for 'all'; for 'kernels', True at the conv and fc weights only."""
  if which == 'all':
    return None
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


MOMENTUM_FORMS = ('caffe', 'pytorch')
MATMUL_PRECISIONS = ('highest', 'high', 'default')  # jax.default_matmul_precision values (config.matmul_precision)


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


def learning_rate(config, step, warmup_done):
  """lr of the update at `step` (0-based): config.learning_rate times lr_decay_factor for each boundary b with
  step >= b (optax's piecewise-constant schedule); the warm-up lr until `warmup_done` when config.warmup.enabled."""
  schedule = optax.piecewise_constant_schedule(
      config.learning_rate, {int(b): config.lr_decay_factor for b in config.lr_boundaries})
  lr = schedule(step)
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
# State and steps.

def zero_sums():
  return {'loss': jnp.zeros((), jnp.float32), 'errors': jnp.zeros((), jnp.float32),
          'count': jnp.zeros((), jnp.float32), 'lr': jnp.zeros((), jnp.float32),
          'nonfinite': jnp.zeros((), jnp.int32), 'first_nonfinite': jnp.zeros((), jnp.int32)}


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


def replica_seeds(config) -> list[int]:
  """The seeds of the replicas a run trains together: config.seed, config.seed + 1, ..., + config.num_seeds - 1."""
  return [config.seed + k for k in range(config.num_seeds)]


def init_state(config, model, image_shape, num_classes: int, seed=None) -> TrainState:
  """The initial state of one replica: the network initialised from `seed` (a traced value under vmap), or from
  config.seed when it is None."""
  seed = config.seed if seed is None else seed
  variables = model.init(jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=make_optimizer(config, params).init(params),
                    warmup_done=jnp.asarray(not config.warmup.enabled),
                    error_ema=jnp.asarray(1.0 - 1.0 / num_classes, jnp.float32), train_sums=zero_sums(),
                    loss_scale=init_loss_scale(config))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sgd_update(config, model, state: TrainState, x, y):
  """The update on one ready batch: `x` augmented float32 images, `y` labels (both sharded over the mesh)."""

  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                                   mutable=['batch_stats'])
    loss = cross_entropy(logits, y).mean()
    scaled = loss if state.loss_scale is None else loss * state.loss_scale['scale']
    return scaled, (loss, logits, new_vars['batch_stats'])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  loss_scale = state.loss_scale
  if loss_scale is not None:
    grads, finite, loss_scale = update_loss_scale(config, loss_scale, grads)
  lr = learning_rate(config, state.step, state.warmup_done)
  updates, opt_state = make_optimizer(config, state.params, lr).update(grads, state.opt_state, state.params)
  size = step_size(config, lr)
  params = jax.tree_util.tree_map(lambda p, u: p - size * u, state.params, updates)
  if loss_scale is not None:  # an overflowing step changes nothing but the scale
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state, batch_stats = keep((params, opt_state, batch_stats),
                                          (state.params, state.opt_state, state.batch_stats))

  errors = jnp.sum(jnp.argmax(logits, -1) != y).astype(jnp.float32)
  n = float(config.batch_size)
  warmup_done, error_ema = update_warmup(config, state.step, state.warmup_done, state.error_ema, errors / n)
  sums = state.train_sums
  sums = {**sums, 'loss': sums['loss'] + loss * n, 'errors': sums['errors'] + errors, 'count': sums['count'] + n,
          'lr': lr}
  new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                   warmup_done=warmup_done, error_ema=error_ema, train_sums=sums, loss_scale=loss_scale)
  return guard_nonfinite(config, state, new, loss)


NONFINITE_POLICIES = ('stop', 'skip')


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


SEED_BATCHING = ('auto', 'vmap', 'unroll')


def seed_batching(config, mesh) -> str:
  """'vmap' or 'unroll' for the mesh's devices: config.seed_batching, with 'auto' unrolling on the CPU (whose
  grouped convolutions, what vmap makes of the seeds' convolutions, run in XLA's slow generic loop)."""
  if config.seed_batching != 'auto':
    return config.seed_batching
  return 'unroll' if mesh.devices.flat[0].platform == 'cpu' else 'vmap'


class TrainSteps:
  """The jitted training step of every run, called as `steps(state, n, *inputs) -> state` to take n steps, where
  `inputs` are what the input `inp` (input_pipeline.py) feeds and `inp.device_batch` turns into each step's batch,
  inside the step. The state is replicated and donated; the batch is sharded over the mesh, and the compiler
  inserts the gradient all-reduce.

  How the n steps of a call run, with config.steps_per_call = N:
    N = 1 (the default), on the CPU and for the streamed input (a new batch each step): one program of one step,
      called n times. XLA:CPU runs convolution gradients inside a loop body in its slow generic loop (28x slower
      for ResNet-20), and a CPU step is long enough that calling it from Python costs nothing.
    N > 1 on GPUs and TPUs (`device_loop`), for an input whose step inputs are the same every step (the in-memory
      sets: the batch is a function of the step number, which the state carries): in a `fori_loop` on the device.
      A call of N steps is one program with the trip count fixed at compile time (the device runs it without the
      host between steps); a shorter call (up to a log, evaluation or checkpoint point) one program with the count
      as an argument. Both run the same loop body, and XLA compiles a loop body alike whatever its trip count, so
      the run gives the same bits however it is cut into calls, and any N > 1 the same bits as any other. A lone
      step outside a loop XLA compiles differently: N = 1 and N > 1 differ in float rounding, as runs on different
      device counts do.

  With config.num_seeds = K > 1 the state has a leading K axis and the step is the one-replica step applied to each
  replica with its seed (the data inputs are shared): each replica draws its own batch, augmentation, BN
  statistics, lr and non-finite handling. `seed_batching` decides how: vmapped over the replica axis (each
  replica's batch is still sharded over the mesh: vmap leaves the replica axis of the sharding constraints
  unconstrained), or unrolled, one replica after the other in the same program."""

  def __init__(self, config, model, mesh, inp, device_loop: bool | None = None):
    replicated, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)

    def replica_step(state, seed, *inputs):
      x, y = inp.device_batch(state.step, *inputs, seed=seed)
      x, y = (jax.lax.with_sharding_constraint(a, batch) for a in (x, y))
      return sgd_update(config, model, state, x, y)

    if config.num_seeds == 1:
      step = lambda state, *inputs: replica_step(state, config.seed, *inputs)
    elif seed_batching(config, mesh) == 'vmap':
      def step(state, *inputs):
        seeds = jnp.asarray(replica_seeds(config), jnp.int32)
        return jax.vmap(replica_step, in_axes=(0, 0) + (None,) * len(inputs))(state, seeds, *inputs)
    else:
      def step(state, *inputs):
        outs = [replica_step(jax.tree_util.tree_map(lambda a: a[k], state), seed, *inputs)
                for k, seed in enumerate(replica_seeds(config))]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

    jit = lambda fn, *counts: jax.jit(fn, in_shardings=(replicated, *counts, *inp.input_shardings),
                                      out_shardings=replicated, donate_argnums=(0,))
    self.per_call = config.steps_per_call
    if device_loop is None:
      device_loop = mesh.devices.flat[0].platform != 'cpu'
    self.device_loop = bool(device_loop) and self.per_call > 1 and not config.data.streaming
    if not self.device_loop:
      self._full, self._any, self.steps_per_program = jit(step), None, 1
      return
    loop = lambda state, n, *inputs: jax.lax.fori_loop(0, n, lambda _, s: step(s, *inputs), state)
    self._full = jit(lambda state, *inputs: loop(state, self.per_call, *inputs))
    self._any = jit(loop, replicated)
    self.steps_per_program = self.per_call

  def __call__(self, state, n: int, *inputs):
    """The state after n steps (1 <= n <= steps_per_call)."""
    if not self.device_loop:
      for _ in range(n):
        state = self._full(state, *inputs)
      return state
    if n == self.per_call:
      return self._full(state, *inputs)
    return self._any(state, np.int32(n), *inputs)

  def lower(self, state, *inputs):
    """The lowered program of a full call: `steps_per_program` steps (steps_per_call with the device loop, else 1);
    compiled, it is called as (state, *inputs)."""
    return self._full.lower(state, *inputs)


def create_model_and_state(config, mesh, abstract: bool = False):
  """(model, TrainState) of `config`: the network `config.model` names and its initial state, replicated over
  `mesh`. With `abstract`, the state is shapes, dtypes and shardings only (nothing computed): the template a
  checkpoint restores into, and a way to refuse a checkpoint of another model before compiling anything.
  With config.num_seeds = K > 1, the K replicas' states stacked on a leading axis, replica k initialised from
  seed config.seed + k."""
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  size = config.data.image_size
  one = lambda seed=None: init_state(config, model, (size, size, 3), config.model.num_classes, seed)
  if config.num_seeds == 1:
    fn = one
  else:
    fn = lambda: jax.vmap(one)(jnp.asarray(replica_seeds(config), jnp.int32))
  init = jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))
  return model, (jax.eval_shape(init) if abstract else init())
