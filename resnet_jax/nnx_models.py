"""The paper's networks as Flax NNX modules, for research code written in NNX (docs/nnx.md).

The networks themselves stay Linen (models.py), and so does the training core (docs/design.md, "Flax NNX"). This
module wraps one with `flax.nnx.bridge.ToNNX`, so that an NNX model can hold it as a submodule: its parameters
become `nnx.Param`s and its BN moving averages (Linen's `batch_stats` collection) `nnx.BatchStat`s, with the same
names as in models.py (`stem_conv/kernel`, `stage1_block1/bn1/mean`, ...).

Training and evaluation mode work as in `nnx.BatchNorm`:
  model(x, train=True)   BN normalises each group of `bn_group_size` examples with the group's own statistics and
                         updates its moving averages in place (Linen's `apply(..., mutable=['batch_stats'])`);
  model(x, train=False)  BN uses the moving averages; nothing in the model changes;
  model(x)               the mode that `model.train()` / `model.eval()` (or `nnx.view(model,
                         use_running_average=...)`) set: `use_running_average`, False (training) for a new model.
`ToNNX` holds the variables (and initialises them), but `NNXResNet` applies the Linen network itself and writes
the new moving averages into the existing `nnx.BatchStat`s. A bare `ToNNX` call applies the network with nothing
mutable unless told otherwise (our BatchNorm then refuses to train), and told `mutable=['batch_stats']` it replaces
the `BatchStat` objects by new ones at every call. That changes the module graph, which `nnx.cached_partial`
refuses and which `nnx.jit(..., graph=False)` (tree mode) does not carry out of the function: the update is lost.
In place, the graph stays as it was built, and every way NNX offers to jit a step gives the Linen step's numbers
(tests/test_nnx.py, benchmarks/nnx_step.py).
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import models

# The Linen collections of models.ResNet and the NNX variable types that `ToNNX` maps them to.
COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


class NNXResNet(nnx.Module):
  """An initialised models.ResNet as an NNX module, called as `model(x, train=...)`.

  Attributes:
    net: the `nnx.bridge.ToNNX` wrapper that holds the variables, one attribute per top-level layer of the Linen
      network (`net.stem_conv['kernel']`, `net.stage1_block1['bn1']['mean']`, ...).
    use_running_average: the mode of a call without `train`: True evaluates, False trains.
  """

  def __init__(self, linen_model: models.ResNet, *, rngs: nnx.Rngs, input_shape: Sequence[int]):
    """Initialises `linen_model` from `rngs` (its `params` stream, else its default one) on a zero example of
    `input_shape`, one example's (height, width, channels): as the training core, in evaluation mode, so any image
    size and `bn_group_size` initialise."""
    if len(input_shape) != 3:
      raise ValueError(f'input_shape is one example\'s (height, width, channels), got {tuple(input_shape)}')
    self.net = nnx.bridge.ToNNX(linen_model, rngs=rngs)
    nnx.bridge.lazy_init(self.net, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    # The network draws no random numbers after its initialisation (no dropout), so it keeps no random stream: no
    # RngState in the module's state to carry through jit, vmap or a checkpoint.
    self.net.to_nnx__rngs = None
    self.use_running_average = False

  def __call__(self, x, train: bool | None = None):
    """Logits (float32) of the images `x` (N, H, W, C). `train` (default: `not self.use_running_average`):
    normalise with the batch's statistics and update the moving averages (True), or use them (False)."""
    train = not self.use_running_average if train is None else train
    linen_model = self.net.to_nnx__module
    if not train:
      return linen_model.apply(linen_variables(self), x, train=False)
    logits, updates = linen_model.apply(linen_variables(self), x, train=True, mutable=['batch_stats'])
    _assign(self, 'batch_stats', updates['batch_stats'])
    return logits

  def set_view(self, use_running_average: bool | None = None):
    """What `nnx.view(model, use_running_average=...)` sets, as in `nnx.BatchNorm`."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def create_nnx_model(model_config, *, rngs: nnx.Rngs, input_shape: Sequence[int], bn_group_size: int = 0,
                     dtype: str | None = None) -> NNXResNet:
  """The network that `model_config` (a config's `model` section, e.g. `config_base.cifar(20).model`) names, as an
  initialised NNX module.

  Args:
    model_config: family, depth, shortcut, ... as `models.create_model` reads them.
    rngs: where the initial weights come from (`nnx.Rngs(seed)`).
    input_shape: one example's (height, width, channels), e.g. (32, 32, 3). The weights do not depend on the image
      size (the network ends in global average pooling), only on the channels.
    bn_group_size: examples per BN group in training (0: the whole batch; the paper's recipes use a config's
      `bn_group_size`, 64 for CIFAR and 32 for ImageNet); it must divide every training batch.
    dtype: compute dtype ('float32', 'bfloat16', 'float16'; default: model_config.dtype).
  """
  linen_model = models.create_model(model_config, bn_group_size=bn_group_size, dtype=dtype)
  return NNXResNet(linen_model, rngs=rngs, input_shape=input_shape)


def linen_variables(model: NNXResNet) -> dict:
  """The model's variables as the Linen network takes them: {'params': ..., 'batch_stats': ...} of jax arrays,
  for `models.ResNet.apply`, the evaluation code or a comparison with a Linen run."""
  return {name: nnx.to_pure_dict(nnx.state(model.net, kind)) for name, kind in COLLECTIONS.items()}


def load_linen_variables(model: NNXResNet, variables) -> None:
  """Sets the model's variables from Linen ones ({'params': ..., 'batch_stats': ...}, e.g. those of a checkpoint
  of one seed). Refuses variables of another network (a different tree, shape or dtype, naming the first) before
  it changes anything."""
  for name, kind in COLLECTIONS.items():
    ours, theirs = nnx.to_pure_dict(nnx.state(model.net, kind)), variables[name]
    if jax.tree.structure(ours) != jax.tree.structure(theirs):
      raise ValueError(f'{name}: the variables are of another network (the names of their layers differ)')
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f'{name}{jax.tree_util.keystr(path)}: expected {a.dtype}{list(a.shape)}, '
                         f'got {b.dtype}{list(b.shape)}')
  for name in COLLECTIONS:
    _assign(model, name, variables[name])


def _assign(model: NNXResNet, collection: str, values) -> None:
  """Sets the values of the model's variables of a Linen `collection` in place (the same Variable objects)."""
  state = nnx.state(model.net, COLLECTIONS[collection])
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model.net, state)
