"""`train_and_evaluate(config, workdir)`: the whole run, importable from a notebook. main.py only parses flags."""
import json
import os
import signal
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import augment, checkpoint, data, distributed, faults, metrics_io, models, plotting, train


class NonFiniteLossError(FloatingPointError):
  pass


# Mistakes in the config, the data, the workdir or its checkpoints: main.py prints their message (one line, no stack
# trace) and exits with status 1. Anything else is a bug and keeps its stack trace.
USER_ERRORS = (ValueError, data.DatasetNotFoundError, PermissionError, NonFiniteLossError,
               checkpoint.NoUsableCheckpointError)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a request honoured between steps: checkpoint, then exit cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    if jax.process_count() > 1:
      return self  # several processes: SIGTERM is jax's (see distributed.preemption_reached), Ctrl-C stops at once
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels): leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _check_workdir(workdir: str) -> None:
  """Raises PermissionError unless `workdir` can be written (or created); leaves nothing behind."""
  existing = os.path.abspath(workdir)
  while not os.path.isdir(existing):  # the nearest existing ancestor is where the workdir would be created
    if os.path.exists(existing):
      raise PermissionError(f'The workdir {workdir!r} cannot be created: {existing} is a file; choose another '
                            '--workdir.')
    existing = os.path.dirname(existing)
  try:
    probe = tempfile.mkdtemp(prefix='.write_test', dir=existing)
    os.rmdir(probe)
  except OSError as e:
    raise PermissionError(f'The workdir {workdir!r} is not writable ({e.strerror} in {existing}); choose another '
                          '--workdir.') from e


def _check_resume_config(config_path: str, config, force_resume: bool) -> None:
  """A workdir belongs to one run: a config.json there must agree on the model and data fields, unless forced."""
  if os.path.exists(config_path) and not force_resume:
    try:
      with open(config_path) as f:
        saved = json.load(f)
    except ValueError as e:
      raise ValueError(f'{config_path} is not valid JSON ({e}); it records the config of the run in this workdir. '
                       'Restore it, or use another --workdir.') from e
    checkpoint.check_resume_config(saved, config)


def _write_config(config_path: str, config) -> None:
  """Records the run's config. An earlier config.json that differs (a forced resume, or a moved dataset) is
  kept as config.json.1, then .2, ..."""
  new = checkpoint.config_to_dict(config)
  if os.path.exists(config_path):
    try:
      with open(config_path) as f:
        same = json.load(f) == new
    except ValueError:  # unreadable (a forced resume does not read it): keep it too
      same = False
    if not same:
      n = 1
      while os.path.exists(f'{config_path}.{n}'):
        n += 1
      os.replace(config_path, f'{config_path}.{n}')
  with open(config_path + '.tmp', 'w') as f:
    json.dump(new, f, indent=2)
  os.replace(config_path + '.tmp', config_path)


def _check_nonfinite(config, sums: dict, step: int, ckpt, log_point: bool) -> int:
  """Raises NonFiniteLossError (naming the step and the last good checkpoint) if a step since the last log point
  was not finite under nonfinite_loss='stop', or, at a log point under 'skip', if every step of the window was
  skipped. Returns the number of non-finite steps (the skipped ones under 'skip')."""
  bad = int(sums['nonfinite'])
  if not bad:
    return 0
  first = int(sums['first_nonfinite'])
  policy = config.get('nonfinite_loss', 'stop')
  if policy == 'skip' and (float(sums['count']) > 0 or not log_point):
    return bad
  ckpt.wait()
  good = ckpt.latest_step()
  what = (f'The training loss or parameters became non-finite at step {first}' if policy == 'stop'
          else f'Every step from {first} to {step} had a non-finite loss or parameters and was skipped')
  raise NonFiniteLossError(
      f'{what} (found at step {step}). Last good checkpoint: '
      + (f'step {good} in {ckpt.directory}' if good is not None else 'none') + '. Lower --config.learning_rate, '
      'use --config.model.dtype=float32, or check the data, then run again (it resumes from that checkpoint); '
      '--config.nonfinite_loss=skip skips such steps and counts them instead.')


def _summarise(sums: dict, prefix: str) -> dict:
  sums = jax.device_get(sums)
  count = float(sums['count'])
  return {f'{prefix}_loss': float(sums['loss']) / count, f'{prefix}_error': float(sums['errors']) / count}


def _place_split(mesh, images, labels, batch_size):
  """An eval split as padded batches sharded over the devices; each process transfers only its own columns."""
  split = NamedSharding(mesh, train.batch_spec(mesh, None))
  return tuple(distributed.shard_from_host(split, a) for a in train.pad_to_batches(images, labels, batch_size))


