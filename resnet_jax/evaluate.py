"""Evaluate a checkpoint with the testing protocols of Sec. 3.4, without training:

  python -m resnet_jax.evaluate --workdir=DIR --protocol=10crop [--step=N] [--recalibrate_bn=N] [--limit=N] \
      [--config.FIELD=VALUE ...]

The run's own config (DIR/config.json) says what network and data it was; an override changes only what it names
(typically where the data now lives: --config.data.data_dir=...); --config=FILE replaces it.

Protocols:
  center      the 224 centre crop of the image with its shorter side resized to 256.
  10crop      four corners and centre of that image and their flips; softmax probabilities averaged (AlexNet).
  multiscale  fully-convolutional: the whole image with its shorter side at each of {224, 256, 384, 480, 640}; the
              fc layer is applied at every position of a 7x7 average pool (the training crop's receptive field),
              the class scores averaged over positions, softmaxed, and the probabilities averaged over scales.
CIFAR and the other in-memory datasets have the single original view (center) on their test split.
Top-1 and top-5 error are exact: sums of errors and a count, every image counted once (padding masked).
Writes WORKDIR/eval_<protocol>_step<N>.json.

The evaluation core (`sum_batches`, `evaluate`) is the one training uses for its val/test rows and
experiments/fig7.py for its layer responses.
"""
import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from resnet_jax import checkpoint, cli, cpu_devices, input_pipeline, mesh as mesh_lib, run_record, validation
from resnet_jax.image_ops import PROTOCOLS
from resnet_jax.errors import ConfigError, DataError


def _sums(log_probs, labels, mask):
  """Loss and top-1/top-5 error sums of one batch from its class log-probabilities."""
  top5 = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))[1]
  hit5 = jnp.any(top5 == labels[:, None], axis=-1)
  hit1 = top5[:, 0] == labels
  log_p_true = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return {'loss': jnp.sum(-log_p_true * mask), 'top1_errors': jnp.sum((~hit1) * mask),
          'top5_errors': jnp.sum((~hit5) * mask), 'count': jnp.sum(mask)}


def _log_mean_softmax(logits, axis):
  """log of the mean over `axis` of softmax(logits), computed stably in log space."""
  log_p = jax.nn.log_softmax(logits)
  return jax.nn.logsumexp(log_p, axis=axis) - jnp.log(logits.shape[axis])


def crop_log_probs(model, variables, images):
  """(B, h, w, 3) -> log-softmax (B, classes); (B, V, h, w, 3) (e.g. the 10 crops) -> log of the mean over the V
  views of their softmax probabilities."""
  if images.ndim == 4:
    return jax.nn.log_softmax(model.apply(variables, images, train=False))
  b, v = images.shape[:2]
  logits = model.apply(variables, images.reshape((b * v,) + images.shape[2:]), train=False)
  return _log_mean_softmax(logits.reshape(b, v, -1), axis=1)


def last_block_name(model) -> str:
  return f'stage{len(model.stage_sizes)}_block{model.stage_sizes[-1]}'


def dense_scores(model, variables, images, window: int):
  """Fully-convolutional class scores (B, classes) of whole images: the last block's feature map, a `window` x
  `window` stride-1 average pool (the pool of a training crop), the fc layer at every position, scores averaged
  over positions. With the window covering the whole map this equals the network's own logits."""
  last = last_block_name(model)
  _, inter = model.apply(variables, images, train=False, mutable=['intermediates'],
                         capture_intermediates=lambda mdl, method: mdl.name == last and method == '__call__')
  feats = inter['intermediates'][last]['__call__'][0].astype(jnp.float32)
  wh, ww = min(window, feats.shape[1]), min(window, feats.shape[2])
  pooled = jax.lax.reduce_window(feats, 0.0, jax.lax.add, (1, wh, ww, 1), (1, 1, 1, 1), 'VALID') / (wh * ww)
  head = variables['params']['head']
  return (pooled @ head['kernel'] + head['bias']).mean((1, 2))


def multiscale_log_probs(model, variables, images_by_scale, window: int):
  """log of the mean over scales of the softmax of each scale's position-averaged scores."""
  scores = jnp.stack([dense_scores(model, variables, x, window) for x in images_by_scale], axis=1)
  return _log_mean_softmax(scores, axis=1)


def local_variables(state):
  """params and batch_stats as host-local single-device values (also for a multi-host replicated state)."""
  local = lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a
  return {'params': jax.tree_util.tree_map(local, state.params),
          'batch_stats': jax.tree_util.tree_map(local, state.batch_stats)}


_JITTED = {}  # (fn, devices) -> jitted fn: the evaluations during a run compile once


def sum_batches(fn, variables, batches, per_example: bool = True) -> dict:
  """The one evaluation core: `fn(variables, batch)` -> a pytree of sums over the batch's examples (masked by
  batch['mask']), added over this process's `batches` and then over the processes, in float64 on the host.

  Each process runs its own batches on its own devices (a batch split over them when `per_example`, else every
  device computes it: a batch of one image), so processes may hold different numbers of batches. Every example of
  a split is counted once when the input deals the padded batches as input_pipeline.padded_batches does."""
  mesh = mesh_lib.local_mesh()
  replicated = mesh_lib.replicated(mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh) if per_example else replicated
  key = (fn, per_example, tuple(d.id for d in mesh.devices.flat))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(fn, out_shardings=replicated)
  jitted = _JITTED[key]
  variables = jax.device_put(variables, replicated)
  total = None
  for b in batches:
    # Placed explicitly on this process's devices (jit refuses host arrays with a sharding once there are several
    # processes); the copy of the next batch overlaps the previous batch's computation.
    sums = jitted(variables, jax.device_put(b, batch_sharding))
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  if total is None:
    raise DataError('There is nothing to evaluate: the split has no examples.')
  total = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), jax.device_get(total))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = jax.tree_util.tree_map(lambda a: np.sum(multihost_utils.process_allgather(a), 0), total)
  return total


