"""`train_and_evaluate(config, workdir)`: the whole run, importable from a notebook. main.py only parses flags."""
import json
import math
import os
import signal
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import augment, checkpoint, data, metrics_io, models, plotting, train


class NonFiniteLossError(FloatingPointError):
  pass


class _StopRequest:
  """Turns SIGTERM/SIGINT into a request honoured between steps: checkpoint, then exit cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels): leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f'The workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir.') from e


def _summarise(sums: dict, prefix: str) -> dict:
  sums = jax.device_get(sums)
  count = float(sums['count'])
  return {f'{prefix}_loss': float(sums['loss']) / count, f'{prefix}_error': float(sums['errors']) / count}


def train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the last metrics written."""
  if config.data.get('streaming', False):  # ImageNet: batches stream from disk (imagenet_input.py)
    return train_and_evaluate_streaming(config, workdir, force_resume, devices)
  mesh = train.make_mesh(devices)
  num_devices = mesh.devices.size
  train.validate(config, num_devices)
  models.validate_model_config(config.model)
  _check_workdir(workdir)
  is_main = jax.process_index() == 0

  ds = data.load(config.data)
  if ds.num_classes != config.model.num_classes:
    raise ValueError(f'The dataset has {ds.num_classes} classes but config.model.num_classes='
                     f'{config.model.num_classes}.')
  if len(ds.train_labels) < config.batch_size:
    raise ValueError(f'The training split has {len(ds.train_labels)} examples, fewer than config.batch_size='
                     f'{config.batch_size}.')

  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  config_path = os.path.join(workdir, 'config.json')
  start_step = ckpt.latest_step() or 0
  if start_step and os.path.exists(config_path) and not force_resume:
    with open(config_path) as f:
      checkpoint.check_resume_config(json.load(f), config)
  if is_main:
    with open(config_path + '.tmp', 'w') as f:
      json.dump(checkpoint.config_to_dict(config), f, indent=2)
    os.replace(config_path + '.tmp', config_path)

  replicated = NamedSharding(mesh, P())
  mean = augment.pixel_mean(ds.train_images)
  train_images, train_labels, mean_d = (jax.device_put(a, replicated) for a in
                                        (ds.train_images, ds.train_labels, mean))
  eval_splits = {}
  for name, images, labels in (('val', ds.val_images, ds.val_labels), ('test', ds.test_images, ds.test_labels)):
    if images is not None:
      eval_splits[name] = train.place_split(mesh, images, labels, config.eval_batch_size)

  state = jax.jit(lambda: train.init_state(config, model, ds.train_images.shape[1:], ds.num_classes),
                  out_shardings=replicated)()
  if start_step:
    state = ckpt.restore(state)
    if is_main:
      print(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
  step_fn = train.make_train_step(config, model, mesh)
  eval_fn = train.make_eval_fn(model, mesh)

  writer = metrics_io.MetricsWriter(workdir, start_step, enabled=is_main)
  progress = metrics_io.Progress(config.num_steps, start_step, enabled=is_main)
  if is_main:
    print(f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} '
          f'({config.model.family}) on {len(ds.train_labels)} images of {config.data.dataset}, '
          f'{num_devices} device(s) ({jax.devices()[0].platform}), batch {config.batch_size}, '
          f'{config.num_steps} steps, workdir {workdir}', flush=True)

  last = {}
  window_start, window_step = time.time(), start_step
  step = start_step
  with _StopRequest() as stop:
    while step < config.num_steps:
      state = step_fn(state, train_images, train_labels, mean_d)
      step += 1
      final = step == config.num_steps
      row = {}
      if step % config.log_every_steps == 0 or final or stop.signal:
        sums = state.train_sums  # this device_get is the loop's only host sync between log points
        row.update(_summarise(sums, 'train'))
        row['lr'] = float(jax.device_get(sums['lr']))
        now = time.time()
        row['examples_per_sec'] = (step - window_step) * config.batch_size / max(now - window_start, 1e-9)
        window_start, window_step = now, step
        state = state.replace(train_sums=jax.device_put(train.zero_sums(), replicated))
        if not math.isfinite(row['train_loss']):
          ckpt.wait()
          good = ckpt.latest_step()
          raise NonFiniteLossError(
              f'The training loss is {row["train_loss"]} at step {step}. Last good checkpoint: '
              + (f'step {good} in {ckpt.directory}' if good is not None else 'none') + '. Lower the learning rate, '
              'use float32, or check the data.')
      if step % config.eval_every_steps == 0 or final:
        for name, batches in eval_splits.items():
          row.update(_summarise(eval_fn(state, batches, mean_d), name))
      if row:
        writer.write(step, row)
        progress.print(step, row)
        last = {'step': step, **row}
      if step % config.checkpoint_every_steps == 0 or final or stop.signal:
        ckpt.save(state, force=bool(stop.signal))
      if stop.signal and not final:
        ckpt.wait()
        if is_main:
          print(f'Stopped by signal {stop.signal} at step {step}; checkpoint written. '
                'Run the same command to resume.', flush=True)
        break
  ckpt.close()
  writer.close()
  if is_main:
    plotting.plot_curves({f'{"ResNet" if config.model.residual else "plain"}-{config.model.depth}':
                          metrics_io.read_metrics(writer.path)}, os.path.join(workdir, 'curves.png'))
  return last


