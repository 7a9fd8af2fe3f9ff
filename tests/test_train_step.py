"""The training step: device-count independence, BN groups, lr schedule, warm-up, augmentation, exact eval."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import (augment, errors, evaluate, input_pipeline, mesh as mesh_lib, models, recipe, train_step,
                        validation)
from helpers import model_and_state, step_caller, tiny_config, training_step


def _one_step(config, devices, steps=1):
  _, state, step, args = training_step(config, mesh_lib.make_mesh(devices))
  for _ in range(steps):
    state = step(state, *args)
  return jax.device_get(state)


def _assert_states_close(a, b, tol=1e-5):
  np.testing.assert_allclose(a.train_sums['loss'], b.train_sums['loss'], rtol=tol, atol=tol)
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.batch_stats)),
                  jax.tree_util.tree_leaves((b.params, b.batch_stats))):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize('group', [8, 16])  # within one device's 8 examples, and spanning two devices
def test_step_on_1_and_4_devices_is_the_same_for_the_same_bn_group_size(group):
  assert len(jax.devices()) == 4
  config = tiny_config(bn_group_size=group)
  one, four = _one_step(config, jax.devices()[:1], 2), _one_step(config, jax.devices(), 2)
  _assert_states_close(one, four)


@pytest.mark.slow
def test_whole_batch_bn_on_4_devices_equals_one_device():
  config = tiny_config(bn_group_size=0)
  _assert_states_close(_one_step(config, jax.devices()[:1]), _one_step(config, jax.devices()))


@pytest.mark.slow
def test_bn_group_size_changes_the_numerics():
  """Groups of 8 and the whole batch are different computations: the equality tests above can fail."""
  a = _one_step(tiny_config(bn_group_size=8), jax.devices()[:1])
  b = _one_step(tiny_config(bn_group_size=0), jax.devices()[:1])
  assert abs(float(a.train_sums['loss']) - float(b.train_sums['loss'])) > 1e-4


def test_grouped_batchnorm_normalises_each_group_separately():
  from resnet_jax.batchnorm import BatchNorm
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + jnp.arange(8.0)[:, None, None, None]
  bn = BatchNorm(group_size=4)
  variables = bn.init(jax.random.key(0), x)
  y, state = bn.apply(variables, x, mutable=['batch_stats'])
  for g in range(2):
    grp = np.asarray(y[4 * g:4 * g + 4])
    np.testing.assert_allclose(grp.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(grp.var(axis=(0, 1, 2)), 1, atol=1e-3)
  group_means = np.asarray(x).reshape(2, 4, 4, 4, 3).mean(axis=(1, 2, 3)).mean(0)
  np.testing.assert_allclose(state['batch_stats']['mean'], 0.1 * group_means, rtol=1e-5, atol=1e-6)


def test_learning_rate_schedule_at_and_around_boundaries():
  c = tiny_config()
  c.learning_rate, c.lr_boundaries = 0.1, (32_000, 48_000)
  lr = lambda s: float(recipe.learning_rate(c, jnp.asarray(s), jnp.asarray(True)))
  for s, expected in ((0, 0.1), (31_999, 0.1), (32_000, 0.01), (47_999, 0.01), (48_000, 0.001), (63_999, 0.001)):
    assert lr(s) == pytest.approx(expected), s


def test_warmup_holds_then_returns_to_full_lr():
  c = tiny_config(lr_boundaries=(), lr_drop_fractions=())  # a constant rate after the warm-up
  c.warmup.enabled = True
  assert float(recipe.learning_rate(c, jnp.asarray(10), jnp.asarray(False))) == pytest.approx(0.01)
  assert float(recipe.learning_rate(c, jnp.asarray(10), jnp.asarray(True))) == pytest.approx(0.1)
  done, ema = jnp.asarray(False), jnp.asarray(0.9)
  history = []
  for step, err in enumerate([0.9, 0.85, 0.5, 0.5, 0.5, 0.5, 0.9, 0.9]):
    done, ema = recipe.update_warmup(c, jnp.asarray(step), done, ema, jnp.asarray(err))
    history.append(bool(done))
  # A moving average, so one good batch is not enough; once done, it stays done even if the error rises again.
  assert history[:3] == [False, False, False] and history[-1] and history.index(True) >= 3
  assert all(history[history.index(True):])


def test_warmup_cannot_last_forever():
  c = tiny_config()
  c.warmup.enabled, c.warmup.max_steps = True, 5
  done, ema = jnp.asarray(False), jnp.asarray(0.9)
  for step in range(5):
    assert not bool(done)
    done, ema = recipe.update_warmup(c, jnp.asarray(step), done, ema, jnp.asarray(0.95))  # error never falls
  assert bool(done)


@pytest.mark.slow
def test_warmup_switch_inside_the_real_step():
  """ResNet-110 recipe on the digits: the step returns to lr 0.1 once the error falls, within a few dozen steps."""
  c = tiny_config(num_steps=60, batch_size=64, lr_boundaries=(), lr_drop_fractions=())
  c.warmup.enabled = True
  _, state, step, args = training_step(c, mesh_lib.make_mesh(jax.devices()[:1]))
  lrs = []
  for _ in range(60):
    state = step(state, *args)
    lrs.append(float(state.train_sums['lr']))
  assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.1)
  switch = next(i for i, lr in enumerate(lrs) if lr == pytest.approx(0.1))
  assert all(lr == pytest.approx(0.01) for lr in lrs[:switch]) and 0 < switch < 60


def test_random_crop_returns_windows_of_the_padded_image():
  images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3)) + 1.0  # nonzero, so zero padding is visible
  crops = np.asarray(augment.random_crop(jax.random.key(1), images, pad=2))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(16):
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(crops[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert len(matches) == 1, i
    offsets.add(matches[0])
  assert len(offsets) > 3  # offsets vary across examples


def test_random_flip_flips_exactly_the_flipped_examples():
  images = jax.random.uniform(jax.random.key(0), (64, 4, 4, 3))
  out = np.asarray(augment.random_flip(jax.random.key(3), images))
  flipped = [np.array_equal(out[i], np.asarray(images[i])[:, ::-1]) for i in range(64)]
  kept = [np.array_equal(out[i], np.asarray(images[i])) for i in range(64)]
  assert all(f != k for f, k in zip(flipped, kept))
  assert 16 < sum(flipped) < 48


def test_epochs_visit_every_example_once_and_reshuffle():
  c = tiny_config(batch_size=10)
  n = 50  # 5 steps per epoch
  epoch0 = np.concatenate([np.asarray(input_pipeline.batch_indices(c, n, jnp.asarray(s), c.seed)) for s in range(5)])
  epoch1 = np.concatenate([np.asarray(input_pipeline.batch_indices(c, n, jnp.asarray(s), c.seed)) for s in range(5, 10)])
  assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)


def test_eval_counts_every_example():
  """1,001 examples at batch 100: 11 batches, the last one with one real example, all 1,001 counted, with the
  loss and error of the unbatched network."""
  c = tiny_config()
  model = models.create_model(c.model, bn_group_size=c.bn_group_size)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1001, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (1001,), dtype=np.int32)
  state = train_step.init_state(c, model, (8, 8, 3), 10)
  mean = augment.pixel_mean(images)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  batches = list(input_pipeline.padded_batches(images, labels, 100, lambda x: augment.normalize(x, mean)))
  assert len(batches) == 11 and batches[-1]['mask'].sum() == 1
  r = evaluate.evaluate(model, variables, batches)
  assert r['count'] == 1001
  logits = model.apply(variables, images - mean, train=False)
  logits = np.asarray(logits)
  assert r['top1_error'] == pytest.approx(float(np.mean(np.argmax(logits, -1) != labels)), abs=1e-9)
  loss = np.mean(-np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), labels[:, None], -1))
  assert r['loss'] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=30), 'not divisible by the 4 devices'),
    (dict(bn_group_size=64), 'must be between 0'),
    (dict(bn_group_size=12), 'does not divide config.batch_size'),
    (dict(batch_size=48, bn_group_size=16), 'neither divides nor is a multiple'),
    (dict(num_steps=0), 'num_steps=0 must be positive'),
    (dict(learning_rate=-0.1), 'learning_rate=-0.1 must be positive'),
])
def test_bad_run_shapes_are_refused_with_what_to_change(overrides, message):
  with pytest.raises(errors.USER_ERRORS, match=message):
    validation.validate(tiny_config(**overrides), 4)


@pytest.mark.slow
def test_a_two_axis_mesh_from_config_gives_the_same_step_as_one_device():
  config = tiny_config()
  config.mesh.axes, config.mesh.shape = ('replica', 'data'), (2, -1)
  mesh = mesh_lib.make_mesh(jax.devices()[:4], config.mesh)
  assert dict(mesh.shape) == {'replica': 2, 'data': 2}
  _, state, step, args = training_step(config, mesh)
  state = jax.device_get(step(state, *args))
  _assert_states_close(state, _one_step(tiny_config(), jax.devices()[:1]))


@pytest.mark.parametrize('axes,shape', [(('data',), (3,)), (('a', 'b'), (-1, -1)), (('data',), (0,)),
                                        (('a', 'a'), (2, 2)), (('data',), (2, 2))])
def test_a_mesh_that_does_not_fit_the_devices_is_refused(axes, shape):
  config = tiny_config()
  config.mesh.axes, config.mesh.shape = axes, shape
  with pytest.raises(errors.USER_ERRORS, match='config.mesh'):
    mesh_lib.make_mesh(jax.devices()[:4], config.mesh)


def _params_after_each_step(config, steps):
  """(params, velocity) after each of `steps` real steps on one device."""
  _, state, step, args = training_step(config, mesh_lib.make_mesh(jax.devices()[:1]))
  out = []
  for _ in range(steps):
    state = step(state, *args)
    out.append(jax.device_get((state.params, state.opt_state[1].trace)))
  return out


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_caffe_and_pytorch_momentum_agree_while_the_lr_is_constant_and_differ_after_a_drop():
  """Caffe: v = m v + lr g; w -= v. PyTorch: v = m v + g; w -= lr v. The lr drops from 0.1 to 0.01 at step 3."""
  runs = {form: _params_after_each_step(tiny_config(lr_boundaries=(3,), momentum_form=form), 4)
          for form in ('caffe', 'pytorch')}
  (caffe_w3, caffe_v3), (torch_w3, torch_v3) = runs['caffe'][2], runs['pytorch'][2]
  for c, t in zip(_leaves(caffe_w3), _leaves(torch_w3)):  # three steps at lr 0.1: the same parameters ...
    np.testing.assert_allclose(c, t, rtol=1e-4, atol=1e-6)
  for c, t in zip(_leaves(caffe_v3), _leaves(torch_v3)):  # ... and the Caffe velocity holds the lr
    np.testing.assert_allclose(c, 0.1 * t, rtol=1e-4, atol=1e-7)
  # The 4th step, the first at lr 0.01: PyTorch rescales the whole velocity by the new lr, Caffe keeps the old
  # steps at 0.1, so w_caffe - w_torch = m (0.1 - 0.01) v_torch (before the step's own gradient, which both scale
  # by 0.01).
  (caffe_w4, _), (torch_w4, _) = runs['caffe'][3], runs['pytorch'][3]
  diffs = [c - t for c, t in zip(_leaves(caffe_w4), _leaves(torch_w4))]
  expected = [-0.9 * (0.1 - 0.01) * v for v in _leaves(torch_v3)]
  assert max(np.abs(d).max() for d in diffs) > 1e-3
  for d, e in zip(diffs, expected):
    np.testing.assert_allclose(d, e, rtol=0.02, atol=1e-5)


def test_unknown_momentum_form_lists_the_choices():
  with pytest.raises(errors.USER_ERRORS, match=r"momentum_form 'nesterov'; valid choices: caffe, pytorch"):
    validation.validate(tiny_config(momentum_form='nesterov'), 4)


@pytest.mark.slow
def test_matmul_precision_highest_leaves_cpu_float32_steps_unchanged():
  """On a CPU, float32 matmuls and convs are full float32 whatever the precision, so the paper's default 'highest'
  changes nothing there (on GPUs it turns off TF32)."""
  config = tiny_config()
  runs = {}
  for precision in ('default', 'highest'):
    with jax.default_matmul_precision(precision):
      runs[precision] = _one_step(config, jax.devices()[:1], 2)
  for x, y in zip(jax.tree_util.tree_leaves(runs['default']), jax.tree_util.tree_leaves(runs['highest'])):
    np.testing.assert_array_equal(x, y)


def test_unknown_matmul_precision_lists_the_choices():
  with pytest.raises(errors.USER_ERRORS, match=r"matmul_precision 'tf32'; valid choices: highest, high, default"):
    validation.validate(tiny_config(matmul_precision='tf32'), 4)


def test_the_device_loop_gives_the_same_bits_however_the_steps_are_cut_into_calls():
  """The loop accelerators run (StepCaller with device_loop): 2, 4 and 3 steps per call, with calls cut short at
  every fourth step (calls of 1 step at 3 per call), all reach the same state after 12 steps, bit for bit."""
  mesh = mesh_lib.make_mesh()
  states = {}
  for n in (2, 4, 3):
    c = tiny_config(steps_per_call=n)
    inp = input_pipeline.InMemoryInput(c, mesh)
    model, state = model_and_state(c, mesh)
    steps = step_caller(c, model, mesh, inp, device_loop=True)
    args, done = next(inp.train_inputs(0)), 0
    while done < 12:
      k = min(n, 4 - done % 4)  # as the loop cuts calls at log points every 4 steps
      state, done = steps(state, k, *args), done + k
    states[n] = jax.device_get(state)
  for n in (4, 3):
    for a, b in zip(jax.tree_util.tree_leaves(states[2]), jax.tree_util.tree_leaves(states[n])):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(states[2].step) == 12
