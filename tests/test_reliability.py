"""Reliability: a run killed anywhere resumes bitwise; SIGTERM/SIGINT checkpoint and stop; damaged checkpoints are
detected and skipped; non-finite losses stop (or are skipped and counted); the same seed gives the same run; every
bad input gets one clear message and leaves the workdir as it was. docs/reliability.md lists each case.

The subprocess runs use the tiny digits run below on 2 CPU devices and share one uninterrupted reference run and one
JAX compilation cache (module fixtures): 15 short runs in all.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faults
from resnet_jax import checkpoint, config_base, errors, metrics_io, recipe, run_record, train
from helpers import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # every test here runs training processes
# 12 steps of a ResNet-8 on 8x8 digits: log every 2, evaluate and checkpoint every 4, lr boundary at 6.
RUN = {'num_steps': 12, 'data.image_size': 8, 'data.pad': 1, 'model.depth': 8, 'batch_size': 32,
       'bn_group_size': 16, 'log_every_steps': 2, 'checkpoint_every_steps': 4, 'eval_every_steps': 4,
       'eval_batch_size': 100, 'lr_boundaries': (6,)}
TIMING = ('examples_per_sec',)  # wall-clock throughput: the one field that cannot repeat between two runs


def _flag(k, v):
  return f'--config.{k}={"(" + ",".join(map(str, v)) + ",)" if isinstance(v, tuple) else v}'


def _main(workdir, *extra, fault=None, cache=None, config='configs/digits.py'):
  command, env = _command(workdir, *extra, fault=fault, cache=cache, config=config)
  return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _command(workdir, *extra, fault=None, cache=None, config='configs/digits.py', module='resnet_jax.main'):
  """(argv, environment) of the tiny run in `workdir` (or of `module` with `extra` as its flags)."""
  env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, 'XLA_FLAGS')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  if cache:  # a shared persistent compilation cache: later runs skip most of the compile time
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  if fault:
    env[faults.ENV] = fault
  if module != 'resnet_jax.main':
    return [sys.executable, '-m', module, f'--workdir={workdir}', *extra], env
  args = [f'--config={config}', f'--workdir={workdir}', *(_flag(k, v) for k, v in RUN.items()), *extra]
  command = [os.path.join(REPO, 'tests', 'faults.py')] if fault else ['-m', 'resnet_jax.main']
  return [sys.executable, *command, *args], env


def _ok(out):
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  """The uninterrupted run every other run is compared with."""
  workdir = tmp_path_factory.mktemp('reference')
  _ok(_main(workdir, cache=cache))
  return workdir


def _metrics(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in metrics_io.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]


def _assert_same_run(a, b, seeds=None):
  """metrics.jsonl identical line by line (wall-clock throughput aside; each seed's, in seed<s>/, for a run of
  several `seeds`) and the final checkpoint identical bit for bit: parameters, BN statistics, momentum, step,
  warm-up state and the open log window (of every seed)."""
  for sub in [f'seed{s}' for s in seeds] if seeds else ['']:
    rows_a, rows_b = _metrics(os.path.join(a, sub)), _metrics(os.path.join(b, sub))
    assert [r['step'] for r in rows_a] == [2, 4, 6, 8, 10, 12]
    assert rows_a == rows_b
  final = RUN['num_steps']
  state_a, state_b = (checkpoint.Checkpointer(str(w)).load_arrays(final) for w in (a, b))
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(state_a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(state_b)[0])
  assert paths_a == paths_b and len(leaves_a) > 20
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), f'{jax.tree_util.keystr(path)} differs'


def _steps(workdir):
  """The steps orbax lists as complete, read without touching the directory (no clean-up of temporary dirs)."""
  manager = checkpoint.ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                             options=checkpoint.ocp.CheckpointManagerOptions(read_only=True))
  return list(manager.all_steps())


def _snapshot(root):
  """Every file under `root` with the SHA-256 of its bytes and its mtime: equal snapshots mean nothing was written.
  The lock file is left out: it records whoever holds the workdir now (empty when nobody does)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if f == run_record.LOCK_FILE:
        continue
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Determinism and bitwise resume (subprocesses on 2 CPU devices).

def test_same_seed_on_the_same_devices_gives_the_same_run_twice(reference, tmp_path, cache):
  _ok(_main(tmp_path, cache=cache))
  _assert_same_run(reference, tmp_path)


