"""A run checkpointed by an earlier release of the project resumes with the current code to the same run.

tests/data/digits_run_v1/workdir/ is the workdir of a tiny digits run (ResNet-8, 6 steps, lr boundary at 4,
checkpoint, log and evaluation every 3 steps, one CPU device) as it stood after step 3: checkpoint 3, the metrics line
of step 3, config.json and data.json. expected_metrics.jsonl is what the same run wrote when it went on to step 6
uninterrupted, and expected_model.json the SHA-256 of its final parameters and BN statistics. README.txt there says
how they were made. Resuming it through the command line must restore checkpoint 3 exactly (its recorded digest) and
reproduce every metrics line of that run exactly (wall-clock throughput aside), and, under the jax release the
fixture was made with, its final parameters bit for bit: XLA of another jax release may round the steps after the
checkpoint differently in the last bit, which is no fault of the checkpoint. When a change breaks this on purpose,
say so in the release notes; do not remake the fixture to make the test pass.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'data', 'digits_run_v1')
# The flags the fixture's run was made with (README.txt), after --config=configs/digits.py.
OVERRIDES = ('--config.model.depth=8', '--config.num_steps=6', '--config.lr_boundaries=(4,)',
             '--config.checkpoint_every_steps=3', '--config.log_every_steps=3', '--config.eval_every_steps=3',
             '--config.cpu_devices=1')
TIMING = ('examples_per_sec',)  # wall-clock throughput: the one field that cannot repeat between two runs

pytestmark = pytest.mark.slow  # trains in a subprocess


def _rows(path, drop=TIMING):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f if line.strip()]


def model_digest(workdir, step: int) -> str:
  """SHA-256 over the path, dtype, shape and bytes of every array of the parameters and BN statistics (the model,
  not the optimiser or the run's counters) in checkpoint `step` of `workdir`, in path order."""
  from resnet_jax import checkpoint
  arrays = checkpoint.Checkpointer(str(workdir)).load_arrays(step)
  h = hashlib.sha256()

  def add(prefix, tree):
    if isinstance(tree, dict):
      for k in sorted(tree):
        add(f'{prefix}/{k}', tree[k])
    else:
      a = np.ascontiguousarray(np.asarray(tree))
      h.update(f'{prefix}|{a.dtype.str}|{a.shape}|'.encode())
      h.update(a.tobytes())

  for part in ('params', 'batch_stats'):
    add(part, arrays[part])
  return h.hexdigest()


@pytest.fixture(scope='module', params=[
    pytest.param((), id='workdir alone'),
    pytest.param(('--config=configs/digits.py', *OVERRIDES), id='config and the same overrides'),
])
def resumed(request, tmp_path_factory):
  """The fixture's workdir after `python -m resnet_jax.main --workdir=W` with the parameter's flags."""
  workdir = tmp_path_factory.mktemp('resumed') / 'digits_run_v1'
  shutil.copytree(os.path.join(FIXTURE, 'workdir'), workdir)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # the recorded config.cpu_devices decides
  env.update(JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  out = subprocess.run([sys.executable, '-m', 'resnet_jax.main', f'--workdir={workdir}', *request.param],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return workdir


def test_a_checkpoint_of_the_2026_12_07_release_resumes_to_the_metrics_of_its_uninterrupted_run(resumed):
  # Checkpoint 3 was restored, not set aside as damaged (which happens when its content differs from the SHA-256
  # recorded at save time, or it cannot be read) with the run trained again from scratch: the line of step 3 is
  # the fixture's own, kept with its throughput, and the checkpoint is still there as it was.
  assert not (resumed / 'checkpoints_damaged').exists()
  assert _rows(resumed / 'metrics.jsonl', drop=())[:1] == _rows(os.path.join(FIXTURE, 'workdir', 'metrics.jsonl'),
                                                                drop=())
  meta = os.path.join('checkpoints', '3', '_CHECKPOINT_METADATA')
  with open(resumed / meta, 'rb') as a, open(os.path.join(FIXTURE, 'workdir', meta), 'rb') as b:
    assert a.read() == b.read()

  expected = _rows(os.path.join(FIXTURE, 'expected_metrics.jsonl'))
  got = _rows(resumed / 'metrics.jsonl')
  assert [r['step'] for r in expected] == [3, 6]
  assert [r['step'] for r in got] == [3, 6]
  for want, row in zip(expected, got):
    differ = [f'{k}: {row.get(k)} instead of {want.get(k)}' for k in sorted(set(want) | set(row))
              if row.get(k) != want.get(k)]
    assert not differ, f'step {want["step"]}: ' + ', '.join(differ)


def test_a_checkpoint_of_the_2026_12_07_release_resumes_to_the_final_model_of_its_uninterrupted_run(resumed):
  with open(os.path.join(FIXTURE, 'expected_model.json')) as f:
    want = json.load(f)
  if jax.__version__ != want['jax']:
    pytest.skip(f'bit for bit only under jax {want["jax"]}, which made the fixture; this is jax {jax.__version__}')
  assert model_digest(resumed, want['step']) == want['sha256']
