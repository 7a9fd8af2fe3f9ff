"""Multi-host runs proven on one box: 2 processes x 2 virtual CPU devices on 127.0.0.1 against 1 process x 4 devices.

Each multi-process test starts the real `python -m resnet_jax.main` twice (one per process) with jax.distributed over
loopback and gloo collectives, and stops by itself: every wait has a deadline, and processes still alive at the end
are killed.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, distributed, errors, metrics_io, models, train, train_step
from helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # every test here runs training processes
TIMING = ('examples_per_sec',)
# A ResNet-8 on 8x8 digits, batch 32 on 4 devices. bn_group_size=32: one BN group spans both processes, so the
# cross-host BN reduction is exercised as well as the gradient all-reduce.
OVERRIDES = {'num_steps': 6, 'batch_size': 32, 'bn_group_size': 32, 'log_every_steps': 1, 'eval_every_steps': 3,
             'checkpoint_every_steps': 3, 'eval_batch_size': 100, 'lr_boundaries': (4,)}
CLUSTER_ENV = ('SLURM_JOB_ID', 'SLURM_NTASKS', 'OMPI_MCA_orte_hnp_uri', 'JAX_COORDINATOR_ADDRESS')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _flags(workdir, overrides):
  args = ['--config=configs/digits.py', f'--workdir={workdir}', '--config.model.depth=8',
          '--config.data.image_size=8', '--config.data.pad=1', '--config.data.random_flip=True']
  for k, v in overrides.items():
    args.append(f'--config.{k}={v}')
  return args


def _launch(workdir, overrides, extra=(), num_processes=2):
  """Starts the processes of one run; returns them with the paths of their logs."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', PYTHONPATH=REPO,
             JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')  # jax binds all interfaces unless told
  procs = []
  for i in range(num_processes):
    out, err = (open(f'{workdir}.{i}.{s}', 'w') for s in ('out', 'err'))
    cmd = [sys.executable, '-m', 'resnet_jax.main', *_flags(workdir, overrides),
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}', f'--process_id={i}',
           '--initialization_timeout=60', *extra]
    procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env), out.name, err.name))
  return procs


def _wait(procs, timeout):
  """Waits for all processes; kills the rest at the deadline. Returns (returncodes, stdouts, stderrs)."""
  deadline = time.time() + timeout
  try:
    for p, _, _ in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p, _, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  read = lambda path: open(path).read()
  return [p.returncode for p, _, _ in procs], [read(o) for _, o, _ in procs], [read(e) for _, _, e in procs]


def _run(workdir, overrides, timeout=240):
  codes, outs, errs = _wait(_launch(workdir, overrides), timeout)
  assert codes == [0, 0], f'exit codes {codes}\n' + '\n'.join(e[-3000:] for e in errs)
  return outs


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in metrics_io.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]


def _params(workdir, step, config):
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  template = train_step.init_state(config, model, (8, 8, 3), 10)  # on one device: any checkpoint topology restores
  return checkpoint.Checkpointer(workdir).restore(template, step)


def _wait_for(path, text, procs, timeout=180):
  deadline = time.time() + timeout
  while text not in open(path).read():
    assert time.time() < deadline and all(p.poll() is None for p, _, _ in procs), \
        'no "%s" in %s:\n%s' % (text, path, ''.join(open(e).read()[-3000:] for _, _, e in procs))
    time.sleep(0.2)


