"""Evaluate a checkpoint with the testing protocols of Sec. 3.4, without training:

  python -m resnet_jax.evaluate --config=configs/imagenet_50.py --workdir=DIR --protocol=10crop \
      [--step=N] [--recalibrate_bn=N] [--limit=N] [--config.FIELD=VALUE ...]

Protocols:
  center      the 224 centre crop of the image with its shorter side resized to 256.
  10crop      four corners and centre of that image and their flips; softmax probabilities averaged (AlexNet).
  multiscale  fully-convolutional: the whole image with its shorter side at each of {224, 256, 384, 480, 640}; the
              fc layer is applied at every position of a 7x7 average pool (the training crop's receptive field),
              the class scores averaged over positions, softmaxed, and the probabilities averaged over scales.
Top-1 and top-5 error are exact: sums of errors and a count, every validation image counted once (padding masked).
Writes WORKDIR/eval_<protocol>_step<N>.json.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import checkpoint, imagenet_input, models, train

DATA_AXIS = train.DATA_AXIS


class CheckpointNotFoundError(FileNotFoundError):
  pass


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


_EVAL_FNS = {}  # (id(model), protocol, window, devices) -> (model, jitted fn): evaluations during training reuse it


def _eval_fn(model, protocol: str, window: int, mesh):
  key = (id(model), protocol, window, tuple(d.id for d in mesh.devices.flat))
  if key not in _EVAL_FNS:
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    if protocol == 'multiscale':  # one image: every device computes it (a batch of 1 cannot be split)
      fn = jax.jit(lambda v, xs, y, m: _sums(multiscale_log_probs(model, v, xs, window), y, m))
    else:
      fn = jax.jit(lambda v, x, y, m: _sums(crop_log_probs(model, v, x), y, m),
                   in_shardings=(replicated, batch, batch, batch), out_shardings=replicated)
    _EVAL_FNS[key] = (model, fn)  # holding the model keeps its id from being reused
  return _EVAL_FNS[key][1]


def evaluate(config, model, variables, mean, protocol: str, limit: int = 0, split: str = 'val') -> dict:
  """Exact loss, top-1 and top-5 error of `variables` on the split under `protocol`. Each host evaluates its shard
  on its local devices; the sums are added over hosts."""
  mesh = Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  bs, d = config.eval_batch_size, mesh.devices.size
  if protocol != 'multiscale' and bs % d:
    raise ValueError(f'config.eval_batch_size={bs} is not divisible by the {d} local devices.')
  if protocol == '10crop':  # ten views per image: a tenth of the images per batch, so a batch has the same size
    bs = max(d, bs // 10 // d * d)

  window = max(1, config.data.image_size // 32)  # the final map of a training crop (7 for 224)
  fn = _eval_fn(model, protocol, window, mesh)
  total = None
  for b in imagenet_input.eval_batches(config, mean, protocol, bs, split, limit=limit):
    if protocol == 'multiscale':
      xs = tuple(b[f'images_{s}'] for s in config.data.multiscale_sizes)
      sums = fn(variables, xs, b['labels'], b['mask'])
    else:
      sums = fn(variables, b['images'], b['labels'], b['mask'])
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  total = {k: float(v) for k, v in jax.device_get(total).items()}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = {k: float(np.sum(multihost_utils.process_allgather(np.float64(v)))) for k, v in total.items()}
  n = total['count']
  return {'loss': total['loss'] / n, 'top1_error': total['top1_errors'] / n, 'top5_error': total['top5_errors'] / n,
          'count': int(n)}


def restore_state(config, workdir: str, step: int | None = None):
  """The TrainState of WORKDIR/checkpoints at `step` (default: the latest); a clear error when there is none."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = checkpoint.Checkpointer(workdir).all_steps() if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise CheckpointNotFoundError(
        f'No checkpoint under {ckpt_dir}. Train one (python -m resnet_jax.main --config=... --workdir={workdir}) '
        'or convert torchvision weights into it (python -m resnet_jax.torchvision_weights --help).')
  if step is not None and step not in steps:
    raise CheckpointNotFoundError(f'No checkpoint of step {step} under {ckpt_dir}; it has steps {steps}.')
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  mesh = train.make_mesh()
  size = config.data.image_size
  template = jax.jit(lambda: train.init_state(config, model, (size, size, 3), config.model.num_classes),
                     out_shardings=NamedSharding(mesh, P()))()
  ckpt = checkpoint.Checkpointer(workdir)
  state = ckpt.restore(template, step)
  ckpt.close()
  return model, state


def run(config, workdir: str, protocol: str, step: int | None = None, recalibrate_bn: int = 0,
        limit: int = 0) -> dict:
  if protocol not in imagenet_input.PROTOCOLS:
    raise ValueError(f'Unknown --protocol {protocol!r}; valid choices: {", ".join(imagenet_input.PROTOCOLS)}.')
  models.validate_model_config(config.model)
  model, state = restore_state(config, workdir, step)
  mean = imagenet_input.input_mean(config.data, workdir)
  variables = local_variables(state)
  if recalibrate_bn:
    from resnet_jax import bn_recalibration
    variables = bn_recalibration.recalibrate_from_config(config, model, variables, mean, recalibrate_bn)
  result = evaluate(config, model, variables, mean, protocol, limit=limit)
  result.update(protocol=protocol, step=int(jax.device_get(state.step)), recalibrate_bn=recalibrate_bn)
  if jax.process_index() == 0:
    suffix = f'_bn{recalibrate_bn}' if recalibrate_bn else ''
    path = os.path.join(workdir, f'eval_{protocol}_step{result["step"]}{suffix}.json')
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'{protocol}: top-1 error {100 * result["top1_error"]:.2f}%, top-5 error {100 * result["top5_error"]:.2f}% '
          f'on {result["count"]} images (step {result["step"]}); written to {path}', flush=True)
  return result


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required, e.g. --config=configs/imagenet_50.py '
                         '--workdir=runs/imagenet_50 --protocol=10crop')
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
  try:
    run(_CONFIG.value, _WORKDIR.value, _PROTOCOL.value, _STEP.value, _RECAL.value, _LIMIT.value)
  except (ValueError, CheckpointNotFoundError, imagenet_input.DatasetNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s directory (checkpoints under it).')
  _PROTOCOL = flags.DEFINE_enum('protocol', 'center', list(imagenet_input.PROTOCOLS), 'Testing protocol (Sec. 3.4).')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  _RECAL = flags.DEFINE_integer('recalibrate_bn', 0, 'Recompute BN mean/variance over this many training examples '
                                'before evaluating (bn_recalibration.py); 0 keeps the moving averages.')
  _LIMIT = flags.DEFINE_integer('limit', 0, 'Evaluate only the first N validation images (0: all).')
  app.run(main)