_PROTOCOL_FNS = {}  # (id(model), protocol, window) -> (model, fn); holding the model keeps its id from being reused


def _protocol_fn(model, protocol: str, window: int):
  key = (id(model), protocol, window)
  if key not in _PROTOCOL_FNS:
    if protocol == 'multiscale':
      def fn(v, b):
        xs = tuple(b[k] for k in sorted((k for k in b if k.startswith('images_')), key=lambda k: int(k[7:])))
        return _sums(multiscale_log_probs(model, v, xs, window), b['labels'], b['mask'])
    else:
      fn = lambda v, b: _sums(crop_log_probs(model, v, b['images']), b['labels'], b['mask'])
    _PROTOCOL_FNS[key] = (model, fn)
  return _PROTOCOL_FNS[key][1]


def evaluate(model, variables, batches, protocol: str = 'center', window: int = 7) -> dict:
  """Exact loss, top-1 and top-5 error of `variables` over `batches` (an input's eval_batches) under `protocol`:
  sums of errors and a count, every example once. `window` is the final feature map of a training crop, used by
  the multi-scale protocol only."""
  if protocol not in PROTOCOLS:
    raise ConfigError(f'Unknown test protocol {protocol!r}; valid choices: {", ".join(PROTOCOLS)}.')
  total = sum_batches(_protocol_fn(model, protocol, window), variables, batches,
                      per_example=protocol != 'multiscale')
  n = float(total['count'])
  return {'loss': float(total['loss']) / n, 'top1_error': float(total['top1_errors']) / n,
          'top5_error': float(total['top5_errors']) / n, 'count': int(n)}


def protocol_batch_size(config, protocol: str, num_devices: int) -> int:
  """Images per evaluation batch: config.eval_batch_size, a tenth of it for 10-crop (ten views per image, so a
  batch holds as many views), one for multi-scale (whole images of different shapes)."""
  bs = config.eval_batch_size
  if protocol == '10crop':
    return max(num_devices, bs // 10 // num_devices * num_devices)
  return 1 if protocol == 'multiscale' else bs


def run(config, workdir: str, protocol: str, step: int | None = None, recalibrate_bn: int = 0,
        limit: int = 0) -> dict:
  """Evaluates checkpoint `step` (default: the latest) of the run in `workdir` under `protocol`, on the test split
  (the validation hold-out where there is none), with the BN statistics recalibrated over `recalibrate_bn` training
  examples when it is positive; writes WORKDIR/eval_<protocol>_step<N>[_bn<M>].json."""
  if config.num_seeds > 1:
    raise ConfigError(f'config.num_seeds={config.num_seeds}: the checkpoint holds {config.num_seeds} seeds in one '
                      'state; this command evaluates a run of one seed. The training run\'s own evaluations of each '
                      'seed are in WORKDIR/seed<s>/metrics.jsonl.')
  cpu_devices.configure(config)
  mesh = mesh_lib.make_mesh(None, config.mesh)
  validation.validate(config, mesh.devices.size)
  with run_record.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():  # it writes there
    return _run_held(config, workdir, protocol, mesh, step, recalibrate_bn, limit)


def _run_held(config, workdir: str, protocol: str, mesh, step, recalibrate_bn: int, limit: int) -> dict:
  inp = input_pipeline.create(config, mesh, workdir)
  model, state, step = checkpoint.restore_from_workdir(config, workdir, mesh, step)
  variables = local_variables(state)
  if recalibrate_bn:
    from resnet_jax import bn_recalibration
    variables = bn_recalibration.recalibrate_from_input(config, model, variables, inp, recalibrate_bn)
  splits = inp.eval_splits()
  split = 'test' if 'test' in splits else (splits[0] if splits else None)
  if split is None:
    raise DataError(f'The dataset {config.data.dataset} has no held-out split to evaluate on.')
  batches = inp.eval_batches(split, protocol, protocol_batch_size(config, protocol, jax.local_device_count()),
                             limit=limit)
  result = evaluate(model, variables, batches, protocol, window=max(1, config.data.image_size // 32))
  result.update(protocol=protocol, split=split, step=step, recalibrate_bn=recalibrate_bn)
  if jax.process_index() == 0:
    suffix = f'_bn{recalibrate_bn}' if recalibrate_bn else ''
    path = os.path.join(workdir, f'eval_{protocol}_step{result["step"]}{suffix}.json')
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'{protocol}: top-1 error {100 * result["top1_error"]:.2f}%, top-5 error {100 * result["top5_error"]:.2f}% '
          f'on {result["count"]} images of {split} (step {result["step"]}); written to {path}', flush=True)
  return result


def define_flags():
  flags.DEFINE_enum('protocol', 'center', list(PROTOCOLS), 'Testing protocol (Sec. 3.4).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('recalibrate_bn', 0, 'Recompute BN mean/variance over this many training examples before '
                       'evaluating (bn_recalibration.py); 0 keeps the moving averages.')
  flags.DEFINE_integer('limit', 0, 'Evaluate only the first N held-out images (0: all).')


def main(config, workdir: str) -> None:
  if not workdir:
    raise ConfigError('--workdir is required: the training run\'s directory, e.g. --workdir=runs/imagenet_50 '
                      '--protocol=10crop.')
  f = flags.FLAGS
  run(config, workdir, f.protocol, f.step, f.recalibrate_bn, f.limit)


if __name__ == '__main__':
  cli.run(main, define_flags, workdir_help='The training run\'s directory (its config.json and checkpoints).')
