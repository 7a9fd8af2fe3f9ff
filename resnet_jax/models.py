"""The networks of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in Flax Linen.

One `ResNet` class serves every network of the paper: CIFAR (depth 6n+2) and ImageNet (18-152) families,
residual and plain, shortcut options A/B/C, and both bottleneck stride placements. Layers are passed to the blocks
as partials, so a block never hard-codes a norm, a dtype or an initialiser.

Parameter names are stable and explicit, because checkpoints and the torchvision converter match on them:
  stem_conv, stem_bn                            first layer
  stage{S}_block{B}/conv{i}, bn{i}              i = 1, 2 (basic) or 1, 2, 3 (bottleneck)
  stage{S}_block{B}/proj_conv, proj_bn          projection shortcut (options B and C)
  head                                          the final fully connected layer
Stages are numbered from 1 (CIFAR: 3 stages on 32/16/8 maps; ImageNet: 4 stages, the paper's conv2_x..conv5_x).

The output of every 3x3 conv after its BN (before the addition and the ReLU), the CIFAR stem's included, is sown
into the `intermediates` collection as `bn_3x3` (the paper's Fig. 7 analysis); nothing is stored unless that
collection is mutable.
"""
import functools
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from resnet_jax.batchnorm import BatchNorm
from resnet_jax.xla_workarounds import relu, scanned_blocks

ModuleDef = Any

# The valid values of each model option are in config_base.OPTIONS; these map a name to what it builds.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Blocks per stage (Table 1) and whether the blocks are bottlenecks.
IMAGENET_STAGES = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
}
CIFAR_FILTERS = (16, 32, 64)            # Sec. 4.2
IMAGENET_FILTERS = (64, 128, 256, 512)  # Table 1; bottleneck outputs are 4x these

# He et al. 2015 ("MSRA") initialisation, as the paper (Sec. 3.4): zero-mean Gaussian, std sqrt(2 / fan_in).
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# The fc layer's weight initialisers (config.model.head_init): the paper's He init, or Flax's Dense default.
HEAD_INITS = {'he': he_normal, 'flax': nn.linear.default_kernel_init}


def _conv(conv: ModuleDef, filters: int, kernel: int, strides: int = 1, name: str | None = None):
  """A conv with symmetric padding kernel // 2 (as Caffe and torchvision), so strided outputs align."""
  pad = kernel // 2
  return conv(filters, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)), name=name)


class Shortcut(nn.Module):
  """The shortcut of one block (Sec. 3.3). `option` is 'A', 'B' or 'C'.

  A: identity; where the shape changes, subsample with stride and zero-pad the extra channels (no parameters).
  B: 1x1 projection + BN where the shape changes, identity elsewhere.
  C: 1x1 projection + BN on every shortcut.
  """
  out_channels: int
  strides: int
  option: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    changes = self.strides != 1 or x.shape[-1] != self.out_channels
    if self.option == 'C' or (self.option == 'B' and changes):
      y = _conv(self.conv, self.out_channels, 1, self.strides, name='proj_conv')(x)
      return self.norm(name='proj_bn')(y)
    if not changes:
      return x
    # Option A (and option B never reaches here with a shape change).
    y = x[:, ::self.strides, ::self.strides, :]
    extra = self.out_channels - x.shape[-1]
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, extra)))


class _Block(nn.Module):
  """What every block takes: `filters`, the stride of its first subsampling conv, the shortcut option (None: the
  plain block), and the conv / norm partials (`last_norm` for its last BN)."""
  filters: int
  strides: int
  shortcut: str | None
  conv: ModuleDef
  norm: ModuleDef
  last_norm: ModuleDef

  def _output(self, x, y):
    """relu(F(x) + shortcut(x)); relu(F(x)) for the plain block. Called inside the block's compact __call__."""
    if self.shortcut is not None:
      y = y + Shortcut(y.shape[-1], self.strides, self.shortcut, self.conv, self.norm, name='shortcut')(x)
    return relu(y)


