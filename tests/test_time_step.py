"""The step-timing command (resnet_jax.time_step) and mixed precision: bfloat16 / float16 steps keep float32 state,
loss scaling works."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import errors, mesh as mesh_lib, models, summary, time_step, validation
from helpers import tiny_config, training_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_time_step_command_prints_consistent_json():
  env = dict(os.environ, PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, '-m', 'resnet_jax.time_step', '--config=configs/digits.py', '--json',
                      '--steps=2', '--repeats=2', '--warmup=1', '--config.model.depth=8', '--config.batch_size=32',
                      '--config.bn_group_size=8', '--config.data.image_size=8', '--config.data.pad=1',
                      '--num_devices=1'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r['config']['batch_size'] == 32 and r['config']['image_size'] == 8 and r['config']['depth'] == 8
  assert len(r['step_times_s']) == 2 and all(t > 0 for t in r['step_times_s'])
  assert r['step_time_s'] == pytest.approx(float(np.median(r['step_times_s'])))
  assert r['images_per_sec'] == pytest.approx(32 / r['step_time_s'])
  params, macs = summary.count(tiny_config().model, 8)
  assert (r['params'], r['macs_per_image']) == (params, macs)
  assert r['model_flops_per_sec'] == pytest.approx(6 * macs * r['images_per_sec'])
  assert r['compile_s'] > 0 and r['lower_s'] > 0
  assert r['device']['platform'] == 'cpu' and r['utilisation'] is None  # no known CPU peak
  assert math.isfinite(r['final_train_loss']) and r['final_train_loss'] > 0


def test_time_step_rejects_a_training_set_smaller_than_a_batch():
  with pytest.raises(errors.USER_ERRORS, match='at least one batch'):
    time_step.run(tiny_config(), steps=1, repeats=1, examples=8, devices=jax.devices()[:1])


def test_peak_flops_known_for_h100_unknown_for_cpu():
  assert time_step.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert time_step.peak_flops('NVIDIA H100 80GB HBM3', 'float32') == 494e12
  assert time_step.peak_flops('cpu', 'float32') is None


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision.

_STEP_FNS = {}


def _run_steps(config, steps, state=None):
  """`steps` training steps from `state` (default: the initial state); one compiled step per distinct config."""
  key = config.to_json()
  if key not in _STEP_FNS:
    _, init, step, args = training_step(config, mesh_lib.make_mesh(jax.devices()[:1]))
    _STEP_FNS[key] = (jax.device_get(init), step, args)  # on the host: the step donates the state it is given
  init, step, args = _STEP_FNS[key]
  state = jax.device_put(init if state is None else state)
  for _ in range(steps):
    state = step(state, *args)
  return jax.device_get(state)


def _leaves(state):
  return jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state))


def _loss(state):
  return float(state.train_sums['loss']) / float(state.train_sums['count'])


@pytest.mark.slow
def test_half_precision_keeps_float32_state_and_tracks_float32():
  ref = _run_steps(tiny_config(), 2)
  assert ref.loss_scale is None  # loss scaling is off by default: the state has no extra leaves
  for dtype in ('bfloat16', 'float16'):
    half = _run_steps(tiny_config(**{'model.dtype': dtype}), 2)
    assert all(x.dtype == np.float32 for x in _leaves(half)), dtype
    assert _loss(half) == pytest.approx(_loss(ref), rel=0.05), dtype
    # Close to float32, but not bit-identical: the compute dtype is really used.
    diffs = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(half.params),
                                                  jax.tree_util.tree_leaves(ref.params))]
    assert 0 < max(diffs) < 0.05, dtype


def test_loss_scaling_only_with_float16():
  with pytest.raises(errors.USER_ERRORS, match='float16'):
    validation.validate(tiny_config(**{'loss_scale.enabled': True}), 1)
  with pytest.raises(errors.USER_ERRORS, match='factor > 1'):
    validation.validate(tiny_config(**{'loss_scale.enabled': True, 'model.dtype': 'float16', 'loss_scale.factor': 1.0}),
                   1)
  validation.validate(tiny_config(**{'loss_scale.enabled': True, 'model.dtype': 'float16'}), 1)


_SCALED = {'model.dtype': 'float16', 'loss_scale.enabled': True, 'loss_scale.initial': 256.0,
           'loss_scale.growth_interval': 2}


@pytest.mark.slow
def test_loss_scaling_matches_unscaled_step_and_grows():
  plain = _run_steps(tiny_config(**{'model.dtype': 'float16'}), 2)
  scaled = _run_steps(tiny_config(**_SCALED), 2)
  for a, b in zip(jax.tree_util.tree_leaves(scaled.params), jax.tree_util.tree_leaves(plain.params)):
    np.testing.assert_allclose(a, b, atol=2e-3)
  assert float(scaled.loss_scale['scale']) == 512.0  # two finite steps: grown once
  assert int(scaled.loss_scale['good_steps']) == 0


def test_overflowing_step_is_skipped_and_halves_the_scale():
  config = tiny_config(**_SCALED)
  init = _run_steps(config, 0)
  huge = init.replace(loss_scale={'scale': np.float32(2.0 ** 40), 'good_steps': np.int32(0)})
  after = _run_steps(config, 1, huge)
  assert float(after.loss_scale['scale']) == 2.0 ** 39
  for a, b in zip(_leaves(after), _leaves(init)):  # parameters, BN statistics and momentum untouched
    np.testing.assert_array_equal(a, b)
  assert int(after.step) == 1


# ---------------------------------------------------------------------------------------------------------------
# Scanning over identical blocks (compile-time option).

def _stack_unrolled_into_scanned(unrolled, scanned_shapes):
  """Maps an unrolled variable tree onto the scanned layout: blocks 2..n of a stage stacked on a leading axis."""
  out = {}
  for name in scanned_shapes:
    if '_blocks' in name:  # 'stage1_blocks2to3'
      stage, rng = name.split('_blocks')
      first, last = map(int, rng.split('to'))
      blocks = [unrolled[f'{stage}_block{b}'] for b in range(first, last + 1)]
      out[name] = {'block': jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
    else:
      out[name] = unrolled[name]
  return out


@pytest.mark.slow
def test_scanned_blocks_compute_the_same_network():
  config = tiny_config(**{'model.depth': 20})  # 3 blocks per stage: 1 unrolled + a scan of 2
  plain = models.create_model(config.model, bn_group_size=8)
  config.model.scan_blocks = True
  scanned = models.create_model(config.model, bn_group_size=8)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3)) + 0.5
  v_plain = jax.jit(lambda: plain.init(jax.random.key(0), x, train=False))()
  v_scan_shapes = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, train=False))
  assert 'stage2_blocks2to3' in v_scan_shapes['params'] and 'stage2_block2' not in v_scan_shapes['params']
  assert sum(a.size for a in jax.tree_util.tree_leaves(v_scan_shapes)) == sum(
      a.size for a in jax.tree_util.tree_leaves(v_plain))
  v_scan = {k: _stack_unrolled_into_scanned(v_plain[k], v_scan_shapes[k]) for k in v_plain}
  run = lambda m, v: jax.jit(lambda v: m.apply(v, x, train=True, mutable=['batch_stats']))(v)
  (y_plain, s_plain), (y_scan, s_scan) = run(plain, v_plain), run(scanned, v_scan)
  np.testing.assert_allclose(y_scan, y_plain, rtol=1e-5, atol=1e-5)
  # And the same gradients (the scanned convolutions bring their own gradient rule).
  loss = lambda m: lambda p, v: m.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])[0].sum()
  g_plain = jax.jit(jax.grad(loss(plain)))(v_plain['params'], v_plain)
  g_scan = jax.jit(jax.grad(loss(scanned)))(v_scan['params'], v_scan)
  g_expected = _stack_unrolled_into_scanned(g_plain, g_scan)
  for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The moving averages of the scanned blocks land in the same (stacked) places.
  s_expected = _stack_unrolled_into_scanned(s_plain['batch_stats'], s_scan['batch_stats'])
  for a, b in zip(jax.tree_util.tree_leaves(s_scan['batch_stats']), jax.tree_util.tree_leaves(s_expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_scanned_backward_keeps_every_convolution_in_the_fast_layout():
  """Inside a scan body XLA:CPU does not rewrite convolutions into the one layout its fast kernels take, so the
  gradient convolutions of autodiff ran in its generic loop (a ResNet-56 step: 75 s instead of 1.2 s). The scanned
  blocks write their gradients in that layout themselves (`xla_workarounds.conv_with_explicit_gradients`)."""
  config = tiny_config(**{'model.depth': 20})
  config.model.scan_blocks = True
  model = models.create_model(config.model, bn_group_size=0)
  x = jnp.ones((4, 16, 16, 3))  # 4x4 maps in stage 3: smaller ones turn the 3x3 kernel into a special case
  v = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
  loss = lambda p: model.apply({**v, 'params': p}, x, train=True, mutable=['batch_stats'])[0].sum()
  hlo = jax.jit(jax.grad(loss)).lower(v['params']).compile().as_text()
  layouts = [line.split('dim_labels=', 1)[1].split(',', 1)[0] for line in hlo.splitlines() if ' convolution(' in line]
  assert len(layouts) >= 19 and set(layouts) == {'b01f_01io->b01f'}, sorted(set(layouts))


@pytest.mark.slow
def test_op_profile_attributes_the_step_to_kernel_kinds():
  """benchmarks/probes/op_profile.py reads jax.profiler's trace through a private jax module: keep it working."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_cpu_multi_thread_eigen=false')
  p = subprocess.run([sys.executable, 'benchmarks/probes/op_profile.py', '--depth', '8', '--batch', '4',
                      '--top', '40'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.strip().splitlines()
  total_ms = float(lines[0].split('kernels ')[1].split(' ms')[0])
  rows = [line.split(None, 3) for line in lines[2:]]
  assert len(rows) < 40  # every kind printed
  # Each row is rounded to 0.1 ms.
  assert total_ms > 0 and sum(float(r[0]) for r in rows) == pytest.approx(total_ms, abs=0.05 * len(rows) + 0.05)
  kinds = {r[3] for r in rows}
  # ResNet-8: a stem conv and 3 stages of 2 convs, each with a forward, an input-gradient (not for the stem) and a
  # weight-gradient conv; all 3x3, so the 3x3 windows (forward and input gradient) come as 4 output shapes.
  assert sum(int(r[1]) for r in rows if r[3].startswith('conv 3x3')) == 7 + 6
  assert 'elementwise' in kinds and any(k.startswith('reduce') for k in kinds)
