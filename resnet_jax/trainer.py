"""`train_and_evaluate(config, workdir)`: the whole run, importable from a notebook. main.py only parses flags."""
import json
import os
import signal
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import (checkpoint, cpu_devices, data, distributed, evaluate, input_pipeline, metrics_io, models,
                        plotting, train)


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


DATA_RECORD = 'data.json'  # what the run trains and is evaluated on: example counts per split, class names


def _data_record(inp) -> dict:
  return {f'{split}_examples': n for split, n in inp.split_sizes().items()} | {'class_names': inp.class_names}


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def _check_nonfinite(config, sums: dict, step: int, ckpt, log_point: bool, seed: int | None = None) -> int:
  """Raises NonFiniteLossError (naming the step and the last good checkpoint) if a step since the last log point
  was not finite under nonfinite_loss='stop', or, at a log point under 'skip', if every step of the window was
  skipped. Returns the number of non-finite steps (the skipped ones under 'skip')."""
  bad = int(sums['nonfinite'])
  if not bad:
    return 0
  first = int(sums['first_nonfinite'])
  policy = config.nonfinite_loss
  if policy == 'skip' and (float(sums['count']) > 0 or not log_point):
    return bad
  ckpt.wait()
  good = ckpt.latest_step()
  what = (f'The training loss or parameters became non-finite at step {first}' if policy == 'stop'
          else f'Every step from {first} to {step} had a non-finite loss or parameters and was skipped')
  if seed is not None:
    what += f' in the replica of seed {seed}'

  raise NonFiniteLossError(
      f'{what} (found at step {step}). Last good checkpoint: '
      + (f'step {good} in {ckpt.directory}' if good is not None else 'none') + '. Lower --config.learning_rate, '
      'use --config.model.dtype=float32, or check the data, then run again (it resumes from that checkpoint); '
      '--config.nonfinite_loss=skip skips such steps and counts them instead.')


def _summarise(sums: dict, prefix: str) -> dict:
  sums = jax.device_get(sums)
  count = float(sums['count'])
  return {f'{prefix}_loss': float(sums['loss']) / count, f'{prefix}_error': float(sums['errors']) / count}