class BasicBlock(_Block):
  """Two 3x3 convs (Fig. 2 / Fig. 5 left)."""
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = _conv(self.conv, self.filters, 3, self.strides, name='conv1')(x)
    y = self.norm(name='bn1')(y)
    self.sow('intermediates', 'bn_3x3', y)
    y = relu(y)
    y = _conv(self.conv, self.filters, 3, 1, name='conv2')(y)
    y = self.last_norm(name='bn2')(y)
    self.sow('intermediates', 'bn_3x3', y)
    return self._output(x, y)


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3, 1x1 restore (x4) (Fig. 5 right).

  The paper (and its released Caffe models) puts the stride on the first 1x1 conv ('v1'); torchvision puts it on
  the 3x3 conv ('v1.5', `stride_on_3x3=True`).
  """
  stride_on_3x3: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x):
    s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
    y = _conv(self.conv, self.filters, 1, s1, name='conv1')(x)
    y = relu(self.norm(name='bn1')(y))
    y = _conv(self.conv, self.filters, 3, s3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    self.sow('intermediates', 'bn_3x3', y)
    y = relu(y)
    y = _conv(self.conv, self.filters * 4, 1, 1, name='conv3')(y)
    y = self.last_norm(name='bn3')(y)
    return self._output(x, y)


class ResNet(nn.Module):
  """A residual or plain network. `stem='cifar'`: one 3x3 conv; `stem='imagenet'`: 7x7/2 conv and 3x3/2 max pool.

  Attributes:
    stage_sizes: blocks per stage.
    stage_filters: base filters per stage.
    block_cls: BasicBlock or BottleneckBlock.
    num_classes: outputs of the final fc layer.
    stem: 'cifar' or 'imagenet'.
    residual: False gives the plain network (the same stack with no shortcut at all).
    shortcut: 'A', 'B' or 'C'.
    stride_on_3x3: bottleneck stride placement ('v1.5' when True).
    bn_group_size: examples per BatchNorm group in training (0 = the whole batch).
    bn_momentum, bn_epsilon: BatchNorm moving-average decay and epsilon.
    zero_init_last_bn: initialise the last BN scale of each block to zero (not in the paper; off by default).
    head_init: the fc layer's weight initialiser, a key of HEAD_INITS ('he' as the paper, or 'flax').
    dtype: compute dtype; parameters and BN statistics stay float32.
    scan_blocks: run the identical blocks of a stage (all but its first) as one `nn.scan`, so the compiler sees
      one block per stage instead of n (compile time of the deep CIFAR nets). The arithmetic is the same (the
      scanned convolutions use `conv_with_explicit_gradients`, so XLA:CPU runs them fast in a loop), but
      their parameters are stacked under `stage{S}_blocks{2}to{n}/block/...` with a leading block axis, so
      checkpoints differ from the default layout; off by default.
  """
  stage_sizes: Sequence[int]
  stage_filters: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  stem: str = 'cifar'
  residual: bool = True
  shortcut: str = 'A'
  stride_on_3x3: bool = False
  bn_group_size: int = 0
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  head_init: str = 'he'
  dtype: Any = jnp.float32
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_normal, dtype=self.dtype,
                             param_dtype=jnp.float32)
    norm = functools.partial(BatchNorm, use_running_average=not train, group_size=self.bn_group_size,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype)
    last_norm = functools.partial(norm, scale_init=nn.initializers.zeros) if self.zero_init_last_bn else norm

    x = x.astype(self.dtype)
    if self.stem == 'cifar':
      x = _conv(conv, self.stage_filters[0], 3, 1, name='stem_conv')(x)
      x = norm(name='stem_bn')(x)
      self.sow('intermediates', 'bn_3x3', x)  # the first 3x3 layer is one of Fig. 7's layers too
      x = relu(x)
    else:
      x = _conv(conv, 64, 7, 2, name='stem_conv')(x)
      x = relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for s, (blocks, filters) in enumerate(zip(self.stage_sizes, self.stage_filters)):
      placement = {'stride_on_3x3': self.stride_on_3x3} if self.block_cls is BottleneckBlock else {}
      block = functools.partial(self.block_cls, filters=filters, shortcut=self.shortcut if self.residual else None,
                                conv=conv, norm=norm, last_norm=last_norm, **placement)
      unrolled = 1 if self.scan_blocks and blocks > 2 else blocks
      for b in range(unrolled):
        strides = 2 if (s > 0 and b == 0) else 1
        x = block(strides=strides, name=f'stage{s + 1}_block{b + 1}')(x)
      if unrolled < blocks:  # config.model.scan_blocks (compile time; xla_workarounds.py)
        x = scanned_blocks(block, conv, blocks - unrolled, f'stage{s + 1}_blocks{unrolled + 1}to{blocks}')(x)

    x = jnp.mean(x, axis=(1, 2))  # global average pooling
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=HEAD_INITS[self.head_init],
                 name='head')(x)
    return x.astype(jnp.float32)


def create_model(model_config, bn_group_size: int = 0, dtype: str | None = None) -> ResNet:
  """Builds the network that `model_config` (the `config.model` section, as validation.validate_model accepts it)
  names."""
  family, depth = model_config.family, model_config.depth
  if family == 'cifar':
    n = (depth - 2) // 6
    stage_sizes, filters, block, stem = [n] * 3, CIFAR_FILTERS, BasicBlock, 'cifar'
  else:
    stage_sizes, bottleneck = IMAGENET_STAGES[depth]
    filters, stem = IMAGENET_FILTERS, 'imagenet'
    block = BottleneckBlock if bottleneck else BasicBlock
  return ResNet(
      stage_sizes=stage_sizes, stage_filters=filters, block_cls=block, num_classes=model_config.num_classes,
      stem=stem, residual=model_config.residual, shortcut=model_config.shortcut,
      stride_on_3x3=model_config.bottleneck == 'v1.5', bn_group_size=bn_group_size,
      bn_momentum=model_config.bn_momentum, bn_epsilon=model_config.bn_epsilon,
      zero_init_last_bn=model_config.zero_init_last_bn, head_init=model_config.head_init,
      dtype=DTYPES[dtype or model_config.dtype], scan_blocks=model_config.scan_blocks)
