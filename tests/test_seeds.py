"""Several seeds in one program (config.num_seeds): each replica trains as the run of its seed alone, on any mesh;
outputs per seed; bad values refused before anything is written. The kill-and-resume case is in
test_reliability.py.

Tolerance. A replica is not bit-identical to the run of its seed alone. With seed_batching='vmap' the convolutions'
kernels gain a leading replica axis, which XLA lowers as one grouped convolution (the replicas as feature groups)
instead of K plain ones, and its kernels add the products in another order. With 'unroll' (the CPU's default)
each replica runs the single-seed step, but XLA compiles the K steps as one program and fuses some reductions
differently (differences of a few 1e-9 after 5 steps). Either way the difference is float32 rounding: 1e-5
(relative and absolute), the tolerance of the 1- vs 4-device comparison in test_train_step.py, after a few steps.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, errors, mesh as mesh_lib, metrics_io, run_record, seeds, train, validation
from helpers import model_and_state, tiny_config, training_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
TIMING = ('examples_per_sec',)


def _steps(config, devices, steps):
  _, state, step, args = training_step(config, mesh_lib.make_mesh(devices))
  for _ in range(steps):
    state = step(state, *args)
  return jax.device_get(state)


def _assert_trees_close(a, b, tol=TOL):
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0])
  assert paths_a == paths_b
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    assert np.shape(x) == np.shape(y), jax.tree_util.keystr(path)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize('batching', ['unroll', 'vmap'])
def test_two_seeds_in_one_step_equal_each_seed_trained_alone(batching):
  # 5 steps cross the lr boundary at step 4 of the tiny recipe.
  both = _steps(tiny_config(num_seeds=2, seed_batching=batching), jax.devices()[:1], 5)
  assert both.params['head']['kernel'].shape[0] == 2 and both.step.tolist() == [5, 5]
  for k in (0, 1):
    alone = _steps(tiny_config(seed=k), jax.devices()[:1], 5)
    _assert_trees_close(jax.tree_util.tree_map(lambda a: a[k], both), alone)
  # The replicas are different runs (own init, data order, augmentation): the comparison above can fail.
  assert abs(float(both.train_sums['loss'][0]) - float(both.train_sums['loss'][1])) > 1e-3


def test_replica_initial_states_are_the_single_seed_initial_states_bit_for_bit():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  _, both = model_and_state(tiny_config(seed=3, num_seeds=2), mesh)
  for k, seed in enumerate((3, 4)):
    _, alone = model_and_state(tiny_config(seed=seed), mesh)
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(both)), jax.tree_util.tree_leaves(jax.device_get(alone))):
      np.testing.assert_array_equal(x[k], y)
@pytest.mark.slow
def test_two_seeds_on_1_and_4_devices_give_the_same_states():
  config = tiny_config(num_seeds=2, bn_group_size=16)  # groups spanning two devices' 8 examples each
  _assert_trees_close(_steps(config, jax.devices()[:1], 2), _steps(config, jax.devices(), 2))


def test_seed_batching_is_unrolled_on_the_cpu_by_default_and_unknown_values_are_refused():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  assert seeds.seed_batching(tiny_config(num_seeds=2), mesh) == 'unroll'
  assert seeds.seed_batching(tiny_config(num_seeds=2, seed_batching='vmap'), mesh) == 'vmap'
  with pytest.raises(errors.USER_ERRORS, match='valid choices: auto, vmap, unroll'):
    validation.validate(tiny_config(seed_batching='scan'), 1)


def test_num_seeds_below_one_is_refused():
  with pytest.raises(errors.USER_ERRORS, match=r'config\.num_seeds=0 must be at least 1'):
    validation.validate(tiny_config(num_seeds=0), 1)
@pytest.mark.slow
def test_a_step_too_large_for_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.setattr(validation, 'available_memory_bytes', lambda device: 1000)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.USER_ERRORS,
                     match=r'num_seeds=2 seed\(s\) needs about [0-9.]+ GiB .* but 0\.00 GiB is available'):
    train.train_and_evaluate(tiny_config(num_seeds=2), str(workdir))
  assert not workdir.exists()
@pytest.mark.slow
def test_memory_estimate_grows_with_the_seeds():
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  estimates = []
  for k in (1, 4):
    _, state, step, args = training_step(tiny_config(num_seeds=k), mesh)
    estimates.append(validation.step_memory_bytes(step.lower(state, *args).compile()))
  assert estimates[0] is not None and estimates[1] > 2 * estimates[0]


def test_resuming_with_another_number_of_seeds_is_refused_and_old_records_read_as_one_seed(tmp_path):
  run_record.write(str(tmp_path), tiny_config(num_seeds=2))
  with pytest.raises(errors.ConfigMismatchError, match=r'num_seeds: checkpoint has 2, this run has 3'):
    run_record.check_resume(str(tmp_path), tiny_config(num_seeds=3))
  older = run_record.config_to_dict(tiny_config())
  del older['num_seeds']  # a config.json written before the field existed
  run_record.write_json(str(tmp_path / 'config.json'), older)
  run_record.check_resume(str(tmp_path), tiny_config())
  with pytest.raises(errors.ConfigMismatchError, match='num_seeds'):
    run_record.check_resume(str(tmp_path), tiny_config(num_seeds=2))


def _rows(path):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics_io.read_metrics(str(path))]


@pytest.mark.slow
def test_a_run_of_two_seeds_writes_each_seed_as_the_run_of_that_seed_alone(tmp_path):
  both = tmp_path / 'both'
  last = train.train_and_evaluate(tiny_config(num_seeds=2), str(both))
  assert last['step'] == 6 and sorted(last['seeds']) == [0, 1]
  assert not (both / 'metrics.jsonl').exists() and (both / 'curves.png').stat().st_size > 1000
  assert json.load(open(both / 'config.json'))['num_seeds'] == 2
  final = checkpoint.Checkpointer(str(both)).load_arrays(6)
  seed_rows = []
  for k in (0, 1):
    alone = tmp_path / f'alone{k}'
    train.train_and_evaluate(tiny_config(seed=k), str(alone))
    recorded = json.load(open(both / f'seed{k}' / 'config.json'))
    assert (recorded['seed'], recorded['num_seeds']) == (k, 1)
    rows, expected = _rows(both / f'seed{k}' / 'metrics.jsonl'), _rows(alone / 'metrics.jsonl')
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected] and [r['step'] for r in rows] == [3, 6]
    for r, e in zip(rows, expected):
      for key in r:
        assert r[key] == pytest.approx(e[key], rel=TOL, abs=TOL), (k, r['step'], key)
    _assert_trees_close(jax.tree_util.tree_map(lambda a: a[k], final),
                        checkpoint.Checkpointer(str(alone)).load_arrays(6))
    seed_rows.append(rows)
  assert seed_rows[0] != seed_rows[1]


def test_report_reads_each_seed_of_a_program(tmp_path):
  from experiments import report
  for k, err in ((0, 0.09), (1, 0.085), (2, 0.1)):
    run = tmp_path / 'table6' / 'resnet-20' / 'seeds0-2' / f'seed{k}'
    run.mkdir(parents=True)
    c = seeds.single_seed_config(tiny_config(**{'model.depth': 20, 'num_steps': 64_000}), k)
    c.data.dataset = 'cifar10'
    (run / 'config.json').write_text(c.to_json())
    (run / 'metrics.jsonl').write_text(json.dumps({'step': 64_000, 'train_error': 0.01, 'test_error': err}) + '\n')
  (tmp_path / 'table6' / 'resnet-20' / 'seeds0-2' / 'config.json').write_text(tiny_config(num_seeds=3).to_json())
  text = report.render(str(tmp_path), str(tmp_path / 'report.md'), plot=False)
  row = next(l for l in text.splitlines() if l.startswith('| resnet-20 | 0,1,2 |'))
  assert '| 8.50 (9.17 ± 0.76, n=3) (single view) |' in row  # best, then mean ± sample std over the 3 seeds


@pytest.mark.slow
def test_benchmark_of_two_seeds_sums_images_over_the_seeds(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1', OUT=str(tmp_path),
             PY=sys.executable, CONFIGS='configs/digits.py', SEEDS='2', STEPS='1', REPEATS='1', WARMUP='0',
             ARGS='--config.model.depth=8 --config.batch_size=32 --config.bn_group_size=8 '
                  '--config.data.image_size=8 --config.data.pad=1')
  p = subprocess.run(['bash', 'benchmarks/seeds.sh'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  (line,) = (tmp_path / 'seeds_results.jsonl').read_text().splitlines()
  r = json.loads(line)
  assert r['config']['num_seeds'] == 2
  assert r['images_per_sec'] == pytest.approx(2 * 32 / r['step_time_s'])
  assert r['step_memory_bytes'] > 0 and r['peak_memory_bytes'] > r['step_memory_bytes']
  assert 'ResNet-8' in p.stdout and ' 2 ' in p.stdout


def test_curves_of_several_seeds_are_their_mean_with_a_one_std_band(tmp_path):
  from resnet_jax import plotting
  seeds = [[{'step': 10, 'test_error': 0.5}, {'step': 20, 'test_error': 0.3}],
           [{'step': 10, 'test_error': 0.7}, {'step': 20, 'test_error': 0.1}, {'step': 30, 'test_error': 0.1}]]
  steps, mean, std = plotting.mean_and_std(seeds, 'test_error')
  assert steps == [10, 20]  # the steps every seed logged
  np.testing.assert_allclose(mean, [60, 20])
  np.testing.assert_allclose(std, [10, 10])
  assert plotting.plot_curves({'ResNet-8': seeds}, str(tmp_path / 'c.png'))
  assert (tmp_path / 'c.png').stat().st_size > 1000
@pytest.mark.slow
def test_a_non_finite_replica_is_counted_and_skipped_alone():
  config = tiny_config(num_seeds=2, nonfinite_loss='skip')
  _, state, step, args = training_step(config, mesh_lib.make_mesh(jax.devices()[:1]))
  broken = state.params['head']['kernel'].at[1].set(np.nan)  # replica 1 (seed 1) only
  state = step(state.replace(params={**state.params, 'head': {**state.params['head'], 'kernel': broken}}), *args)
  state = jax.device_get(state)
  assert state.train_sums['nonfinite'].tolist() == [0, 1] and state.train_sums['count'].tolist() == [32, 0]
  assert state.step.tolist() == [1, 1]  # the skipped replica moves on to its next batch
  alone = _steps(tiny_config(seed=0), jax.devices()[:1], 1)
  _assert_trees_close(jax.tree_util.tree_map(lambda a: a[0], state), alone)


def test_table6_trains_consecutive_seeds_of_a_net_as_one_program():
  from experiments import table6
  (spec,) = table6.make_specs(['resnet-20'], [0, 1], steps=10)
  assert spec.config.num_seeds == 2 and spec.workdir('R').endswith(os.path.join('resnet-20', 'seeds0-1'))
  assert table6.seed_groups([0, 1, 2, 7, 9, 10]) == [[0, 1, 2], [7], [9, 10]]


def test_a_sweep_counts_a_program_of_seeds_finished_only_when_every_seed_is(tmp_path):
  from experiments import sweep
  done = json.dumps({'step': 10, 'test_error': 0.5}) + '\n'
  assert sweep.run_status(str(tmp_path), 10) == 'new'
  for k, text in ((0, done), (1, json.dumps({'step': 5, 'train_error': 0.5}) + '\n')):
    (tmp_path / f'seed{k}').mkdir()
    (tmp_path / f'seed{k}' / 'metrics.jsonl').write_text(text)
  assert sweep.run_status(str(tmp_path), 10) == 'partial'
  (tmp_path / 'seed1' / 'metrics.jsonl').write_text(done)
  assert sweep.run_status(str(tmp_path), 10) == 'finished'
