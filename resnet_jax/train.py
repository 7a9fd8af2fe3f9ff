"""Training: `train_and_evaluate(config, workdir)`, the whole run, importable from a notebook.

Read top to bottom: check everything before writing anything (the config, the devices, the workdir and what it
already holds), set up the input, restore the newest intact checkpoint or initialise, run the step (train_step.py)
until the last step with logging, evaluation and checkpoints, and finish. The recipe is recipe.py; several seeds
in one program are seeds.py, which hands this loop a step and an output writer that serve any number of seeds.
"""
import contextlib
import signal
import time

import jax
import numpy as np

from resnet_jax import (checkpoint, cpu_devices, distributed, evaluate, input_pipeline, mesh as mesh_lib, models,
                        run_record, seeds, train_step, validation, xla_workarounds)
from resnet_jax.errors import NonFiniteLossError


def train_and_evaluate(config, workdir: str, force_resume: bool = False, devices=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint. Returns the last metrics written
  (with 'stopped_by_signal' when SIGTERM/SIGINT ended the run early).

  A mistake in the config, the data or the workdir is found before anything is written, so it leaves the workdir as
  it was. A run killed at any point and started again with the same command ends as if never interrupted. Every step
  and evaluation is traced under config.matmul_precision."""
  # 1. Check the config against the devices, and that the workdir can be written; nothing is written yet.
  cpu_devices.configure(config)  # before anything starts JAX's backends
  mesh = mesh_lib.make_mesh(devices, config.mesh)
  validation.validate(config, mesh.devices.size)
  run_record.check_writable(workdir)
  is_main = jax.process_index() == 0
  report = print if is_main else lambda *_, **__: None

  # Everything entered here is undone in reverse order however the run ends: the checkpointer (abandoned after a
  # failure, so no write of ours runs on behind the error), the input's reader threads, the workdir lock.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(jax.default_matmul_precision(config.matmul_precision))
    if is_main:  # one run per workdir: process 0 holds it for the whole run (the processes of one run share it)
      cleanup.enter_context(run_record.hold(workdir))
    distributed.barrier('workdir_held')

    # 2. The input, checked against the config; the workdir's run, checked against the config.
    inp = input_pipeline.create(config, mesh, workdir)
    cleanup.callback(inp.close)
    if not force_resume:
      run_record.check_resume(workdir, config)
    model = models.create_model(config.model, bn_group_size=config.bn_group_size)
    step_fn = xla_workarounds.StepCaller(train_step.make_step(config, model, mesh, inp), config, mesh,
                                         inp.input_shardings)

    # 3. Restore or initialise. Shapes and shardings are enough to restore into (and to refuse a checkpoint of
    # another model): nothing is compiled before that.
    template = train_step.create_state(config, model, mesh, abstract=True)
    seeds.check_memory(config, mesh, lambda: step_fn.lower(template, *next(inp.train_inputs(0))).compile())
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)  # creates the workdir
    cleanup.push(lambda failed, *_: ckpt.abandon() if failed else None)
    state, start_step, data_state = ckpt.restore_latest(template, report=report)
    if start_step:
      report(f'Resumed from {ckpt.directory} at step {start_step}.', flush=True)
    else:
      state = train_step.create_state(config, model, mesh)
    inputs = inp.train_inputs(start_step, data_state)  # refuses a checkpoint of other data, before any write
    seeds.check_records(config, workdir)  # a damaged metrics record is refused before any write, too
    distributed.barrier('config_checked')  # every process has read config.json before process 0 replaces it
    if is_main:
      seeds.write_records(config, workdir, run_record.data_record(inp))
    report(describe(config, workdir, inp.description, mesh.devices.size), flush=True)

    # 4. The loop: a call of the step takes up to steps_per_call steps, never past a log, evaluation or checkpoint
    # point. A stop signal is honoured after the call it arrives in.
    out = seeds.Outputs(config, workdir, start_step, enabled=is_main)
    step, window, stopped_by = start_step, (time.time(), start_step), None
    with StopRequest() as stop:
      while step < config.num_steps:
        n = min(config.steps_per_call, steps_to_next_point(config, step))
        state = step_fn(state, n, *next(inputs))
        step += n
        if distributed.preemption_reached(step):  # several processes: the step all agreed on after a SIGTERM
          stop.signal = signal.SIGTERM
        final = step == config.num_steps
        row = {}
        # A stop request adds no log point: the window's sums are in the checkpoint, so the resumed run writes the
        # same lines as an uninterrupted one.
        if step % config.log_every_steps == 0 or final:
          sums = jax.device_get(state.train_sums)  # the loop's only host sync between log points
          row = train_metrics(config, sums, step, ckpt, window)
          window = (time.time(), step)
          state = state.replace(train_sums=jax.device_put(jax.tree_util.tree_map(np.zeros_like, sums),
                                                          mesh_lib.replicated(mesh)))
        if step % config.eval_every_steps == 0 or final:
          row.update(seeds.each_replica(config, lambda s: evaluate_splits(model, inp, s, step), state))
        if row:
          out.write(step, row)
        if step % config.checkpoint_every_steps == 0 or final or stop.signal:
          check_nonfinite(config, jax.device_get(state.train_sums), step, ckpt)  # never checkpoint a broken state
          ckpt.save(state, force=bool(stop.signal), data_state=inp.iterator_state())
        if stop.signal and not final:
          ckpt.wait()
          report(f'Stopped by {signal.Signals(stop.signal).name} at step {step}; checkpoint written. '
                 'Run the same command to resume.', flush=True)
          stopped_by = int(stop.signal)
          break

    # 5. Finish: the last checkpoint committed, the curves drawn.
    ckpt.close()
    rows = out.close()
    skipped = sum(r.get('skipped_steps', 0) for per_file in rows for r in per_file)
    if skipped:
      report(f'{int(skipped)} step(s) had a non-finite loss or parameters and were skipped (nonfinite_loss=skip).',
             flush=True)
    return out.last if stopped_by is None else {**out.last, 'stopped_by_signal': stopped_by}


def steps_to_next_point(config, step: int) -> int:
  """Steps from `step` to the next log, evaluation or checkpoint point, or the last step."""
  nxt = min(step + every - step % every for every in
            (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps))
  return min(nxt, config.num_steps) - step


def train_metrics(config, sums: dict, step: int, ckpt, window: tuple) -> dict:
  """The training entries of a metrics line from the sums of the window since the last log point: mean loss and
  error, the last lr, throughput (and the skipped steps under nonfinite_loss='skip'). Raises NonFiniteLossError
  when a step of the window was not finite and the run must stop."""
  start_time, start_step = window
  skipped = check_nonfinite(config, sums, step, ckpt, log_point=True)
  count = np.asarray(sums['count'], np.float64)
  row = {'train_loss': np.asarray(sums['loss'], np.float64) / count,
         'train_error': np.asarray(sums['errors'], np.float64) / count,
         'lr': np.asarray(sums['lr'], np.float64)}
  if config.nonfinite_loss == 'skip':
    row['skipped_steps'] = skipped
  row['examples_per_sec'] = (step - start_step) * config.batch_size / max(time.time() - start_time, 1e-9)
  return row


def check_nonfinite(config, sums: dict, step: int, ckpt, log_point: bool = False) -> np.ndarray:
  """Raises NonFiniteLossError (naming the step and the last good checkpoint) if a step since the last log point
  was not finite under nonfinite_loss='stop', or, at a log point under 'skip', if every step of the window was
  skipped. Returns the number of non-finite steps (the skipped ones under 'skip')."""
  bad = np.asarray(sums['nonfinite'])
  if config.nonfinite_loss == 'stop':
    fatal = bad > 0
  else:
    fatal = (bad > 0) & (np.asarray(sums['count']) == 0) & log_point
  if not fatal.any():
    return bad
  k = int(np.flatnonzero(fatal)[0])  # the network that must stop (the first of several seeds)
  first = int(np.ravel(sums['first_nonfinite'])[k])
  ckpt.wait()
  good = ckpt.latest_step()
  what = (f'The training loss or parameters became non-finite at step {first}' if config.nonfinite_loss == 'stop'
          else f'Every step from {first} to {step} had a non-finite loss or parameters and was skipped')
  raise NonFiniteLossError(
      f'{what}{seeds.where(config, k)} (found at step {step}). Last good checkpoint: '
      + (f'step {good} in {ckpt.directory}' if good is not None else 'none') + '. Lower --config.learning_rate, '
      'use --config.model.dtype=float32, or check the data, then run again (it resumes from that checkpoint); '
      '--config.nonfinite_loss=skip skips such steps and counts them instead.')


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


def describe(config, workdir, data: str, num_devices: int) -> str:
  """The one line a run prints before its first step: network, data, devices, batch, steps, workdir."""
  platform = jax.devices()[0].platform
  devices = f'{platform}: {cpu_devices.describe()}' if platform == 'cpu' else platform
  return (f'Training {"ResNet" if config.model.residual else "plain"}-{config.model.depth} ({config.model.family})'
          f'{seeds.describe(config)} on {data}, {num_devices} device(s) ({devices}) in {jax.process_count()} '
          f'process(es), '
          f'batch {config.batch_size}, {config.num_steps} steps, writing to {workdir}')


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
