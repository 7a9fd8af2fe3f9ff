"""The training step: pure functions over an explicit `TrainState`, and the one jitted step built from them.

What the step does: the input (input_pipeline.py) turns its inputs into the step's batch, sharded over the mesh;
the update (`sgd_update`) runs the network in training mode, SGD with momentum and weight decay at the learning
rate of `learning_rate` (the recipe of Sec. 4.2 / 3.4), and adds the loss and errors to the open log window. The
state is replicated; `jax.jit` over the mesh makes the compiler insert the gradient all-reduce. BatchNorm
statistics are grouped by `config.bn_group_size` (batchnorm.py). The loop around it is trainer.py.
"""
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import models

DATA_AXIS = 'data'


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
# Validation of the run's shape against the hardware.

def validate(config, num_devices: int) -> None:
  """Raises ValueError with what to change when the batch, groups or steps do not fit."""
  b, g = config.batch_size, config.bn_group_size
  for name in ('batch_size', 'num_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'eval_batch_size'):
    if config[name] <= 0:
      raise ValueError(f'config.{name}={config[name]} must be positive.')
  if config.num_seeds < 1:
    raise ValueError(f'config.num_seeds={config.num_seeds} must be at least 1: the number of seeds trained together '
                     f'(config.seed, config.seed + 1, ...).')
  if config.seed_batching not in SEED_BATCHING:
    raise ValueError(f'Unknown config.seed_batching {config.seed_batching!r}; valid choices: '
                     f'{", ".join(SEED_BATCHING)}.')
  if config.num_seeds > 1 and config.data.streaming:
    raise ValueError(f'config.num_seeds={config.num_seeds} needs an in-memory dataset: the streamed input draws one '
                     'data order for the whole run, not one per seed. Train each seed in its own run.')
  if config.learning_rate <= 0:
    raise ValueError(f'config.learning_rate={config.learning_rate} must be positive.')
  if config.nonfinite_loss not in NONFINITE_POLICIES:
    raise ValueError(f'Unknown config.nonfinite_loss {config.nonfinite_loss!r}; valid choices: '
                     f'{", ".join(NONFINITE_POLICIES)}.')
  if config.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f'Unknown config.matmul_precision {config.matmul_precision!r}; valid choices: '
                     f'{", ".join(MATMUL_PRECISIONS)}.')
  if config.momentum_form not in MOMENTUM_FORMS:
    raise ValueError(f'Unknown config.momentum_form {config.momentum_form!r}; valid choices: '
                     f'{", ".join(MOMENTUM_FORMS)}.')
  if b % num_devices:
    raise ValueError(f'config.batch_size={b} is not divisible by the {num_devices} devices; use a multiple of '
                     f'{num_devices} (e.g. {num_devices * max(1, round(b / num_devices))}).')
  if config.eval_batch_size % num_devices:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} '
                     'devices.')
  if g < 0 or g > b:
    raise ValueError(f'config.bn_group_size={g} must be between 0 (whole batch) and config.batch_size={b}.')
  if g and b % g:
    divisors = [d for d in range(2, b) if b % d == 0][-2:]
    raise ValueError(f'config.bn_group_size={g} does not divide config.batch_size={b}; use a divisor of it '
                     f'(e.g. {" or ".join(map(str, divisors)) or b}) or 0 for the whole batch.')
  ls = config.loss_scale
  if ls.enabled and config.model.dtype != 'float16':
    raise ValueError(f'config.loss_scale.enabled applies to float16 compute only, but config.model.dtype='
                     f'{config.model.dtype!r}; set --config.model.dtype=float16 or disable loss scaling.')
  if ls.enabled and (ls.initial <= 0 or ls.factor <= 1 or ls.growth_interval <= 0):
    raise ValueError('config.loss_scale needs initial > 0, factor > 1 and growth_interval > 0.')
  per_device = b // num_devices
  if g and per_device % g and g % per_device:
    raise ValueError(f'config.bn_group_size={g} neither divides nor is a multiple of the {per_device} examples '
                     f'per device ({b} over {num_devices} devices): a group would straddle devices unevenly.')


# ---------------------------------------------------------------------------------------------------------------
# Recipe pieces: optimiser and learning rate.

def weight_decay_mask(params, which: str):
  if which == 'all':
    return None
  if which == 'kernels':
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)
  raise ValueError(f"Unknown config.weight_decay_on {which!r}; valid choices: all, kernels.")


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


def batch_indices(config, num_examples: int, step, seed=None):
  """The indices of `step`'s batch: epochs are reshuffled from `seed` (config.seed when None; a traced value under
  vmap); the last partial batch of an epoch is skipped (as a data loader with drop_last), so every batch has exactly
  config.batch_size examples."""
  steps_per_epoch = num_examples // config.batch_size
  epoch, within = step // steps_per_epoch, step % steps_per_epoch
  data_key = jax.random.fold_in(jax.random.key(config.seed if seed is None else seed), 1)
  perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, within * config.batch_size, config.batch_size)


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