def test_two_processes_train_like_one_process_with_four_devices_and_resume(tmp_path):
  config = tiny_config(**OVERRIDES)
  assert jax.device_count() == 4
  train.train_and_evaluate(config, str(tmp_path / 'one'))                 # 1 process x 4 devices

  # 2 processes x 2 devices. A SIGTERM to process 1 alone, sent before training starts, must stop both at the same
  # early step with a checkpoint (jax's preemption sync: the notice reaches every process) ...
  multi = str(tmp_path / 'multi')
  procs = _launch(multi, OVERRIDES)
  try:
    _wait_for(procs[1][1], 'jax.distributed: process 1 of 2', procs)
    procs[1][0].send_signal(signal.SIGTERM)
  finally:
    codes, first, errs = _wait(procs, 240)
  assert codes == [0, 0], f'exit codes {codes}\n' + '\n'.join(e[-3000:] for e in errs)
  assert 'process 0 of 2, 2 of 4 devices here' in first[0]
  stopped = int(re.search(r'Stopped by .* at step (\d+)', first[0]).group(1))
  assert 1 <= stopped < 6 and str(stopped) in os.listdir(os.path.join(multi, 'checkpoints'))
  # ... and the same command on both resumes from that checkpoint to the end.
  second = _run(multi, OVERRIDES)
  assert f'Resumed from {os.path.join(multi, "checkpoints")} at step {stopped}' in second[0]
  assert 'step 6/6' in second[0]
  assert 'step ' not in first[1] + second[1]  # process 1 prints no progress: logs come from process 0 only

  one, two = _rows(str(tmp_path / 'one')), _rows(multi)
  assert [r['step'] for r in two] == [1, 2, 3, 4, 5, 6]  # each row once: only process 0 writes metrics
  assert [sorted(r) for r in one] == [sorted(r) for r in two]
  worst = {}
  for a, b in zip(one, two):
    for k in a:
      worst[k] = max(worst.get(k, 0.0), abs(a[k] - b[k]))
      if k.endswith('_error') or k == 'step':
        assert a[k] == b[k], (a, b)  # counts of errors: every test example counted once on 2 processes too
      else:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (k, a, b)

  ref, got = _params(str(tmp_path / 'one'), 6, config), _params(multi, 6, config)
  assert int(got.step) == 6
  leaves = list(zip(jax.tree_util.tree_leaves((ref.params, ref.batch_stats, ref.opt_state)),
                    jax.tree_util.tree_leaves((got.params, got.batch_stats, got.opt_state))))
  assert len(leaves) > 20
  for x, y in leaves:
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
  worst['state (absolute)'] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)
  worst['state (relative)'] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.maximum(np.abs(x), 1e-3)))
                                  for x, y in leaves)
  print(f'\nstopped by SIGTERM at step {stopped}; largest |1 process - 2 processes| per metric and over the state: '
        + ', '.join(f'{k} {v:.2g}' for k, v in worst.items()))
  assert '6' in os.listdir(os.path.join(multi, 'checkpoints'))


def test_killing_one_process_stops_the_other_with_a_clear_message(tmp_path):
  workdir = str(tmp_path / 'run')
  procs = _launch(workdir, {**OVERRIDES, 'num_steps': 100_000, 'checkpoint_every_steps': 100_000,
                            'eval_every_steps': 100_000}, extra=['--heartbeat_timeout=10'])
  try:
    _wait_for(procs[0][1], 'step 3/', procs)  # training is under way on both
    procs[0][0].send_signal(signal.SIGKILL)  # the coordinator itself: the harder case for the survivor
    killed_at = time.time()
    procs[1][0].wait(timeout=90)  # bounded: the collective fails at once, or the heartbeat times out
  finally:
    codes, _, errs = _wait(procs, 1)
  assert codes[0] == -signal.SIGKILL
  assert codes[1] not in (0, None), 'the survivor exited 0 after losing a process'
  # Ours when a collective fails ("...the other processes failed..."), or jax's when the heartbeat times out first.
  assert ('a step with the other processes failed' in errs[1]
          or 'This most likely indicates that another task died' in errs[1]), errs[1][-3000:]
  assert time.time() - killed_at < 90
  print(f'\nthe survivor exited {time.time() - killed_at:.1f} s after the kill, code {codes[1]}')


def test_a_config_mistake_stops_every_process_with_one_message(tmp_path):
  codes, outs, errs = _wait(_launch(str(tmp_path / 'run'), {**OVERRIDES, 'batch_size': 30}), 120)
  assert codes == [1, 1], errs
  for err in errs:  # each process says it, without a stack trace, and none waits for the others
    assert 'config.batch_size=30 is not divisible by the 4 devices' in err and 'Traceback' not in err, err[-2000:]
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


# ---------------------------------------------------------------------------------------------------------------
# In-process: when the runtime starts, and the per-process feeding helpers (alone, a process owns every row).

def test_alone_nothing_is_started(monkeypatch):
  for k in CLUSTER_ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  assert distributed.detect() is None
  assert distributed.initialize('auto') is False and distributed.initialize('off') is False
  assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_the_environment_says_when_there_are_several_processes(monkeypatch):
  for k in CLUSTER_ENV:
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detect() is None  # one SLURM task is a run alone
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert distributed.detect() == 'SLURM'
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.detect('10.0.0.1:1234', 2) == 'flags'
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: True)
  assert distributed.detect() == 'Cloud TPU VM'


@pytest.mark.parametrize('kwargs,message', [
    ({'coordinator_address': '127.0.0.1:1234'}, 'together'),
    ({'coordinator_address': '127.0.0.1:1234', 'process_id': 0}, 'together'),
    ({'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 2}, 'between 0 and'),
    ({'mode': 'always'}, 'valid choices: auto, on, off'),
])
def test_incomplete_or_wrong_flags_are_refused_before_anything_starts(kwargs, message):
  with pytest.raises(errors.USER_ERRORS, match=message):
    distributed.initialize(**kwargs)
  assert not jax.distributed.is_initialized()