def train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint. Returns the last metrics written
  (with 'stopped_by_signal' when SIGTERM/SIGINT ended the run early).

  One run for every dataset: the input (input_pipeline.py) is the only part that differs between the in-memory
  datasets and the streamed ones. Every check of the config, the data and the workdir runs before anything is
  written: a mistake leaves the workdir as it was. A run killed at any point and started again with the same
  command ends as if never interrupted (the streamed input's position is saved with each checkpoint). Every step and
  evaluation is traced under config.matmul_precision."""
  if config.matmul_precision not in train.MATMUL_PRECISIONS:  # before jax's own, longer message
    train.validate(config, 1)
  with jax.default_matmul_precision(config.matmul_precision):
    return _run(config, workdir, force_resume, devices)


def _run(config, workdir: str, force_resume: bool, devices) -> dict:
  cpu_devices.configure(config)  # before anything starts JAX's backends
  mesh = train.make_mesh(devices, config.mesh)
  train.validate(config, mesh.devices.size)
  models.validate_model_config(config.model)
  _check_workdir(workdir)
  is_main = jax.process_index() == 0
  inp = input_pipeline.create(config, mesh, workdir)

  config_path = os.path.join(workdir, 'config.json')
  _check_resume_config(config_path, config, force_resume)
  # Shapes and shardings are enough to restore into (and to refuse a checkpoint of another model): no compile.
  model, template = train.create_model_and_state(config, mesh, abstract=True)
  step_fn = train.make_train_step(config, model, mesh, inp)
  if config.num_seeds > 1:  # several seeds multiply the memory: refuse a step that cannot fit, before any write
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    train.check_memory(config, step_fn.lower(template, *next(inp.train_inputs(0))).compile(), local)
  ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)  # creates the workdir
  state, start_step, data_state = ckpt.restore_latest(template, report=print if is_main else lambda _: None)
  if not start_step:
    model, state = train.create_model_and_state(config, mesh)
  elif is_main:
    print(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
  inputs = inp.train_inputs(start_step, data_state)  # refuses a checkpoint of other data, before any write
  try:
    distributed.barrier('config_checked')  # every process has read config.json before process 0 replaces it
    if is_main:
      _write_config(config_path, config)
      _write_json(os.path.join(workdir, DATA_RECORD), _data_record(inp))
      for seed, out in zip(train.replica_seeds(config), seed_workdirs(config, workdir)):
        if out != workdir:  # each seed's outputs as the run of that seed alone would record them
          os.makedirs(out, exist_ok=True)
          _write_config(os.path.join(out, 'config.json'), single_seed_config(config, seed))
          _write_json(os.path.join(out, DATA_RECORD), _data_record(inp))
      _announce(config, workdir, inp.description, mesh.devices.size)
    return _run_loop(config, workdir, ckpt, state, start_step, is_main, NamedSharding(mesh, P()),
                     lambda state: step_fn(state, *next(inputs)),
                     lambda state, step: [evaluate_splits(model, inp, _replica(state, k, config.num_seeds), step)
                                          for k in range(config.num_seeds)],
                     inp.iterator_state)
  finally:
    inp.close()


def seed_workdirs(config, workdir: str) -> list:
  """Where each seed's metrics.jsonl, TensorBoard events and config.json go: the workdir itself for one seed;
  WORKDIR/seed<s>/ for each seed s of a run of several (the layout the report and TensorBoard read as one run per
  seed). The checkpoint (all seeds in one state) and curves.png stay in the workdir."""
  if config.num_seeds == 1:
    return [workdir]
  return [os.path.join(workdir, f'seed{s}') for s in train.replica_seeds(config)]


def single_seed_config(config, seed: int):
  """The config of the run that trains `seed` alone: what replica `seed - config.seed` of `config` equals."""
  one = config.copy_and_resolve_references()
  one.seed, one.num_seeds = seed, 1
  return one


def _replica(state, k: int, num_seeds: int):
  """The network of replica k (params and BN statistics) of a state with a leading seed axis; the state itself for
  one seed. What evaluation reads."""
  if num_seeds == 1:
    return state
  take = lambda tree: jax.tree_util.tree_map(lambda a: a[k], tree)
  return state.replace(params=take(state.params), batch_stats=take(state.batch_stats))


def evaluate_splits(model, inp, state, step: int) -> dict:
  """The evaluation entries of a metrics line: loss and error (top-5 too for more than 10 classes) of every
  held-out split of the input, exact, with the BN moving averages."""
  row, variables = {}, evaluate.local_variables(state)
  for split in inp.eval_splits():
    r = evaluate.evaluate(model, variables, inp.eval_batches(split))
    row.update({f'{split}_loss': r['loss'], f'{split}_error': r['top1_error']})
    if inp.num_classes > 10:
      row[f'{split}_top5_error'] = r['top5_error']
  return row


def _announce(config, workdir, data: str, num_devices: int) -> None:
  """The one line a run prints before its first step: network, seeds, data, devices, batch, steps, workdir."""
  seeds = train.replica_seeds(config)
  seeds_s = f', seeds {seeds[0]}..{seeds[-1]} in one program,' if len(seeds) > 1 else ''
  print(f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} ({config.model.family})'
        f'{seeds_s} on {data}, {num_devices} device(s) ({_device_choice()}) in {jax.process_count()} process(es), '
        f'batch {config.batch_size}, {config.num_steps} steps, workdir {workdir}', flush=True)


def _device_choice() -> str:
  platform = jax.devices()[0].platform
  return f'{platform}: {cpu_devices.describe()}' if platform == 'cpu' else platform


def _split_seeds(tree, num_seeds: int) -> list:
  """[replica 0's tree, ...] of a host tree with a leading seed axis ([tree] for one seed)."""
  if num_seeds == 1:
    return [tree]
  return [jax.tree_util.tree_map(lambda a: a[k], tree) for k in range(num_seeds)]


def _run_loop(config, workdir: str, ckpt, state, start_step: int, is_main: bool, replicated, next_state,
              eval_rows, data_state=lambda: None) -> dict:
  """The training loop: `next_state(state)` takes one step, `eval_rows(state, step)` returns the evaluation
  entries of a metrics line per seed, `data_state()` the input's iterator state after the last step (saved with
  its checkpoint). Logging, evaluation, checkpoint cadence, non-finite checks, signals and the
  final plot live here once. `replicated` is the sharding of the state. Each seed has its own metrics lines (in
  `seed_workdirs`); the returned metrics are the last line's (per seed under 'seeds' when there are several)."""
  seeds, multi = train.replica_seeds(config), config.num_seeds > 1
  outs = seed_workdirs(config, workdir)
  writers = [metrics_io.MetricsWriter(out, start_step, enabled=is_main) for out in outs]
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
      final = step == config.num_steps
      rows = [{} for _ in seeds]
      # A stop request does not add a log point: the window's sums are in the checkpoint, so the resumed run writes
      # the same lines as an uninterrupted one.
      if step % config.log_every_steps == 0 or final:
        all_sums = jax.device_get(state.train_sums)  # the loop's only host sync between log points
        now = time.time()
        examples_per_sec = (step - window_step) * config.batch_size / max(now - window_start, 1e-9)
        window_start, window_step = now, step
        for seed, sums, row in zip(seeds, _split_seeds(all_sums, config.num_seeds), rows):
          skipped = _check_nonfinite(config, sums, step, ckpt, log_point=True, seed=seed if multi else None)
          row.update(_summarise(sums, 'train'))
          row['lr'] = float(sums['lr'])
          if config.nonfinite_loss == 'skip':
            row['skipped_steps'] = skipped
          row['examples_per_sec'] = examples_per_sec  # per seed: each replica trains on its own batch
        state = state.replace(train_sums=jax.device_put(
            jax.tree_util.tree_map(np.zeros_like, all_sums), replicated))
      if step % config.eval_every_steps == 0 or final:
        for row, evaluated in zip(rows, eval_rows(state, step)):
          row.update(evaluated)
      if rows[0]:
        for seed, writer, row in zip(seeds, writers, rows):
          writer.write(step, row)
          progress.print(step, row, prefix=f'seed {seed}: ' if multi else '')
        last = ({'step': step, **rows[0]} if not multi else
                {'step': step, 'seeds': {seed: row for seed, row in zip(seeds, rows)}})
      if step % config.checkpoint_every_steps == 0 or final or stop.signal:
        # Never checkpoint a broken state.
        for seed, sums in zip(seeds, _split_seeds(jax.device_get(state.train_sums), config.num_seeds)):
          _check_nonfinite(config, sums, step, ckpt, log_point=False, seed=seed if multi else None)
        ckpt.save(state, force=bool(stop.signal), data_state=data_state())
      if stop.signal and not final:
        ckpt.wait()
        if is_main:
          print(f'Stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint written. '
                'Run the same command to resume.', flush=True)
        last = {**last, 'stopped_by_signal': int(stop.signal)}
        break
  ckpt.close()
  for writer in writers:
    writer.close()
  if is_main:
    per_seed = [metrics_io.read_metrics(writer.path) for writer in writers]
    skipped = sum(r.get('skipped_steps', 0) for rows in per_seed for r in rows)
    if skipped:
      print(f'{int(skipped)} step(s) had a non-finite loss or parameters and were skipped (nonfinite_loss=skip).',
            flush=True)
    label = f'{"ResNet" if config.model.residual else "plain"}-{config.model.depth}'
    plotting.plot_curves({label: per_seed if multi else per_seed[0]}, os.path.join(workdir, 'curves.png'))
  return last
