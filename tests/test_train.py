"""End to end: the run, its outputs, resume, checkpoints, the CLI and its error messages."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, data, errors, metrics_io, train, train_step
from helpers import tiny_config, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('examples_per_sec',)


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in metrics_io.read_metrics(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow
def test_run_writes_metrics_config_plot_and_checkpoints(tmp_path):
  last = train.train_and_evaluate(tiny_config(), str(tmp_path))
  rows = metrics_io.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [3, 6]
  for r in rows:
    assert {'lr', 'train_loss', 'train_error', 'test_error', 'examples_per_sec'} <= set(r)
    assert 0 <= r['train_error'] <= 1 and 0 <= r['test_error'] <= 1
  assert rows[0]['lr'] == pytest.approx(0.1) and rows[1]['lr'] == pytest.approx(0.01)  # boundary at step 4
  assert json.load(open(tmp_path / 'config.json'))['model']['depth'] == 8
  assert (tmp_path / 'curves.png').stat().st_size > 1000
  assert checkpoint.Checkpointer(str(tmp_path)).all_steps() == [3, 6]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))
  assert last['step'] == 6


@pytest.mark.slow
def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
  full, part = tmp_path / 'full', tmp_path / 'part'
  train.train_and_evaluate(tiny_config(), str(full))
  train.train_and_evaluate(tiny_config(num_steps=3, lr_boundaries=(3,)), str(part))   # stops at step 3 ...
  with open(part / 'metrics.jsonl', 'a') as f:  # ... a line the killed run wrote after its last checkpoint
    f.write('{"step": 5, "train_loss": 123.0}\n')
  train.train_and_evaluate(tiny_config(), str(part), force_resume=True)  # ... and resumes to step 6
  assert _rows(full) == _rows(part)
  a = checkpoint.Checkpointer(str(full)).load_arrays(6)
  b = checkpoint.Checkpointer(str(part)).load_arrays(6)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_checkpoint_round_trips_the_whole_state(tmp_path):
  from resnet_jax import models
  c = tiny_config()
  model = models.create_model(c.model, bn_group_size=c.bn_group_size)
  state = train_step.init_state(c, model, (8, 8, 3), 10)
  state = state.replace(step=state.step + 7, warmup_done=~state.warmup_done,
                        params=jax.tree_util.tree_map(lambda p: p + 1.5, state.params),
                        opt_state=jax.tree_util.tree_map(lambda p: p + 0.25, state.opt_state))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(state)
  ckpt.wait()
  fresh = train_step.init_state(c, model, (8, 8, 3), 10)
  restored = ckpt.restore(fresh)
  assert int(restored.step) == 7
  flat_a, tree_a = jax.tree_util.tree_flatten(state)
  flat_b, tree_b = jax.tree_util.tree_flatten(restored)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_steps_per_call_changes_nothing_in_the_run(tmp_path):
  """1, 3 and 4 steps per call (calls cut short at log, evaluation and checkpoint points): on the CPU identical
  metrics lines and final state, bit for bit (a call's steps are dispatched one by one there; the device loop of
  accelerators is checked in test_train_step.py)."""
  runs = {}
  for n in (1, 3, 4):
    config = tiny_config(num_steps=12, lr_boundaries=(6,), log_every_steps=4, eval_every_steps=8,
                         checkpoint_every_steps=8, steps_per_call=n)
    train.train_and_evaluate(config, str(tmp_path / f'n{n}'))
    runs[n] = (_rows(tmp_path / f'n{n}'), checkpoint.Checkpointer(str(tmp_path / f'n{n}')).load_arrays(12))
  for n in (3, 4):
    assert runs[n][0] == runs[1][0]
    for x, y in zip(jax.tree_util.tree_leaves(runs[n][1]), jax.tree_util.tree_leaves(runs[1][1])):
      assert x.tobytes() == y.tobytes()
  assert [r['step'] for r in runs[1][0]] == [4, 8, 12]


def test_several_steps_per_call_need_the_in_memory_input():
  from resnet_jax import config_base, validation
  c = config_base.imagenet(18)
  c.steps_per_call = 4
  with pytest.raises(errors.USER_ERRORS, match='steps_per_call=4 needs an in-memory dataset'):
    validation.validate(c, 1)


@pytest.mark.slow
def test_resume_with_a_different_model_is_refused_naming_the_fields(tmp_path):
  train.train_and_evaluate(tiny_config(num_steps=3, lr_boundaries=(3,)), str(tmp_path))
  with pytest.raises(errors.ConfigMismatchError, match=r'model\.depth.*8.*14') as e:
    train.train_and_evaluate(tiny_config(**{'model.depth': 14, 'data.pad': 2}), str(tmp_path))
  assert 'data.pad' in str(e.value) and '--force_resume' in str(e.value)
  assert json.load(open(tmp_path / 'config.json'))['model']['depth'] == 8  # nothing overwritten


@pytest.mark.slow
def test_short_run_on_the_embedded_digits_drives_training_error_down(tmp_path):
  c = tiny_config(num_steps=60, batch_size=64, log_every_steps=10, eval_every_steps=60,
                  checkpoint_every_steps=60, lr_boundaries=(40,), bn_group_size=16)
  # The drop at 40 leaves 20 steps: in the paper's (Caffe) momentum form the velocity built at lr 0.1 decays over
  # about 10 steps after a drop, so a drop closer to the end leaves the last window still moving at the old rate.
  c.data.image_size, c.data.pad = 16, 2
  train.train_and_evaluate(c, str(tmp_path))
  rows = metrics_io.read_metrics(str(tmp_path / 'metrics.jsonl'))
  # The first window is near chance (0.9); a broken step (no learning, wrong sign) stays there. The last window is
  # a mean over 10 augmented batches at 2.5 epochs, so the bar is "halved and well below chance", not a tight number.
  assert rows[0]['train_error'] > 0.5
  assert rows[-1]['train_error'] < min(0.45, rows[0]['train_error'] / 2)
  assert rows[-1]['test_error'] < 0.35


def test_folder_source_decodes_images_and_labels(tmp_path):
  written = write_image_folder(tmp_path, size=8)
  ds = data.load_folder(str(tmp_path), image_size=8)
  assert ds.class_names == ['cat', 'dog', 'frog']
  assert ds.train_images.shape == (12, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert list(ds.train_labels) == [0] * 4 + [1] * 4 + [2] * 4
  # PNGs are lossless: the first image of 'dog' (label 1) is exactly what was written.
  np.testing.assert_array_equal(ds.train_images[4], written[('train', 'dog', '0.png')])


def test_folder_with_mismatched_classes_is_refused(tmp_path):
  write_image_folder(tmp_path, splits=('train',), size=8)
  write_image_folder(tmp_path, splits=('test',), classes=('cat', 'dog', 'horse'), size=8)
  with pytest.raises(errors.USER_ERRORS, match=r"test has classes that .*train lacks: \['horse'\]"):
    data.load_folder(str(tmp_path), image_size=8)


def test_validation_split_is_held_out_of_training():
  c = tiny_config()
  c.data.val_examples = 300
  ds = data.load(c.data)
  assert len(ds.val_labels) == 300 and len(ds.train_labels) == 1500 - 300
  train_set = {a.tobytes() for a in ds.train_images}
  assert sum(a.tobytes() in train_set for a in ds.val_images) < 30  # digits has a few duplicate images


def _main(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, '-m', 'resnet_jax.main', *args], capture_output=True, text=True,
                        cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_main_trains_and_resumes_from_the_command_line(tmp_path):
  args = ['--config=configs/digits.py', f'--workdir={tmp_path}', '--config.num_steps=4',
          '--config.lr_boundaries=(2,3)', '--config.data.image_size=8', '--config.data.pad=1', '--config.model.depth=8', '--config.batch_size=32',
          '--config.bn_group_size=16', '--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
          '--config.eval_every_steps=4']
  out = _main(*args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 4/4' in out.stdout and 'test err' in out.stdout
  longer = [*args[:2], '--config.num_steps=6', *args[3:]]
  refused = _main(*longer)  # more steps is another recipe: refused unless forced, the earlier config kept
  assert refused.returncode == 1 and 'num_steps: checkpoint has 4, this run has 6' in refused.stderr
  again = _main(*longer, '--force_resume')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed' in again.stdout and [r['step'] for r in _rows(tmp_path)] == [2, 4, 6]
  assert json.load(open(tmp_path / 'config.json.1'))['num_steps'] == 4
  assert json.load(open(tmp_path / 'config.json'))['num_steps'] == 6


@pytest.mark.parametrize('args,message', [
    (['--config.data.source=folder', '--config.data.data_dir=/nonexistent'], 'Expected an image folder'),
    (['--config.data.source=tfds'], 'tensorflow-datasets'),
    (['--config.data.source=ftp'], 'valid choices: tfds, folder, embedded'),
    (['--config.model.shortcut=D'], 'valid choices: A, B, C'),
    (['--config.batch_size=33'], 'not divisible by the 2 devices'),
])
def test_main_answers_bad_input_with_one_clear_message(tmp_path, args, message):
  if 'source=tfds' in args[0]:
    try:
      import tensorflow_datasets  # noqa: F401
      pytest.skip('tensorflow-datasets is installed here: the missing-package message cannot be shown')
    except ImportError:
      pass
  out = _main('--config=configs/digits.py', f'--workdir={tmp_path}', *args)
  assert out.returncode != 0
  assert message in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize('flag,line', [
    ('--config.batch_sise=2', "error: --config.batch_sise=2: config has no field 'batch_sise'; did you mean "
                              "'batch_size'? Fields of config: batch_size, bn_group_size, "),
    ('--config.model.dept=20', "error: --config.model.dept=20: config.model has no field 'dept'; did you mean "
                               "'depth'? Fields of config.model: bn_epsilon, bn_momentum, bottleneck, depth, "),
    ('--config.model.qqqzzz=20', "error: --config.model.qqqzzz=20: config.model has no field 'qqqzzz'. Fields of "
                                 "config.model: bn_epsilon, "),
])
def test_misspelt_config_field_is_one_line_with_the_closest_field_of_its_section(tmp_path, flag, line):
  out = _main('--config=configs/digits.py', f'--workdir={tmp_path / "run"}', flag)
  assert out.returncode == 1 and not (tmp_path / 'run').exists()
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(line), out.stderr
  assert '\\' not in lines[0] and lines[0].count('did you mean') <= 1
  section = flag.split('=')[0][len('--'):].rpartition('.')[0]  # 'config' or 'config.model'
  listed = lines[0].split(f'Fields of {section}: ')[1].rstrip('.').split(', ')
  from resnet_jax import config_base
  node = config_base.base()
  for part in section.split('.')[1:]:
    node = node[part]
  assert listed == sorted(node.keys())  # that section's fields, not another's


def test_unwritable_workdir_is_refused(tmp_path):
  if os.geteuid() == 0:
    target = '/proc/resnet_jax_workdir'  # not writable even for root
  else:
    (tmp_path / 'ro').mkdir(mode=0o500)
    target = str(tmp_path / 'ro' / 'run')
  out = _main('--config=configs/digits.py', f'--workdir={target}')
  assert out.returncode != 0 and 'not writable' in out.stderr and 'Traceback' not in out.stderr


def test_the_run_is_traced_under_config_matmul_precision(tmp_path, monkeypatch):
  seen = []

  class Seen(Exception):
    pass

  def create(*args):  # the first thing the run does after entering its scopes
    seen.append(jax.config.jax_default_matmul_precision)
    raise Seen
  monkeypatch.setattr(train.input_pipeline, 'create', create)
  for precision in ('highest', 'default'):
    with pytest.raises(Seen):
      train.train_and_evaluate(tiny_config(matmul_precision=precision), str(tmp_path))
  assert seen == ['highest', 'default'] and jax.config.jax_default_matmul_precision is None
  with pytest.raises(errors.USER_ERRORS, match='valid choices: highest, high, default'):
    train.train_and_evaluate(tiny_config(matmul_precision='tf32'), str(tmp_path))


@pytest.mark.slow
def test_a_bug_raising_valueerror_inside_the_step_keeps_its_traceback(tmp_path):
  """A ValueError is not a user's mistake unless the project raised it as one (errors.USER_ERRORS): one raised by a
  bug, here injected right after a call of the step, prints its traceback, not a one-line `error:`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             RESNET_JAX_TEST_FAULT='bug@train:1')
  out = subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'faults.py'), '--config=configs/digits.py',
                        f'--workdir={tmp_path}', '--config.num_steps=2', '--config.model.depth=8',
                        '--config.data.image_size=8', '--config.data.pad=1', '--config.batch_size=32',
                        '--config.bn_group_size=16'], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'Traceback' in out.stderr and 'ValueError: an injected bug at train at step 1' in out.stderr
  assert not any(line.startswith('error:') for line in out.stderr.splitlines())


def test_a_mistake_in_the_config_is_one_error_line_and_exit_1(tmp_path):
  out = _main('--config=configs/digits.py', f'--workdir={tmp_path / "run"}', '--config.momentum_form=nesterov')
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert lines[-1] == ("error: Unknown config.momentum_form 'nesterov'; valid choices: caffe, pytorch."), lines
  assert not (tmp_path / 'run').exists()


def test_the_workdir_defaults_to_runs_slash_the_config_name_and_a_missing_dataset_says_how_to_get_it(tmp_path):
  """The command the project is known by, typed as written: it says where it writes; without the dataset (here:
  tensorflow-datasets not installed, or no CIFAR-10 prepared offline) one line says how to get it, and nothing is
  left behind."""
  out = _main(f'--config={os.path.join(REPO, "configs", "cifar_110.py")}',
              '--config.data.data_dir=' + str(tmp_path / 'no_tfds_data'), cwd=tmp_path)
  assert f'Writing to {os.path.join("runs", "cifar_110")}' in out.stdout, out.stdout + out.stderr[-2000:]
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'tensorflow-datasets' in out.stderr or 'tfds build cifar10' in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / 'runs').exists()