def make_train_step(config, model, mesh, inp):
  """The jitted training step of every run: `step(state, *inputs) -> state`, where `inputs` are what the input
  `inp` (input_pipeline.py) feeds for the step and `inp.device_batch` turns them into the batch, inside the step.
  The state is replicated and donated; the batch is sharded over the mesh, and the compiler inserts the gradient
  all-reduce.

  With config.num_seeds = K > 1 the state has a leading K axis and the step is the one-replica step applied to each
  replica with its seed (the data inputs are shared): each replica draws its own batch, augmentation, BN
  statistics, lr and non-finite handling. `seed_batching` decides how: vmapped over the replica axis (each
  replica's batch is still sharded over the mesh: vmap leaves the replica axis of the sharding constraints
  unconstrained), or unrolled, one replica after the other in the same program."""
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, batch_spec(mesh))

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

  return jax.jit(step, in_shardings=(replicated, *inp.input_shardings), out_shardings=replicated,
                 donate_argnums=(0,))


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
  init = jax.jit(fn, out_shardings=NamedSharding(mesh, P()))
  return model, (jax.eval_shape(init) if abstract else init())


def make_mesh(devices=None, mesh_config=None) -> Mesh:
  """The device mesh: `config.mesh.axes` and `.shape` (one -1 takes the remaining devices); by default a single
  `data` axis over every device. Training is data-parallel over all axes (see `batch_spec`); a second axis such as
  ('replica', 'data') lets the compiler reduce gradients hierarchically (within a slice or host, then across)."""
  devices = np.asarray(devices if devices is not None else jax.devices()).ravel()
  axes, shape = (DATA_AXIS,), (-1,)
  if mesh_config is not None:
    axes, shape = tuple(mesh_config.axes), tuple(int(d) for d in mesh_config.shape)
  if len(axes) != len(shape) or len(set(axes)) != len(axes) or shape.count(-1) > 1 or \
      any(d == 0 or d < -1 for d in shape):
    raise ValueError(f'config.mesh: axes={axes} and shape={shape} need one distinct name per dimension and sizes '
                     '>= 1, with at most one -1 (the remaining devices); e.g. axes=("data",), shape=(-1,).')
  known = int(np.prod([d for d in shape if d != -1]))
  if devices.size % known or (-1 not in shape and known != devices.size):
    raise ValueError(f'config.mesh.shape={shape} does not fit the {devices.size} devices: the sizes must multiply '
                     f'to {devices.size} (use -1 for one axis to take the rest).')
  return Mesh(devices.reshape(tuple(devices.size // known if d == -1 else d for d in shape)), axes)


def batch_spec(mesh: Mesh, *leading) -> P:
  """The PartitionSpec of a batch: its example dimension (after `leading` unsharded ones) split over every mesh
  axis, so each device holds global_batch / num_devices examples whatever the mesh's shape."""
  names = mesh.axis_names
  return P(*leading, names[0] if len(names) == 1 else tuple(names))


# ---------------------------------------------------------------------------------------------------------------
# Will the step fit in memory? (checked before training when several seeds share one program)

def step_memory_bytes(compiled) -> int | None:
  """Bytes one device needs to run the compiled step: its arguments (state, data), the outputs not aliased to
  donated arguments, and XLA's temporaries (activations, gradients), from XLA's own memory analysis. None where
  the backend does not report it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not implemented on this backend
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def available_memory_bytes(device) -> int | None:
  """What `device` may allocate: the accelerator's limit, or for CPU devices the host's available memory (which
  all of this process's CPU devices share). None when unknown."""
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    return int(stats['bytes_limit']) if 'bytes_limit' in stats else None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_memory(config, compiled, devices) -> int | None:
  """Raises ValueError, naming the estimate, when the compiled step needs more memory than the devices have.
  CPU devices share the host's memory, so their estimates add up. Returns the estimate (None when unknown)."""
  per_device = step_memory_bytes(compiled)
  have = available_memory_bytes(devices[0])
  if per_device is None or have is None:
    return per_device
  cpu = devices[0].platform == 'cpu'
  need = per_device * (len(devices) if cpu else 1)
  if need > have:
    gib = lambda b: f'{b / 2 ** 30:.2f} GiB'
    raise ValueError(
        f'The training step of config.num_seeds={config.num_seeds} seed(s) needs about {gib(need)} '
        f'({"on the host, over " + str(len(devices)) + " CPU devices" if cpu else "per device"}: XLA\'s estimate of '
        f'the state, the batch and the activations) but {gib(have)} is available. Lower config.num_seeds or '
        'config.batch_size, or train the seeds in separate runs.')
  return need