def _start(config, workdir: str, mesh, image_shape, force_resume: bool, is_main: bool):
  """Checks the config against the workdir's, builds the model, restores the newest intact checkpoint or
  initialises, then records the config. Returns (model, checkpointer, state, start_step, replicated sharding)."""
  config_path = os.path.join(workdir, 'config.json')
  _check_resume_config(config_path, config, force_resume)
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  replicated = NamedSharding(mesh, P())
  init = jax.jit(lambda: train.init_state(config, model, image_shape, config.model.num_classes),
                 out_shardings=replicated)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)  # creates the workdir
  # Shapes and shardings are enough to restore into (and to refuse a checkpoint of another model): no compile.
  state, start_step = ckpt.restore_latest(jax.eval_shape(init), report=print if is_main else lambda _: None)
  if not start_step:
    state = init()
  if start_step and is_main:
    print(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
  distributed.barrier('config_checked')  # every process has read config.json before process 0 replaces it
  if is_main:
    _write_config(config_path, config)
  return model, ckpt, state, start_step, replicated


def train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint. Returns the last metrics written
  (with 'stopped_by_signal' when SIGTERM/SIGINT ended the run early).

  Every check of the config, the data and the workdir runs before anything is written: a mistake leaves the workdir
  as it was. A run killed at any point and started again with the same command ends as if never interrupted.
  Every step and evaluation is traced under config.matmul_precision."""
  if config.matmul_precision not in train.MATMUL_PRECISIONS:  # before jax's own, longer message
    train.validate(config, 1)
  with jax.default_matmul_precision(config.matmul_precision):
    return _train_and_evaluate(config, workdir, force_resume, devices)


def _train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  if config.data.get('streaming', False):  # ImageNet: batches stream from disk (imagenet_input.py)
    return train_and_evaluate_streaming(config, workdir, force_resume, devices)
  mesh, num_devices, is_main = _check_run(config, workdir, devices)

  ds = data.load(config.data)
  if ds.num_classes != config.model.num_classes:
    raise ValueError(f'The dataset has {ds.num_classes} classes but config.model.num_classes='
                     f'{config.model.num_classes}.')
  if len(ds.train_labels) < config.batch_size:
    raise ValueError(f'The training split has {len(ds.train_labels)} examples, fewer than config.batch_size='
                     f'{config.batch_size}.')
  model, ckpt, state, start_step, replicated = _start(config, workdir, mesh, ds.train_images.shape[1:],
                                                      force_resume, is_main)

  mean = augment.pixel_mean(ds.train_images)
  train_images, train_labels, mean_d = (jax.device_put(a, replicated) for a in
                                        (ds.train_images, ds.train_labels, mean))
  eval_splits = {}
  for name, images, labels in (('val', ds.val_images, ds.val_labels), ('test', ds.test_images, ds.test_labels)):
    if images is not None:
      eval_splits[name] = _place_split(mesh, images, labels, config.eval_batch_size)
  step_fn = train.make_train_step(config, model, mesh)
  eval_fn = train.make_eval_fn(model, mesh)

  if is_main:
    _announce(config, workdir, f'{len(ds.train_labels)} images of {config.data.dataset}', num_devices)


  def eval_rows(state, step):
    row = {}
    for i, (name, batches) in enumerate(eval_splits.items()):
      sums = eval_fn(state, batches, mean_d)
      if i == 0:
        faults.point('eval', step)
      row.update(_summarise(sums, name))
    return row

  return _run_loop(config, workdir, ckpt, state, start_step, is_main, replicated,
                   lambda state: step_fn(state, train_images, train_labels, mean_d), eval_rows)


def _check_run(config, workdir, devices):
  """The checks every run makes before touching anything: mesh, config, model, workdir. Returns the mesh, its
  device count and whether this is the process that writes logs."""
  mesh = train.make_mesh(devices, config.get('mesh'))
  train.validate(config, mesh.devices.size)
  models.validate_model_config(config.model)
  _check_workdir(workdir)
  return mesh, mesh.devices.size, jax.process_index() == 0


def _announce(config, workdir, data: str, num_devices: int) -> None:
  """The one line a run prints before its first step: network, data, devices, batch, steps, workdir."""
  print(f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} ({config.model.family}) '
        f'on {data}, {num_devices} device(s) ({jax.devices()[0].platform}) in {jax.process_count()} process(es), '
        f'batch {config.batch_size}, {config.num_steps} steps, workdir {workdir}', flush=True)


def _run_loop(config, workdir: str, ckpt, state, start_step: int, is_main: bool, replicated, next_state,
              eval_rows) -> dict:
  """The training loop both data paths share: `next_state(state)` takes one step, `eval_rows(state, step)` returns
  the evaluation entries of a metrics line. Logging, evaluation, checkpoint cadence, non-finite checks, signals and
  the final plot live here once. `replicated` is the sharding of the state."""
  writer = metrics_io.MetricsWriter(workdir, start_step, enabled=is_main)
  progress = metrics_io.Progress(config.num_steps, start_step, enabled=is_main)
  last = {}
  window_start, window_step = time.time(), start_step
  step = start_step
  with _StopRequest() as stop:
    while step < config.num_steps:
      state = next_state(state)
      step += 1
      if distributed.preemption_reached(step):  # several processes: the step all agreed on after a SIGTERM
        stop.signal = signal.SIGTERM
      faults.point('train', step)
      final = step == config.num_steps
      row = {}
      # A stop request does not add a log point: the window's sums are in the checkpoint, so the resumed run writes
      # the same lines as an uninterrupted one.
      if step % config.log_every_steps == 0 or final:
        sums = jax.device_get(state.train_sums)  # the loop's only host sync between log points
        skipped = _check_nonfinite(config, sums, step, ckpt, log_point=True)
        row.update(_summarise(sums, 'train'))
        row['lr'] = float(sums['lr'])
        if config.get('nonfinite_loss', 'stop') == 'skip':
          row['skipped_steps'] = skipped
        now = time.time()
        row['examples_per_sec'] = (step - window_step) * config.batch_size / max(now - window_start, 1e-9)
        window_start, window_step = now, step
        state = state.replace(train_sums=jax.device_put(train.zero_sums(), replicated))
      if step % config.eval_every_steps == 0 or final:
        row.update(eval_rows(state, step))
      if row:
        writer.write(step, row)
        progress.print(step, row)
        last = {'step': step, **row}
      if step % config.checkpoint_every_steps == 0 or final or stop.signal:
        # Never checkpoint a broken state.
        _check_nonfinite(config, jax.device_get(state.train_sums), step, ckpt, log_point=False)
        ckpt.save(state, force=bool(stop.signal))
      if stop.signal and not final:
        ckpt.wait()
        if is_main:
          print(f'Stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint written. '
                'Run the same command to resume.', flush=True)
        last = {**last, 'stopped_by_signal': int(stop.signal)}
        break
  ckpt.close()
  writer.close()
  if is_main:
    rows = metrics_io.read_metrics(writer.path)
    skipped = sum(r.get('skipped_steps', 0) for r in rows)
    if skipped:
      print(f'{int(skipped)} step(s) had a non-finite loss or parameters and were skipped (nonfinite_loss=skip).',
            flush=True)
    plotting.plot_curves({f'{"ResNet" if config.model.residual else "plain"}-{config.model.depth}': rows},
                         os.path.join(workdir, 'curves.png'))
  return last


def train_and_evaluate_streaming(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """The run for streamed data (`config.data.streaming`, ImageNet): each step takes the next batch that
  imagenet_input's tf.data stream prepared on the host (already augmented; each host reads its shard), and the
  validation split is evaluated with the centre-crop protocol (evaluate.py). Checkpoints, logging and signals
  work as in `train_and_evaluate`; a resumed run draws a fresh shuffle (the tf.data position is not saved)."""
  from resnet_jax import evaluate, imagenet_input
  mesh, num_devices, is_main = _check_run(config, workdir, devices)

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

  size = config.data.image_size
  model, ckpt, state, start_step, replicated = _start(config, workdir, mesh, (size, size, 3), force_resume,
                                                      is_main)
  mean = imagenet_input.input_mean(config.data, workdir)
  step_fn = train.make_batch_train_step(config, model, mesh)
  stream = imagenet_input.train_dataset(config, mean, seed_offset=start_step).as_numpy_iterator()
  batches = imagenet_input.prefetch_to_device(stream, NamedSharding(mesh, train.batch_spec(mesh)),
                                              config.data.prefetch_to_device)

  if is_main:
    _announce(config, workdir, f'{info.num_examples} images of {config.data.dataset} (streamed)', num_devices)


  def eval_rows(state, step):
    if not has_val:
      return {}
    r = evaluate.evaluate(config, model, evaluate.local_variables(state), mean, 'center')
    return dict(val_loss=r['loss'], val_error=r['top1_error'], val_top5_error=r['top5_error'])

  def next_state(state):
    images, labels = next(batches)
    return step_fn(state, images, labels)

  return _run_loop(config, workdir, ckpt, state, start_step, is_main, replicated, next_state, eval_rows)
