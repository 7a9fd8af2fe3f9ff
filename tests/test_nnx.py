"""The networks from Flax NNX (nnx_models.py): the same numbers as the Linen network from the same variables, BN
statistics that move in training mode only, and the code of docs/nnx.md run as written."""
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import checkpoint, config_base, models, nnx_models, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = 4  # BN groups of 4 in a batch of 8: two groups, so the grouped statistics are exercised


def assert_trees_close(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tolerance)


def max_change(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_variables(shapes, seed=0):
  """Variables of the tree of shapes `shapes` drawn with numpy (no XLA compilation, unlike the networks'
  initialisers): He-scaled kernels, scales near 1, biases and means near 0, variances near 1 and positive, so that
  both BN modes give other numbers than a fresh network would."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name, noise = jax.tree_util.keystr(path[-1:]), rng.standard_normal(s.shape)
    if "'kernel'" in name:
      value = noise * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif "'scale'" in name:
      value = 1.0 + 0.1 * noise
    elif "'var'" in name:
      value = np.exp(0.2 * noise)
    else:  # bias, mean
      value = 0.1 * noise
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def abstract_model(model_config, input_shape, bn_group_size):
  """The NNX model with shapes in place of arrays (nnx.eval_shape: nothing is drawn or compiled)."""
  return nnx.eval_shape(lambda: nnx_models.create_nnx_model(model_config, rngs=nnx.Rngs(0), input_shape=input_shape,
                                                            bn_group_size=bn_group_size))


@pytest.fixture(scope='module')
def resnet20():
  """(NNX model, the Linen network, a batch of 8 16x16 images) of the CIFAR ResNet-20, BN groups of 4, both with the
  same random variables."""
  model_config = config_base.cifar(20).model
  model = abstract_model(model_config, (16, 16, 3), GROUP)
  nnx_models.load_linen_variables(model, random_variables(nnx_models.linen_variables(model)))
  linen = models.create_model(model_config, bn_group_size=GROUP)
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  return model, linen, x


def test_resnet20_training_call_matches_linen_and_updates_bn_statistics(resnet20):
  model, linen, x = resnet20
  before = nnx_models.linen_variables(model)
  assert set(before) == {'params', 'batch_stats'} and 'stage3_block3' in before['params']
  stat_objects = [id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat)]
  assert len(stat_objects) == 2 * 19  # mean and var of the 19 BN layers

  logits = model(x, train=True)
  expected, updates = linen.apply(before, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  after = nnx_models.linen_variables(model)
  assert_trees_close(after['batch_stats'], updates['batch_stats'], rtol=1e-6, atol=1e-7)
  assert max_change(after['batch_stats'], before['batch_stats']) > 1e-3  # the statistics did move
  assert max_change(after['params'], before['params']) == 0.0  # a forward pass changes no parameter
  # Updated in place: the same BatchStat objects (the module graph does not change, see nnx_models.py).
  assert [id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat)] == stat_objects


def test_resnet20_evaluation_call_matches_linen_and_changes_nothing(resnet20):
  model, linen, x = resnet20
  before = nnx_models.linen_variables(model)
  logits = model(x, train=False)
  np.testing.assert_allclose(logits, linen.apply(before, x, train=False), rtol=1e-5, atol=1e-5)
  assert max_change(nnx_models.linen_variables(model), before) == 0.0
  # Training mode normalises with the batch's statistics: other outputs than evaluation mode's.
  assert float(jnp.abs(model(x, train=True) - logits).max()) > 1e-3


def test_mode_without_train_argument_follows_train_eval_and_view(resnet20):
  model, _, x = resnet20
  model(x, train=True)
  eval_logits = model(x, train=False)
  model.eval()
  try:
    before = nnx_models.linen_variables(model)
    np.testing.assert_array_equal(model(x), eval_logits)
    assert max_change(nnx_models.linen_variables(model), before) == 0.0
  finally:
    model.train()
  assert model.use_running_average is False
  assert nnx.view(model, use_running_average=True).use_running_average is True
  before = nnx_models.linen_variables(model)
  model(x)  # a new (or .train()) model trains
  assert max_change(nnx_models.linen_variables(model)['batch_stats'], before['batch_stats']) > 0


@pytest.mark.parametrize('graph', [True, False], ids=['graph_mode', 'tree_mode'])
def test_jitted_training_call_matches_the_eager_one(resnet20, graph):
  """Under nnx.jit, in graph and in tree mode, the BN update comes out of the compiled function as it does eagerly."""
  model, _, x = resnet20
  start = nnx_models.linen_variables(model)
  eager = model(x, train=True)
  eager_stats = nnx_models.linen_variables(model)['batch_stats']
  nnx_models.load_linen_variables(model, start)
  jitted = nnx.jit(lambda m, x: m(x, train=True), graph=graph)(model, x)
  np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-4)
  assert_trees_close(nnx_models.linen_variables(model)['batch_stats'], eager_stats, rtol=1e-5, atol=1e-6)


def test_load_linen_variables_round_trip_and_refusals(resnet20):
  model, linen, x = resnet20
  variables = jax.tree.map(lambda a: a + 1.0, nnx_models.linen_variables(model))
  nnx_models.load_linen_variables(model, variables)
  assert_trees_close(nnx_models.linen_variables(model), variables, rtol=0, atol=0)
  other = jax.eval_shape(functools.partial(models.create_model(config_base.cifar(32).model).init, train=False),
                         jax.random.key(0), x[:1])
  with pytest.raises(ValueError, match='another network'):
    nnx_models.load_linen_variables(model, other)
  wrong = jax.tree.map(lambda a: a, variables)
  wrong['params']['head']['kernel'] = jnp.zeros((64, 100))
  with pytest.raises(ValueError, match=r"params\['head'\]\['kernel'\]: expected float32\[64, 10\]"):
    nnx_models.load_linen_variables(model, wrong)
  assert_trees_close(nnx_models.linen_variables(model), variables, rtol=0, atol=0)  # a refusal changes nothing
  with pytest.raises(ValueError, match='one example'):
    nnx_models.create_nnx_model(config_base.cifar(20).model, rngs=nnx.Rngs(0), input_shape=(1, 16, 16, 3))


def test_loads_the_weights_of_a_checkpointed_run(tmp_path):
  """The checkpoint of a run (the compatibility fixture: a digits ResNet-8 after 3 steps) into the NNX model, as
  docs/nnx.md says: it evaluates as the Linen network on the same arrays."""
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(REPO, 'tests', 'data', 'digits_run_v1', 'workdir'), workdir)
  with open(workdir / 'config.json') as f:
    recorded = json.load(f)
  model_config = config_base.base().model
  model_config.update(recorded['model'])
  ckpt = checkpoint.Checkpointer(str(workdir))
  try:
    state = ckpt.load_arrays()
  finally:
    ckpt.close()
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  size = recorded['data']['image_size']
  model = abstract_model(model_config, (size, size, 3), 0)
  nnx_models.load_linen_variables(model, variables)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  expected = models.create_model(model_config).apply(variables, x, train=False)
  np.testing.assert_allclose(model(x, train=False), expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(expected).max()) > 0


def test_imagenet_resnet18_builds_and_runs_at_a_small_size():
  model_config = config_base.imagenet(18).model
  model = abstract_model(model_config, (32, 32, 3), 2)
  shapes = nnx_models.linen_variables(model)
  # The variables of the Linen network, name for name, and the paper's parameter count (option A).
  linen = models.create_model(model_config, bn_group_size=2)
  expected = jax.eval_shape(functools.partial(linen.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(lambda s: (s.shape, s.dtype),
                                                                            dict(expected))
  assert sum(s.size for s in jax.tree.leaves(shapes['params'])) == summary.count(model_config, 224)[0]

  nnx_models.load_linen_variables(model, random_variables(shapes))
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  before = nnx_models.linen_variables(model)
  call = nnx.jit(lambda m, x, train: m(x, train=train), static_argnums=2)
  for train in (True, False):
    logits = call(model, x, train)
    assert logits.shape == (4, 1000) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
  assert max_change(nnx_models.linen_variables(model)['batch_stats'], before['batch_stats']) > 0


def doc_code_blocks(path):
  with open(path) as f:
    return re.findall(r'^```python\n(.*?)^```', f.read(), re.S | re.M)


@pytest.mark.slow  # draws a ResNet-18's initial weights and compiles its training step: many seconds
def test_docs_nnx_example_trains_and_evaluates():
  """Runs the code blocks of docs/nnx.md in order, in one namespace, as a reader would paste them, then checks what
  they did and takes a second step with the page's `train_step`."""
  blocks = doc_code_blocks(os.path.join(REPO, 'docs', 'nnx.md'))
  assert len(blocks) == 2
  namespace = {}
  exec(compile(blocks[0], 'docs/nnx.md', 'exec'), namespace)
  model, optimizer, images, labels = (namespace[k] for k in ('model', 'optimizer', 'images', 'labels'))
  assert np.isfinite(float(namespace['loss'])) and int(optimizer.step[...]) == 1

  before = nnx_models.linen_variables(model)
  loss = namespace['train_step'](model, optimizer, images, labels)
  after = nnx_models.linen_variables(model)
  assert np.isfinite(float(loss)) and int(optimizer.step[...]) == 2
  changed = [float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(after['params']),
                                                              jax.tree.leaves(before['params']))]
  assert all(changed), f'{changed.count(False)} parameter arrays did not move'
  assert max_change(after['batch_stats'], before['batch_stats']) > 1e-3

  exec(compile(blocks[1], 'docs/nnx.md', 'exec'), namespace)
  outer, eval_logits = namespace['outer'], namespace['eval_logits']
  assert outer.resnet is model and model.use_running_average is False  # back in training mode
  assert eval_logits.shape == (8, 10) and bool(jnp.isfinite(eval_logits).all())
  assert max_change(nnx_models.linen_variables(model), after) == 0.0  # evaluation moved nothing
  # The evaluation mode reached the ResNet: the logits are those of the moving averages.
  evaluate = jax.jit(lambda v, x: model.net.to_nnx__module.apply(v, x, train=False))
  expected = (evaluate(after, images) + evaluate(after, images[:, :, ::-1])) / 2
  np.testing.assert_allclose(eval_logits, expected, rtol=1e-4, atol=1e-4)