def train_and_evaluate_streaming(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """The run for streamed data (`config.data.streaming`, ImageNet): each step takes the next batch that
  imagenet_input's tf.data stream prepared on the host (already augmented; each host reads its shard), and the
  validation split is evaluated with the centre-crop protocol (evaluate.py). Checkpoints, logging and signals
  work as in `train_and_evaluate`; a resumed run draws a fresh shuffle (the tf.data position is not saved)."""
  from resnet_jax import evaluate, imagenet_input
  mesh = train.make_mesh(devices)
  num_devices = mesh.devices.size
  train.validate(config, num_devices)
  models.validate_model_config(config.model)
  _check_workdir(workdir)
  is_main = jax.process_index() == 0

  info = imagenet_input.split_info(config.data, 'train')
  if len(info.class_names) != config.model.num_classes:
    raise ValueError(f'The dataset has {len(info.class_names)} classes but config.model.num_classes='
                     f'{config.model.num_classes}.')
  if info.num_examples < config.batch_size:
    raise ValueError(f'The training split has {info.num_examples} examples, fewer than config.batch_size='
                     f'{config.batch_size}.')
  try:
    has_val = imagenet_input.split_info(config.data, 'val').num_examples > 0
  except data.DatasetNotFoundError:
    has_val = False

  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
  config_path = os.path.join(workdir, 'config.json')
  start_step = ckpt.latest_step() or 0
  if start_step and os.path.exists(config_path) and not force_resume:
    with open(config_path) as f:
      checkpoint.check_resume_config(json.load(f), config)
  if is_main:
    with open(config_path + '.tmp', 'w') as f:
      json.dump(checkpoint.config_to_dict(config), f, indent=2)
    os.replace(config_path + '.tmp', config_path)

  replicated = NamedSharding(mesh, P())
  mean = imagenet_input.input_mean(config.data, workdir)
  size = config.data.image_size
  state = jax.jit(lambda: train.init_state(config, model, (size, size, 3), config.model.num_classes),
                  out_shardings=replicated)()
  if start_step:
    state = ckpt.restore(state)
    if is_main:
      print(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
  step_fn = train.make_batch_train_step(config, model, mesh)
  stream = imagenet_input.train_dataset(config, mean, seed_offset=start_step).as_numpy_iterator()
  batches = imagenet_input.prefetch_to_device(stream, NamedSharding(mesh, P(train.DATA_AXIS)),
                                              config.data.prefetch_to_device)

  writer = metrics_io.MetricsWriter(workdir, start_step, enabled=is_main)
  progress = metrics_io.Progress(config.num_steps, start_step, enabled=is_main)
  if is_main:
    print(f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} '
          f'({config.model.family}) on {info.num_examples} images of {config.data.dataset} (streamed), '
          f'{num_devices} device(s) ({jax.devices()[0].platform}), batch {config.batch_size}, '
          f'{config.num_steps} steps, workdir {workdir}', flush=True)

  last = {}
  window_start, window_step = time.time(), start_step
  step = start_step
  with _StopRequest() as stop:
    while step < config.num_steps:
      images, labels = next(batches)
      state = step_fn(state, images, labels)
      step += 1
      final = step == config.num_steps
      row = {}
      if step % config.log_every_steps == 0 or final or stop.signal:
        sums = state.train_sums
        row.update(_summarise(sums, 'train'))
        row['lr'] = float(jax.device_get(sums['lr']))
        now = time.time()
        row['examples_per_sec'] = (step - window_step) * config.batch_size / max(now - window_start, 1e-9)
        window_start, window_step = now, step
        state = state.replace(train_sums=jax.device_put(train.zero_sums(), replicated))
        if not math.isfinite(row['train_loss']):
          ckpt.wait()
          good = ckpt.latest_step()
          raise NonFiniteLossError(
              f'The training loss is {row["train_loss"]} at step {step}. Last good checkpoint: '
              + (f'step {good} in {ckpt.directory}' if good is not None else 'none') + '. Lower the learning rate, '
              'use float32, or check the data.')
      if has_val and (step % config.eval_every_steps == 0 or final):
        r = evaluate.evaluate(config, model, evaluate.local_variables(state), mean, 'center')
        row.update(val_loss=r['loss'], val_error=r['top1_error'], val_top5_error=r['top5_error'])
      if row:
        writer.write(step, row)
        progress.print(step, row)
        last = {'step': step, **row}
      if step % config.checkpoint_every_steps == 0 or final or stop.signal:
        ckpt.save(state, force=bool(stop.signal))
      if stop.signal and not final:
        ckpt.wait()
        if is_main:
          print(f'Stopped by signal {stop.signal} at step {step}; checkpoint written. '
                'Run the same command to resume.', flush=True)
        break
  ckpt.close()
  writer.close()
  if is_main:
    plotting.plot_curves({f'{"ResNet" if config.model.residual else "plain"}-{config.model.depth}':
                          metrics_io.read_metrics(writer.path)}, os.path.join(workdir, 'curves.png'))
  return last