@pytest.mark.parametrize('fault', ['kill@train:7', 'kill@eval:8', 'kill@checkpoint:8', 'term@train:5',
                                   'int@train:9'])
def test_run_killed_anywhere_resumes_to_the_uninterrupted_result(reference, tmp_path, cache, fault):
  action, where = fault.split('@')
  point, step = where.split(':')
  killed = _main(tmp_path, fault=fault, cache=cache)
  assert f'[test fault] {action} at {point} at step {step}' in killed.stdout, killed.stdout[-2000:] + killed.stderr[-2000:]
  ckpt_dir = tmp_path / 'checkpoints'
  if action == 'kill':
    assert killed.returncode == -signal.SIGKILL
    with open(tmp_path / 'metrics.jsonl', 'a') as f:  # as if the kill had also cut a metrics line short
      f.write('{"step": 99, "train_lo')
  else:  # SIGTERM/SIGINT: checkpoint at the current step, a clean exit (0; 130 for SIGINT), no extra metrics line
    assert killed.returncode == (0 if action == 'term' else 130), killed.stderr[-3000:]
    assert f'Stopped by {"SIGTERM" if action == "term" else "SIGINT"} at step {step}' in killed.stdout
    assert int(step) in _steps(tmp_path)
    assert _metrics(tmp_path) == [r for r in _metrics(reference) if r['step'] <= int(step)]
  if point == 'checkpoint':  # killed inside the write: the step exists only as orbax's temporary directory
    assert (ckpt_dir / f'{step}.orbax-checkpoint-tmp').is_dir() and not (ckpt_dir / step).exists()
    assert int(step) not in _steps(tmp_path)  # never taken as complete

  resumed = _ok(_main(tmp_path, cache=cache))
  restored = [int(line.split()[-1].rstrip('.')) for line in resumed.stdout.splitlines() if line.startswith('Resumed')]
  if action in ('term', 'int'):
    assert restored == [int(step)]  # no work lost
  else:
    assert len(restored) <= 1 and (restored or [0])[0] < int(step)  # work after the last complete checkpoint redone
  assert not list(ckpt_dir.glob('*.orbax-checkpoint-tmp'))  # the resumed run removed the half-written step
  _assert_same_run(reference, tmp_path)


