"""The training loop: `train_and_evaluate(config, workdir)`, the whole run, importable from a notebook.

It checks everything before it writes anything (the config, the data, the workdir and what it already holds), then
restores the newest intact checkpoint or starts fresh, and runs the jitted step (train_step.py) until the last
step. Logging, evaluation, checkpoints, non-finite checks and stop signals live here, once, for every input.
"""
import contextlib
import os
import signal
import time

import jax
import numpy as np

from resnet_jax import (checkpoint, cpu_devices, distributed, evaluate, input_pipeline, mesh as mesh_lib, metrics_io,
                        plotting, run_record, train_step, validation)
from resnet_jax.errors import NonFiniteLossError


class StopRequest:
  """Turns SIGTERM/SIGINT into a request honoured between calls of the step: checkpoint, then exit cleanly."""

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


def train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint. Returns the last metrics written
  (with 'stopped_by_signal' when SIGTERM/SIGINT ended the run early).

  A mistake in the config, the data or the workdir is found before anything is written, so it leaves the workdir as
  it was. A run killed at any point and started again with the same command ends as if never interrupted. Every step
  and evaluation is traced under config.matmul_precision."""
  cpu_devices.configure(config)  # before anything starts JAX's backends
  mesh = mesh_lib.make_mesh(devices, config.mesh)
  validation.validate(config, mesh.devices.size)
  with jax.default_matmul_precision(config.matmul_precision):
    return _run(config, workdir, force_resume, mesh)


def _run(config, workdir: str, force_resume: bool, mesh) -> dict:
  run_record.check_writable(workdir)
  is_main = jax.process_index() == 0
  # One run per workdir: process 0 holds it for the whole run (the processes of one run share it).
  with run_record.hold(workdir) if is_main else contextlib.nullcontext():
    distributed.barrier('workdir_held')
    return _run_held(config, workdir, force_resume, mesh, is_main)


def _run_held(config, workdir: str, force_resume: bool, mesh, is_main: bool) -> dict:
  inp = input_pipeline.create(config, mesh, workdir)
  ckpt = None
  try:
    if not force_resume:
      run_record.check_resume(workdir, config)
    # Shapes and shardings are enough to restore into (and to refuse a checkpoint of another model): no compile.
    model, template = train_step.create_model_and_state(config, mesh, abstract=True)
    steps = train_step.TrainSteps(config, model, mesh, inp)
    if config.num_seeds > 1:  # several seeds multiply the memory: refuse a step that cannot fit, before any write
      local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
      validation.check_memory(config, steps.lower(template, *next(inp.train_inputs(0))).compile(), local)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)  # creates the workdir
    state, start_step, data_state = ckpt.restore_latest(template, report=print if is_main else lambda _: None)
    if not start_step:
      model, state = train_step.create_model_and_state(config, mesh)
    elif is_main:
      print(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
    inputs = inp.train_inputs(start_step, data_state)  # refuses a checkpoint of other data, before any write
    for out in seed_workdirs(config, workdir):  # a damaged metrics record is refused before any write, too
      metrics_io.read_metrics(os.path.join(out, 'metrics.jsonl'))
    distributed.barrier('config_checked')  # every process has read config.json before process 0 replaces it
    if is_main:
      _record(config, workdir, inp)
      _announce(config, workdir, inp.description, mesh.devices.size)
    return _run_loop(config, workdir, ckpt, state, start_step, is_main, mesh_lib.replicated(mesh), steps.per_call,
                     lambda state, n: steps(state, n, *next(inputs)),
                     lambda state, step: [evaluate_splits(model, inp, _replica(state, k, config.num_seeds), step)
                                          for k in range(config.num_seeds)],
                     inp.iterator_state)
  except BaseException:
    if ckpt is not None:
      ckpt.abandon()  # a failure mid-run: no write of ours left running behind the error being reported
    raise
  finally:
    inp.close()


def _record(config, workdir: str, inp) -> None:
  """The run record of the workdir, and for several seeds each seed's, as the run of that seed alone records it."""
  data = run_record.data_record(inp)
  run_record.write(workdir, config, data)
  for seed, out in zip(train_step.replica_seeds(config), seed_workdirs(config, workdir)):
    if out != workdir:
      os.makedirs(out, exist_ok=True)
      run_record.write(out, single_seed_config(config, seed), data)


def seed_workdirs(config, workdir: str) -> list:
  """Where each seed's metrics.jsonl, TensorBoard events and run record go: the workdir itself for one seed;
  WORKDIR/seed<s>/ for each seed s of a run of several (the layout the report and TensorBoard read as one run per
  seed). The checkpoint (all seeds in one state) and curves.png stay in the workdir."""
  if config.num_seeds == 1:
    return [workdir]
  return [os.path.join(workdir, f'seed{s}') for s in train_step.replica_seeds(config)]


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
  seeds = train_step.replica_seeds(config)
  seeds_s = f', seeds {seeds[0]}..{seeds[-1]} in one program,' if len(seeds) > 1 else ''
  platform = jax.devices()[0].platform
  devices = f'{platform}: {cpu_devices.describe()}' if platform == 'cpu' else platform
  print(f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} ({config.model.family})'
        f'{seeds_s} on {data}, {num_devices} device(s) ({devices}) in {jax.process_count()} process(es), '
        f'batch {config.batch_size}, {config.num_steps} steps, workdir {workdir}', flush=True)


def _split_seeds(tree, num_seeds: int) -> list:
  """[replica 0's tree, ...] of a host tree with a leading seed axis ([tree] for one seed)."""
  if num_seeds == 1:
    return [tree]
  return [jax.tree_util.tree_map(lambda a: a[k], tree) for k in range(num_seeds)]


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
  count = float(sums['count'])
  return {f'{prefix}_loss': float(sums['loss']) / count, f'{prefix}_error': float(sums['errors']) / count}


def _steps_to_next_point(config, step: int) -> int:
  """Steps from `step` to the next log, evaluation or checkpoint point, or the last step."""
  nxt = min(step + every - step % every for every in
            (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps))
  return min(nxt, config.num_steps) - step


def _run_loop(config, workdir: str, ckpt, state, start_step: int, is_main: bool, replicated, per_call: int,
              take_steps, eval_rows, data_state) -> dict:
  """The training loop: `take_steps(state, n)` takes n steps in one call (`per_call`, or fewer to stop at the next
  log, evaluation or checkpoint point), `eval_rows(state, step)` returns the evaluation entries of
  a metrics line per seed, `data_state()` the input's record after the last step (saved with its checkpoint).
  `replicated` is the sharding of the state. A stop signal is honoured after the call it arrives in. Each seed has
  its own metrics lines (in `seed_workdirs`); the returned metrics are the last line's (per seed under 'seeds' when
  there are several)."""
  seeds, multi = train_step.replica_seeds(config), config.num_seeds > 1
  outs = seed_workdirs(config, workdir)
  writers = [metrics_io.MetricsWriter(out, start_step, enabled=is_main) for out in outs]
  progress = metrics_io.Progress(config.num_steps, start_step, enabled=is_main)
  last = {}
  window_start, window_step = time.time(), start_step
  step = start_step
  with StopRequest() as stop:
    while step < config.num_steps:
      n = min(per_call, _steps_to_next_point(config, step))
      state = take_steps(state, n)
      step += n
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
