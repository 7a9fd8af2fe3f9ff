"""Architecture facts from the paper: parameter counts, multiply-adds, shapes, the identity of a zeroed block."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
import flax.linen as nn

from resnet_jax import config_base, errors, models, summary, validation, xla_workarounds
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cifar_model_config(depth, residual=True, shortcut='A'):
  c = config_base.cifar(depth, residual)
  c.model.shortcut = shortcut
  return c.model


def imagenet_model_config(depth, shortcut=None, bottleneck='v1', residual=True):
  c = config_base.imagenet(depth, residual)
  if shortcut:
    c.model.shortcut = shortcut
  c.model.bottleneck = bottleneck
  return c.model


# Table 6.
@pytest.mark.parametrize('depth,paper_params', [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6),
                                                (110, 1.7e6), (1202, 19.4e6)])
def test_cifar_parameter_counts_match_table_6(depth, paper_params):
  params, _ = summary.count(cifar_model_config(depth), 32)
  assert abs(params - paper_params) / paper_params < 0.03, params


@pytest.mark.parametrize('depth', [20, 56, 110])
def test_cifar_plain_and_residual_have_the_same_parameters_under_option_a(depth):
  assert summary.count(cifar_model_config(depth), 32) == summary.count(cifar_model_config(depth, False), 32)


# The paper's reference counts with option B (identical to torchvision's architecture).
@pytest.mark.parametrize('depth,reference', [(18, 11.69e6), (34, 21.80e6), (50, 25.56e6), (101, 44.55e6),
                                             (152, 60.19e6)])
def test_imagenet_parameter_counts_with_option_b(depth, reference):
  params, _ = summary.count(imagenet_model_config(depth, 'B'), 224)
  assert abs(params - reference) / reference < 0.005, params


@pytest.mark.parametrize('depth', [18, 50])
def test_shortcut_options_order_parameters_a_lt_b_lt_c(depth):
  a, b, c = (summary.count(imagenet_model_config(depth, s), 224)[0] for s in 'ABC')
  assert a < b < c


# Table 1 multiply-adds at 224x224.
@pytest.mark.parametrize('depth,paper_macs', [(18, 1.8e9), (34, 3.6e9), (50, 3.8e9), (101, 7.6e9),
                                              (152, 11.3e9)])
def test_imagenet_multiply_adds_match_table_1(depth, paper_macs):
  _, macs = summary.count(imagenet_model_config(depth), 224)
  assert abs(macs - paper_macs) / paper_macs < 0.05, macs


def test_v1_5_bottleneck_moves_the_stride_and_costs_4_1e9():
  _, v1 = summary.count(imagenet_model_config(50, bottleneck='v1'), 224)
  p15, v15 = summary.count(imagenet_model_config(50, bottleneck='v1.5'), 224)
  assert abs(v15 - 4.1e9) / 4.1e9 < 0.05 and v15 > v1
  assert p15 == summary.count(imagenet_model_config(50, bottleneck='v1'), 224)[0]  # same weights, other stride


def _init(model, x):
  return model.init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize('depth', [8, 14, 20])
def test_cifar_shapes_and_downsampling_points(depth):
  model = models.create_model(cifar_model_config(depth))
  x = jnp.ones((2, 32, 32, 3))
  variables = _init(model, x)
  logits, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  n = (depth - 2) // 6
  # Every 3x3 conv sows its BN output: the first layer's at the top, 2 per block in each of the 3n blocks.
  inter = dict(state['intermediates'])
  assert len(inter.pop('bn_3x3')) == 1
  assert len(inter) == 3 * n
  spatial = {f'stage{s}': 32 // 2 ** (s - 1) for s in (1, 2, 3)}
  channels = {'stage1': 16, 'stage2': 32, 'stage3': 64}
  for name, sown in inter.items():
    stage = name.split('_')[0]
    assert len(sown['bn_3x3']) == 2
    for y in sown['bn_3x3']:
      assert y.shape == (2, spatial[stage], spatial[stage], channels[stage]), (name, y.shape)
  # Only the first block of stages 2 and 3 has stride 2.
  k = variables['params']
  assert k['stage2_block1']['conv1']['kernel'].shape == (3, 3, 16, 32)


@pytest.mark.parametrize('depth,block_out', [(18, 512), (50, 2048)])
def test_imagenet_shapes(depth, block_out):
  model = models.create_model(imagenet_model_config(depth))
  shapes = summary.analyse(model, 224)['rows']
  by_name = {r['name']: r['shape'] for r in shapes}
  assert by_name['stem'] == (112, 112, 64)
  expansion = block_out // 512
  assert by_name['stage1'] == (56, 56, 64 * expansion)
  assert by_name['stage2'] == (28, 28, 128 * expansion)
  assert by_name['stage3'] == (14, 14, 256 * expansion)
  assert by_name['stage4'] == (7, 7, block_out)
  assert by_name['head'] == (1000,)


def test_bottleneck_stride_placement():
  for placement, conv1_stride, conv2_stride in (('v1', 2, 1), ('v1.5', 1, 2)):
    model = models.create_model(imagenet_model_config(50, bottleneck=placement))
    strides = {}

    def interceptor(next_fun, args, kwargs, context):
      m = context.module
      if isinstance(m, nn.Conv) and m.path[:1] == ('stage2_block1',) and m.path[-1] in ('conv1', 'conv2'):
        strides[m.path[-1]] = m.strides
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda: _init(model, jnp.ones((1, 64, 64, 3))))
    assert strides == {'conv1': (conv1_stride,) * 2, 'conv2': (conv2_stride,) * 2}, placement


def test_option_a_has_no_shortcut_parameters_and_b_projects_only_where_shapes_change():
  a = _init(models.create_model(cifar_model_config(14, shortcut='A')), jnp.ones((1, 32, 32, 3)))['params']
  assert not any('shortcut' in blk for blk in a.values() if isinstance(blk, dict))
  b = _init(models.create_model(cifar_model_config(14, shortcut='B')), jnp.ones((1, 32, 32, 3)))['params']
  with_proj = sorted(k for k, blk in b.items() if 'shortcut' in blk)
  assert with_proj == ['stage2_block1', 'stage3_block1']
  c = _init(models.create_model(cifar_model_config(14, shortcut='C')), jnp.ones((1, 32, 32, 3)))['params']
  assert sorted(k for k, blk in c.items() if 'shortcut' in blk) == sorted(k for k in c if k.startswith('stage'))


def _block(block_cls, residual, filters=8):
  from functools import partial
  conv = partial(nn.Conv, use_bias=False, kernel_init=models.he_normal)
  norm = partial(models.BatchNorm, use_running_average=True)
  return block_cls(filters=filters, strides=1, shortcut='A' if residual else None, conv=conv, norm=norm,
                   last_norm=norm)


@pytest.mark.parametrize('block_cls,channels', [(models.BasicBlock, 8), (models.BottleneckBlock, 32)])
def test_zeroed_residual_branch_is_identity_on_nonnegative_input(block_cls, channels):
  """Sec. 3.1: if the residual F is driven to zero, the block is the identity (ReLU(0 + x) = x for x >= 0)."""
  block = _block(block_cls, residual=True)
  x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 8, channels)))
  variables = block.init(jax.random.key(0), x)
  last = 'bn2' if block_cls is models.BasicBlock else 'bn3'
  params = jax.tree_util.tree_map(lambda p: p, variables['params'])
  params[last] = {'scale': jnp.zeros_like(params[last]['scale']), 'bias': jnp.zeros_like(params[last]['bias'])}
  y = block.apply({**variables, 'params': params}, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # With the default (non-zero) parameters the same block is not the identity: the test can fail.
  assert not np.allclose(block.apply(variables, x), x)


def test_zeroed_plain_block_is_not_identity():
  block = _block(models.BasicBlock, residual=False)
  x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 8, 8)))
  variables = block.init(jax.random.key(0), x)
  params = dict(variables['params'])
  params['bn2'] = {'scale': jnp.zeros(8), 'bias': jnp.zeros(8)}
  y = block.apply({**variables, 'params': params}, x)
  np.testing.assert_array_equal(np.asarray(y), 0.0)  # the plain block maps everything to zero
  assert not np.allclose(y, x)


def test_relu_matches_nn_relu_in_value_and_gradient():
  x = jnp.array([-2.0, -0.5, 0.0, 0.25, 3.0, jnp.nan])
  np.testing.assert_array_equal(xla_workarounds.relu(x), nn.relu(x))  # NaN stays NaN (a diverged run is still seen)
  for dtype in (jnp.float32, jnp.bfloat16):
    v = x[:-1].astype(dtype)
    np.testing.assert_array_equal(jax.grad(lambda t: (xla_workarounds.relu(t) * jnp.arange(5.0)).sum())(v),
                                  jax.grad(lambda t: (nn.relu(t) * jnp.arange(5.0)).sum())(v))


@pytest.mark.parametrize('kernel,padding,strides', [
    (3, ((1, 1), (1, 1)), (1, 1)),  # the CIFAR 3x3 convs
    (1, ((0, 0), (0, 0)), (1, 1)),  # bottleneck 1x1 convs
    (3, ((0, 2), (1, 0)), (1, 1)),  # uneven padding
    (3, ((1, 1), (1, 1)), (2, 2)),  # strided: falls through to lax.conv_general_dilated
])
def test_conv_with_explicit_gradients_matches_lax(kernel, padding, strides):
  dn = lax.conv_dimension_numbers((2, 7, 6, 5), (kernel, kernel, 5, 4), ('NHWC', 'HWIO', 'NHWC'))
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 5, 4))
  dy_seed = jax.random.key(2)

  def loss(conv, x, w):
    y = conv(x, w, strides, padding, dimension_numbers=dn)
    return (y * jax.random.normal(dy_seed, y.shape)).sum()

  ours = jax.value_and_grad(functools.partial(loss, xla_workarounds.conv_with_explicit_gradients), (0, 1))(x, w)
  ref = jax.value_and_grad(functools.partial(loss, lax.conv_general_dilated), (0, 1))(x, w)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _largest_fusion_in_backward(depth: int) -> int:
  """Most operands read by any one fused kernel of the compiled CIFAR training gradient (tiny batch, CPU)."""
  model = models.create_model(cifar_model_config(depth))
  x = jnp.ones((4, 16, 16, 3))
  variables = _init(model, x[:2])

  def loss(params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
                         mutable=['batch_stats'])
    return out.sum()

  hlo = jax.jit(jax.grad(loss)).lower(variables['params']).compile().as_text()
  return max(line.split(' fusion(', 1)[1].split('), kind=', 1)[0].count('%')
             for line in hlo.splitlines() if ' fusion(' in line)


def test_backward_work_per_block_does_not_grow_with_depth():
  """With `max(x, 0)` as the ReLU, XLA rebuilt every residual-stream activation inside the backward pass from the
  convolution outputs of all earlier blocks of the stage (a fusion reading ~4 operands per earlier block: 24 for
  ResNet-20, 40 for ResNet-44 here), so the CPU step grew with the square of the depth (docs/performance.md). Our
  `xla_workarounds.relu` makes XLA store each block output once: the largest fused kernel is the same size at any depth."""
  shallow, deep = _largest_fusion_in_backward(20), _largest_fusion_in_backward(44)
  assert deep <= shallow + 2, (shallow, deep)


def _block_outputs(zero_init_last_bn: bool):
  c = cifar_model_config(14)
  c.zero_init_last_bn = zero_init_last_bn
  model = models.create_model(c)
  x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=lambda mdl, _: (mdl.name or '').startswith('stage'))
  return {k: np.asarray(v['__call__'][0]) for k, v in state['intermediates'].items() if k.startswith('stage')}


def test_zero_init_last_bn_option_makes_every_identity_block_the_identity_at_init():
  """With the last BN scale of each block at zero, every block whose shortcut is the identity passes its
  (non-negative, post-ReLU) input through unchanged; without the option none does."""
  for zero, expect in ((True, True), (False, False)):
    out = _block_outputs(zero)
    for s in (1, 2, 3):
      for b in (2,):  # depth 14: two blocks per stage; the second has an identity shortcut
        same = np.array_equal(out[f'stage{s}_block{b}'], out[f'stage{s}_block{b - 1}'])
        assert same == expect, (zero, s, b)


def test_compute_dtype_keeps_float32_parameters():
  c = cifar_model_config(8)
  c.dtype = 'bfloat16'
  model = models.create_model(c)
  x = jnp.ones((2, 32, 32, 3))
  variables = _init(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  assert state['intermediates']['stage1_block1']['bn_3x3'][0].dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(state['batch_stats']))


def test_no_bias_in_convs_and_he_initialisation():
  variables = _init(models.create_model(cifar_model_config(56)), jnp.ones((1, 32, 32, 3)))
  kernels = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params']):
    names = [p.key for p in path]
    if 'conv' in names[-2]:
      assert names[-1] == 'kernel', names  # convs followed by BN carry no bias
      kernels.append(leaf)
  assert len(kernels) == 55  # the first layer and 2 x 27 in the blocks (option A: no projection convs)
  for k in kernels:  # He et al. 2015: zero mean, std sqrt(2 / fan_in), fan_in = kh * kw * in_channels
    fan_in = k.shape[0] * k.shape[1] * k.shape[2]
    tol = 4 * np.sqrt(2 / fan_in) / np.sqrt(2 * k.size)  # ~4 standard errors of a sample std
    assert abs(float(jnp.std(k)) - np.sqrt(2 / fan_in)) < tol + 0.02 * np.sqrt(2 / fan_in), k.shape


def _head_kernel(head_init, num_classes=1000):
  c = cifar_model_config(8)
  c.num_classes = num_classes  # 64 x 1000 weights: a std estimated to about 0.3%
  if head_init is not None:
    c.head_init = head_init
  return _init(models.create_model(c), jnp.ones((1, 8, 8, 3)))['params']['head']['kernel']


def test_fc_layer_is_he_initialised_by_default_and_flax_is_the_named_alternative():
  """Sec. 3.4 initialises the weights as in [13]: std sqrt(2 / fan_in) for the fc layer too (fan_in 64 here)."""
  he, flax_default = _head_kernel(None), _head_kernel('flax')
  assert he.shape == (64, 1000)
  assert abs(float(jnp.mean(he))) < 0.005
  assert abs(float(jnp.std(he)) / np.sqrt(2 / 64) - 1) < 0.02
  assert abs(float(jnp.std(flax_default)) / np.sqrt(1 / 64) - 1) < 0.02  # LeCun normal
  assert config_base.base().model.head_init == 'he'


@pytest.mark.parametrize('field,value,expected', [
    ('depth', 21, '6n+2'), ('shortcut', 'D', 'A, B, C'), ('family', 'vit', 'cifar, imagenet'),
    ('bottleneck', 'v2', 'v1, v1.5'), ('dtype', 'float64', 'float32'), ('head_init', 'xavier', 'he, flax')])
def test_bad_model_config_lists_valid_choices(field, value, expected):
  c = cifar_model_config(20)
  c[field] = value
  with pytest.raises(errors.USER_ERRORS, match=expected.replace('+', r'\+')):
    validation.validate_model(c)


def test_unknown_imagenet_depth_lists_valid_depths():
  c = imagenet_model_config(18)
  c.depth = 42
  with pytest.raises(errors.USER_ERRORS, match='18, 34, 50, 101, 152'):
    validation.validate_model(c)


def _summary(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'resnet_jax.summary', *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_summary_command_json_and_overrides():
  out = _summary('--config=configs/cifar_110.py', '--json')
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert isinstance(result['params'], int) and isinstance(result['macs'], int)
  assert abs(result['params'] - 1.7e6) / 1.7e6 < 0.03
  assert abs(result['macs'] - 252.9e6) / 252.9e6 < 0.01  # the anchor's count for ResNet-110
  with_c = json.loads(_summary('--config=configs/cifar_110.py', '--json', '--config.model.shortcut=C').stdout)
  assert with_c['params'] > result['params']
  table = _summary('--config=configs/cifar_20.py')
  assert table.returncode == 0 and 'stage3' in table.stdout and '269,722' in table.stdout
  bad = _summary('--config=configs/cifar_20.py', '--config.model.depth=21')
  assert bad.returncode != 0 and '6n+2' in bad.stderr