def _one_error_line(out):
  """The one `error:` line of a command that stopped on a user error (and no stack trace of ours)."""
  lines = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert out.returncode == 1 and len(lines) == 1, out.stdout[-2000:] + out.stderr[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# One run per workdir, and a full disk.

def test_a_second_run_on_a_held_workdir_is_refused_and_a_killed_run_frees_it_at_once(reference, tmp_path, cache):
  from experiments import sweep
  workdir = tmp_path / 'runs' / 'exp' / 'resnet-8' / 'seed0'  # where a sweep of that experiment keeps the run
  command, env = _command(workdir, fault='pause@train:5', cache=cache)
  log = open(tmp_path / 'first.log', 'w')
  first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
  try:
    for _ in range(600):  # it holds the workdir from its start; it pauses after step 5, its checkpoint of 4 written
      if '[test fault] pause' in (tmp_path / 'first.log').read_text():
        break
      time.sleep(0.2)
    assert '[test fault] pause' in (tmp_path / 'first.log').read_text()
    before = _snapshot(workdir)
    holder = json.loads((workdir / run_record.LOCK_FILE).read_text())
    assert holder['pid'] == first.pid and holder['host'] and holder['started'] and 'faults.py' in holder['command']
    second = _main(workdir, cache=cache)
    line = _one_error_line(second)
    assert f'is in use by another run: pid {first.pid} on {holder["host"]}, started {holder["started"]}' in line
    assert 'use another --workdir' in line
    # The evaluator writes into the workdir too, and a sweep keeps its books there: both are refused alike.
    evaluated = subprocess.run(*[_command(workdir, '--protocol=center', module='resnet_jax.evaluate')[0]],
                               capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert 'is in use by another run' in _one_error_line(evaluated)
    spec = sweep.RunSpec('exp', 'resnet-8', 0, _ref_config())
    assert spec.workdir(str(tmp_path / 'runs')) == str(workdir)
    with pytest.raises(errors.WorkdirError, match=f'in use by another run: pid {first.pid}'):
      sweep.run_sweep([spec], str(tmp_path / 'runs'), log=lambda *_: None)
    assert _snapshot(workdir) == before  # the refused runs wrote nothing
    assert json.loads((workdir / run_record.LOCK_FILE).read_text()) == holder
  finally:
    first.kill()  # SIGKILL: no clean-up runs; the OS releases the lock with the process
    first.wait()
    log.close()
  resumed = _ok(_main(workdir, cache=cache))  # at once: no stale lock to wait for or remove
  assert 'Resumed from' in resumed.stdout
  _assert_same_run(reference, workdir)
  assert (workdir / run_record.LOCK_FILE).read_text() == ''  # nobody holds it now


@pytest.mark.parametrize('fault,what,newest', [('enospc@checkpoint:8', 'checkpoint step 8 in', 4),
                                               ('enospc@metrics:6', 'metrics.jsonl', 4)])
def test_a_full_disk_stops_the_run_in_one_line_and_the_resumed_run_matches(reference, tmp_path, cache, fault, what,
                                                                           newest):
  full = _main(tmp_path, fault=fault, cache=cache)
  line = _one_error_line(full)
  assert 'Could not write' in line and what in line and 'No space left on device' in line, line
  assert 'run the same command' in line
  if 'checkpoint' in fault:
    assert f'The newest complete checkpoint is step {newest}' in line
  assert _steps(tmp_path) == [newest]  # the checkpoint before the failed write is complete ...
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert checkpoint.state_digest(ckpt.load_arrays(newest)) == ckpt.saved_digest(newest)  # ... and intact
  _ok(_main(tmp_path, cache=cache))  # the space is back: the same command resumes
  _assert_same_run(reference, tmp_path)


def test_several_steps_per_call_give_the_same_run_and_resume_bit_for_bit(tmp_path, cache):
  """steps_per_call=4 with log points every 4 steps: calls of 4 steps (one loop program), killed after the call that
  passes step 7, resumed: the same metrics and final checkpoint, bit for bit, as the run of one step per call."""
  log4 = ('--config.log_every_steps=4',)
  one, four = tmp_path / 'one', tmp_path / 'four'
  _ok(_main(one, *log4, '--config.steps_per_call=1', cache=cache))
  killed = _main(four, *log4, '--config.steps_per_call=4', fault='kill@train:7', cache=cache)
  assert '[test fault] kill at train at step 8' in killed.stdout and killed.returncode == -signal.SIGKILL
  _ok(_main(four, *log4, '--config.steps_per_call=4', cache=cache))
  assert _metrics(one) == _metrics(four) and [r['step'] for r in _metrics(one)] == [4, 8, 12]
  a, b = (checkpoint.Checkpointer(str(w)).load_arrays(RUN['num_steps']) for w in (one, four))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.tobytes() == y.tobytes()


@pytest.fixture(scope='module')
def reference_two_seeds(tmp_path_factory, cache):
  """The uninterrupted run of seeds 0 and 1 in one program."""
  workdir = tmp_path_factory.mktemp('reference_two_seeds')
  _ok(_main(workdir, '--config.num_seeds=2', cache=cache))
  return workdir


@pytest.mark.parametrize('fault', ['kill@train:7', 'kill@eval:8'])
def test_run_of_two_seeds_killed_resumes_to_the_uninterrupted_result(reference_two_seeds, tmp_path, cache, fault):
  """The state of both seeds is one checkpoint, each seed's metrics its own file: a kill between steps, or between
  the evaluations of the two seeds, resumes to the uninterrupted run bit for bit."""
  action, (point, step) = fault.split('@')[0], fault.split('@')[1].split(':')
  killed = _main(tmp_path, '--config.num_seeds=2', fault=fault, cache=cache)
  assert f'[test fault] {action} at {point} at step {step}' in killed.stdout, killed.stdout[-2000:] + killed.stderr[-2000:]
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / 'metrics.jsonl').exists()  # each seed's lines are in its seed<s>/
  with open(tmp_path / 'seed1' / 'metrics.jsonl', 'a') as f:  # as if the kill had also cut a line short
    f.write('{"step": 99, "train_lo')
  resumed = _ok(_main(tmp_path, '--config.num_seeds=2', cache=cache))
  assert 'seeds 0..1 in one program' in resumed.stdout
  _assert_same_run(reference_two_seeds, tmp_path, seeds=(0, 1))
  assert _metrics(tmp_path / 'seed0') != _metrics(tmp_path / 'seed1')  # two different runs


def test_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_previous_one(reference, tmp_path, cache):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  _flip_byte_in_largest_file(workdir / 'checkpoints' / '12')
  out = _ok(_main(workdir, cache=cache))
  assert 'Checkpoint step 12 in' in out.stdout and 'is damaged' in out.stdout
  assert 'Resuming from step 8, the newest intact checkpoint.' in out.stdout
  assert (workdir / 'checkpoints_damaged' / '12').is_dir()  # kept for inspection
  _assert_same_run(reference, workdir)


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints (in process, on a small state).

def _flip_byte_in_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def _truncate_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _garble_array_metadata(step_dir):
  with open(os.path.join(step_dir, 'default', '_METADATA'), 'w') as f:
    f.write('{"tree_metadata": {"w": ')


def _empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


class _State:
  """A tiny stand-in for TrainState: three arrays whose values depend on the step."""

  @staticmethod
  def at(step):
    rng = np.random.default_rng(step)
    return {'w': jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)), 'b': jnp.full((7,), float(step)),
            'step': jnp.asarray(step, jnp.int32)}


def _save_steps(workdir, steps):
  ckpt = checkpoint.Checkpointer(str(workdir), keep=5)
  for s in steps:
    state = _State.at(s)
    ckpt.manager.save(s, args=checkpoint.ocp.args.Composite(default=checkpoint.ocp.args.StandardSave(state)),
                      custom_metadata={checkpoint.DIGEST_KEY: checkpoint.state_digest(state)})
  ckpt.close()


@pytest.mark.parametrize('damage', [_flip_byte_in_largest_file, _truncate_largest_file, _garble_array_metadata,
                                    _empty_step_dir])
def test_damaged_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, damage):
  _save_steps(tmp_path, [1, 2, 3])
  damage(str(tmp_path / 'checkpoints' / '3'))
  reports = []
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  state, step, _ = ckpt.restore_latest(_State.at(0), report=reports.append)
  assert step == 2
  for k, v in _State.at(2).items():
    np.testing.assert_array_equal(state[k], v)
  assert any(r.startswith('Checkpoint step 3 in') and 'is damaged' in r for r in reports), reports
  assert ckpt.all_steps() == [1, 2] and (tmp_path / 'checkpoints_damaged' / '3').is_dir()
  ckpt.close()


def test_a_flipped_byte_that_orbax_restores_silently_is_caught_by_the_digest(tmp_path):
  """orbax alone restores this checkpoint without error and with different values; the digest is what notices."""
  _save_steps(tmp_path, [1])
  step_dir = tmp_path / 'checkpoints' / '1'
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  _flip_byte_in_largest_file(str(step_dir))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  raw = ckpt.load_arrays(1)  # orbax's own restore: no error ...
  assert raw['w'].tobytes() != np.asarray(_State.at(1)['w']).tobytes()  # ... and wrong values
  with pytest.raises(checkpoint.DamagedCheckpointError, match='SHA-256'):
    ckpt.restore(_State.at(0), 1)
  assert files  # the flip hit a file of the checkpoint
  ckpt.close()


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_is_moved(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for s in (1, 2):
    _truncate_largest_file(str(tmp_path / 'checkpoints' / str(s)))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(errors.NoUsableCheckpointError, match=r'Every checkpoint .* is damaged \(steps \[1, 2\]\)'):
    ckpt.restore_latest(_State.at(0), report=lambda _: None)
  assert isinstance(errors.NoUsableCheckpointError('x'), errors.USER_ERRORS)
  assert ckpt.all_steps() == [1, 2] and not (tmp_path / 'checkpoints_damaged').exists()
  ckpt.close()


def test_partially_written_checkpoint_is_never_listed(tmp_path):
  _save_steps(tmp_path, [1, 2])
  shutil.copytree(tmp_path / 'checkpoints' / '2', tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp')
  os.remove(tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp' / 'commit_success.txt')
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  ckpt.manager.save(4, args=checkpoint.ocp.args.Composite(default=checkpoint.ocp.args.StandardSave(_State.at(4))))
  ckpt.close()
  assert not (tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp').exists()  # removed before the next save
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [1, 2, 4]


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses (in process, on one device: the learning rate is patched to infinity at chosen steps).

def _tiny(**overrides):
  c = config_base.cifar(8)
  c.data.dataset, c.data.source, c.data.image_size, c.data.pad, c.data.random_flip = 'digits', 'embedded', 8, 1, False
  c.batch_size, c.bn_group_size, c.num_steps, c.lr_boundaries = 32, 8, 6, (4,)
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  c.eval_batch_size = 100
  for k, v in overrides.items():
    *parents, leaf = k.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _spike_lr_at(monkeypatch, bad_steps):
  """The learning rate is infinite at the 0-based steps `bad_steps`, so their updates are not finite."""
  original = recipe.learning_rate

  def spiky(config, step, warmup_done):
    bad = jnp.any(jnp.asarray([step == s for s in bad_steps]))
    return jnp.where(bad, jnp.inf, original(config, step, warmup_done))

  monkeypatch.setattr(recipe, 'learning_rate', spiky)


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
  _spike_lr_at(monkeypatch, [3])  # the 4th update; the checkpoint at step 3 is the last good one
  with pytest.raises(errors.NonFiniteLossError) as e:
    train.train_and_evaluate(_tiny(eval_every_steps=6), str(tmp_path), devices=jax.devices()[:1])
  msg = str(e.value)
  assert 'non-finite at step 4 (found at step 6)' in msg and 'Last good checkpoint: step 3 in' in msg
  assert 'nonfinite_loss=skip' in msg and isinstance(e.value, errors.USER_ERRORS)
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [3]  # the broken state was not checkpointed
  assert [r['step'] for r in metrics_io.read_metrics(str(tmp_path / 'metrics.jsonl'))] == [3]


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, monkeypatch):
  _spike_lr_at(monkeypatch, [3, 4])  # updates 4 and 5 are not finite
  last = train.train_and_evaluate(_tiny(nonfinite_loss='skip', checkpoint_every_steps=1, keep_checkpoints=10,
                                          eval_every_steps=6), str(tmp_path), devices=jax.devices()[:1])
  rows = metrics_io.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert [(r['step'], r['skipped_steps']) for r in rows] == [(3, 0), (6, 2)]
  assert np.isfinite(rows[1]['train_loss']) and last['step'] == 6
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=10)
  s3, s5, s6 = (ckpt.load_arrays(s) for s in (3, 5, 6))
  assert (int(s3['step']), int(s5['step'])) == (3, 5)  # the run moved on to the next batches ...
  for part in ('params', 'batch_stats', 'opt_state', 'error_ema'):  # ... and dropped the two updates entirely
    for x, y in zip(jax.tree_util.tree_leaves(s3[part]), jax.tree_util.tree_leaves(s5[part])):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(s5['params']['head']['kernel'], s6['params']['head']['kernel'])  # update 6 applied
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(s6['params']))


def test_a_second_sigint_interrupts_at_once():
  with train.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error (which main.py prints as one line, exit status 1) and the workdir left as it was.

def _ref_config(**overrides):
  import runpy
  c = runpy.run_path(os.path.join(REPO, 'configs', 'digits.py'))['get_config']()
  for k, v in {**RUN, **overrides}.items():
    *parents, leaf = k.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _folder(kind):
  def make(root):
    write_image_folder(root, size=8, classes=('cat', 'dog'))
    if kind == 'no images':
      for d, _, files in os.walk(root / 'train'):
        for f in files:
          os.remove(os.path.join(d, f))
    elif kind == 'unreadable':
      (root / 'train' / 'dog' / '9.png').write_bytes(b'not a png at all')
    elif kind == 'classes':
      shutil.rmtree(root / 'test' / 'dog')
      write_image_folder(root, splits=('test',), classes=('horse',), size=8)
  return make


BAD_INPUTS = [
    ('unknown model family', {'model.family': 'vgg'}, None,
     r"Unknown config.model.family 'vgg'.*valid choices: cifar, imagenet"),
    ('unknown CIFAR depth', {'model.depth': 21}, None, r'Unknown CIFAR depth 21: CIFAR nets have depth 6n\+2'),
    ('unknown ImageNet depth', {'model.family': 'imagenet', 'model.depth': 200}, None,
     r'ImageNet depth.*200.*18, 34, 50, 101, 152'),
    ('unknown shortcut option', {'model.shortcut': 'D'}, None, r'config.model.shortcut.*valid choices: A, B, C'),
    ('batch not divisible by the devices', {'batch_size': 30, 'bn_group_size': 0}, None,
     r'batch_size=30 is not divisible by the 4 devices'),
    ('batch not divisible by bn_group_size', {'bn_group_size': 12}, None,
     r'bn_group_size=12 does not divide config.batch_size=32; use a divisor of it \(e.g. 8 or 16\)'),
    ('bn_group_size larger than the batch', {'bn_group_size': 64}, None,
     r'bn_group_size=64 must be between 0 \(whole batch\) and config.batch_size=32'),
    ('zero steps', {'num_steps': 0}, None, r'num_steps=0 must be positive'),
    ('negative steps', {'num_steps': -5}, None, r'num_steps=-5 must be positive'),
    ('zero learning rate', {'learning_rate': 0.0}, None, r'learning_rate=0.0 must be positive'),
    ('negative learning rate', {'learning_rate': -0.1}, None, r'learning_rate=-0.1 must be positive'),
    ('zero batch', {'batch_size': 0}, None, r'batch_size=0 must be positive'),
    ('zero evaluation interval', {'eval_every_steps': 0}, None, r'eval_every_steps=0 must be positive'),
    ('negative evaluation interval', {'eval_every_steps': -4}, None, r'eval_every_steps=-4 must be positive'),
    ('lr boundaries out of order', {'lr_boundaries': (8, 6)}, None,
     r"lr_boundaries=\(8, 6\) must be strictly increasing steps in 1\.\.config\.num_steps=12 .*"
     r"--config\.lr_boundaries='\(\)'.* at steps 6, 9\)"),
    ('lr boundary past num_steps', {'lr_boundaries': (20,)}, None,
     r"lr_boundaries=\(20,\) must be strictly increasing steps in 1\.\.config\.num_steps=12 .*"
     r"lr_drop_fractions=\(0\.5, 0\.75\) \(here at steps 6, 9\)"),
    ('lr drop fractions out of order', {'lr_drop_fractions': (0.75, 0.5)}, None,
     r"lr_drop_fractions=\(0\.75, 0\.5\) must be increasing fractions of the run"),
    ('negative batch', {'batch_size': -32}, None, r'batch_size=-32 must be positive'),
    ('unknown non-finite policy', {'nonfinite_loss': 'ignore'}, None, r"valid choices: stop, skip"),
    ('missing image folder', {'data.source': 'folder', 'data.data_dir': '/nonexistent/cifar'}, None,
     r"Expected an image folder at '/nonexistent/cifar'"),
    ('image folder with no images', {'data.source': 'folder', 'model.num_classes': 2}, _folder('no images'),
     r'No images .* under .*train/<class>/'),
    ('unreadable image', {'data.source': 'folder', 'model.num_classes': 2}, _folder('unreadable'),
     r'Cannot read image .*9\.png'),
    ('classes differ between splits', {'data.source': 'folder', 'model.num_classes': 2}, _folder('classes'),
     r"test has classes that .*train lacks: \['horse'\]"),
    ('resume with another model', {'model.depth': 14, 'data.pad': 2}, None,
     r'(?s)model, data or recipe differ.*data\.pad: checkpoint has 1, this run has 2.*model\.depth.*--force_resume'),
]


@pytest.mark.parametrize('name,overrides,make_folder,message', BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_error_and_nothing_is_overwritten(reference, tmp_path, name, overrides, make_folder,
                                                                 message):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _snapshot(workdir)
  if make_folder:
    make_folder(tmp_path / 'images')
    overrides = {**overrides, 'data.data_dir': str(tmp_path / 'images')}
  with pytest.raises(errors.USER_ERRORS, match=message):
    train.train_and_evaluate(_ref_config(**overrides), str(workdir))
  assert _snapshot(workdir) == before


def test_forced_resume_into_a_different_model_names_the_arrays_that_do_not_fit(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _snapshot(workdir)
  with pytest.raises(errors.ConfigMismatchError,
                     match=r"(?s)checkpoint at step 12 .* does not fit.*\['params'\]\['stage1_block2'\].*"
                           r"checkpoint <absent>"):
    train.train_and_evaluate(_ref_config(**{'model.depth': 14}), str(workdir), force_resume=True)
  assert _snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------------------------
# Resume and the recorded config (in process, on one device, on a small image folder that can be moved).

@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
  """A finished 6-step run on an image folder, checkpointed at steps 3 and 6: ROOT/run, its images in ROOT/images."""
  root = tmp_path_factory.mktemp('small_run')
  write_image_folder(root / 'images', size=8, classes=('cat', 'dog'), per_class=16)
  train.train_and_evaluate(_small(root / 'images'), str(root / 'run'), devices=jax.devices()[:1])
  return root


def _small(images, **overrides):
  return _tiny(**{'data.source': 'folder', 'data.data_dir': str(images), 'model.num_classes': 2, **overrides})


def _config_record(path):
  with open(path) as f:
    return json.load(f)


def test_resume_with_a_changed_recipe_is_refused_naming_each_field_with_both_values(small_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(small_run / 'run', workdir)
  before = _snapshot(workdir)
  changed = {'num_steps': 9, 'learning_rate': 0.2, 'lr_boundaries': (5,), 'momentum_form': 'pytorch',
             'weight_decay': 5e-4, 'warmup.until_error': 0.5, 'seed': 1}
  with pytest.raises(errors.ConfigMismatchError) as e:
    train.train_and_evaluate(_small(small_run / 'images', **changed), str(workdir), devices=jax.devices()[:1])
  msg = str(e.value)
  for line in ('num_steps: checkpoint has 6, this run has 9', 'learning_rate: checkpoint has 0.1, this run has 0.2',
               'lr drops at steps: checkpoint has [4], this run has [5]',
               "momentum_form: checkpoint has 'caffe', this run has 'pytorch'",
               'weight_decay: checkpoint has 0.0001, this run has 0.0005',
               'warmup.until_error: checkpoint has 0.8, this run has 0.5', 'seed: checkpoint has 0, this run has 1'):
    assert line in msg, msg
  assert msg.count('checkpoint has') == len(changed) and '--force_resume' in msg
  assert _snapshot(workdir) == before


def test_a_dataset_moved_to_another_directory_resumes(small_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(small_run / 'run', workdir)
  shutil.rmtree(workdir / 'checkpoints' / '6')  # as if the run had been stopped after its step-3 checkpoint
  shutil.copytree(small_run / 'images', tmp_path / 'moved')
  last = train.train_and_evaluate(_small(tmp_path / 'moved'), str(workdir), devices=jax.devices()[:1])
  assert last['step'] == 6 and checkpoint.Checkpointer(str(workdir)).all_steps() == [3, 6]
  assert _config_record(workdir / 'config.json')['data']['data_dir'] == str(tmp_path / 'moved')
  assert _config_record(workdir / 'config.json.1')['data']['data_dir'] == str(small_run / 'images')


def test_a_resume_on_other_data_is_refused_naming_what_differs(small_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(small_run / 'run', workdir)
  shutil.rmtree(workdir / 'checkpoints' / '6')  # as if the run had been stopped after its step-3 checkpoint
  before = _snapshot(workdir)
  one = jax.devices()[:1]
  # The same classes and number of images, other pixels: only the fingerprint tells.
  write_image_folder(tmp_path / 'other', size=8, classes=('cat', 'dog'), per_class=16, seed=7)
  with pytest.raises(errors.USER_ERRORS,
                     match=r'trained on other data: training images or labels with another SHA-256 .* '
                           r'Point config\.data at the dataset the run was trained on'):
    train.train_and_evaluate(_small(tmp_path / 'other'), str(workdir), devices=one)
  write_image_folder(tmp_path / 'more', size=8, classes=('cat', 'dog'), per_class=17)
  with pytest.raises(errors.USER_ERRORS, match=r'trained on other data: 32 training examples, here 34'):
    train.train_and_evaluate(_small(tmp_path / 'more'), str(workdir), devices=one)
  assert _snapshot(workdir) == before
  # The same images in another folder resume (test_a_dataset_moved_to_another_directory_resumes).


def test_damaged_run_records_are_one_line_in_every_command(small_run, tmp_path, capsys):
  from experiments import fig7, report
  runs = tmp_path / 'runs'
  workdir = runs / 'exp' / 'resnet-8' / 'seed0'
  shutil.copytree(small_run / 'run', workdir)
  one = jax.devices()[:1]
  # metrics.jsonl with a damaged line inside (not the last, which a kill may cut short and a resume redoes).
  rows = (workdir / 'metrics.jsonl').read_text().splitlines()
  (workdir / 'metrics.jsonl').write_text('\n'.join([rows[0][:20]] + rows[1:]) + '\n')
  before = _snapshot(workdir)
  with pytest.raises(errors.USER_ERRORS,
                     match=r'metrics\.jsonl line 1 is not a metrics row .* Restore it, or delete that'):
    train.train_and_evaluate(_small(small_run / 'images', num_steps=9), str(workdir), force_resume=True,
                                  devices=one)
  assert _snapshot(workdir) == before
  with pytest.raises(SystemExit, match=r'error: .*metrics\.jsonl line 1 is not a metrics row'):
    report.main([str(runs)])
  (workdir / 'metrics.jsonl').write_text('\n'.join(rows) + '\n')
  # config.json cut short: the resume (test_damaged_config_record_in_the_workdir_is_one_clear_error), the report,
  # fig7 and the evaluator each say so in one line.
  (workdir / 'config.json').write_text((workdir / 'config.json').read_text()[:40])
  for command in (lambda: report.main([str(runs)]), lambda: fig7.main([str(runs / 'exp')])):
    with pytest.raises(SystemExit, match=r'error: .*config\.json is not valid JSON .*use another --workdir'):
      command()
  argv, env = _command(workdir, '--protocol=center', module='resnet_jax.evaluate')
  evaluated = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert 'config.json is not valid JSON' in _one_error_line(evaluated)


def test_forced_resume_keeps_each_earlier_config_record(small_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(small_run / 'run', workdir)
  images, one = small_run / 'images', jax.devices()[:1]
  train.train_and_evaluate(_small(images, num_steps=9), str(workdir), force_resume=True, devices=one)
  train.train_and_evaluate(_small(images, num_steps=9, learning_rate=0.05), str(workdir), force_resume=True,
                             devices=one)
  train.train_and_evaluate(_small(images, num_steps=9, learning_rate=0.05), str(workdir), devices=one)  # same
  records = [_config_record(workdir / name) for name in ('config.json.1', 'config.json.2', 'config.json')]
  assert [(r['num_steps'], r['learning_rate']) for r in records] == [(6, 0.1), (9, 0.1), (9, 0.05)]
  assert not (workdir / 'config.json.3').exists()  # an unchanged config replaces nothing


def test_damaged_config_record_in_the_workdir_is_one_clear_error(reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  (workdir / 'config.json').write_text('{"model": {"depth": 8')
  before = _snapshot(workdir)
  with pytest.raises(errors.USER_ERRORS, match=r'config\.json is not valid JSON .* Restore it .*or use another --workdir'):
    train.train_and_evaluate(_ref_config(), str(workdir))
  assert _snapshot(workdir) == before


@pytest.mark.parametrize('kind', ['under a file', 'read-only'])
def test_unwritable_workdir_is_refused_and_nothing_is_created(tmp_path, kind):
  if kind == 'under a file':
    (tmp_path / 'afile').write_text('x')
    workdir = tmp_path / 'afile' / 'run'
  elif os.geteuid() == 0:
    workdir = '/proc/resnet_jax_workdir/run'  # not writable even for root
  else:
    (tmp_path / 'ro').mkdir(mode=0o500)
    workdir = tmp_path / 'ro' / 'run'
  with pytest.raises(PermissionError, match='choose another --workdir'):
    train.train_and_evaluate(_ref_config(), str(workdir))
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes only the command line can make (subprocesses; they stop before any JAX work).

@pytest.mark.parametrize('args,message', [
    (['--config=configs/nope.py'], r"cannot load the config file 'configs/nope.py': no such file\. Configs: .*"
                                   r'configs/cifar_110\.py'),
    (['--config.num_steps=abc'], r"flag --config\.num_steps=abc: .*invalid literal for int"),
    (['--config.model.nonsense=3'], r"config\.model has no field 'nonsense'\. Fields of config\.model: "
                                    r'bn_epsilon, .*shortcut'),
])
def test_command_line_mistakes_are_one_clear_message(reference, tmp_path, args, message):
  import re
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  before = _snapshot(workdir)
  if args[0].startswith('--config='):
    out = _main(workdir, config=args[0].split('=', 1)[1])
  else:
    out = _main(workdir, *args)
  assert out.returncode == 1
  assert re.search(message, out.stderr) and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert _snapshot(workdir) == before


def test_a_workdir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path):
  afile = tmp_path / 'notes.txt'
  afile.write_text('my notes')
  line = _one_error_line(_main(afile))
  assert f"The workdir '{afile}' cannot be created: {afile} is a file; choose another --workdir." in line
  assert afile.read_text() == 'my notes'
