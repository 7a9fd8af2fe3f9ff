"""Model summary: parameters and multiply-adds per stage, as in Table 1 and Table 6.

  python -m resnet_jax.summary --config=configs/cifar_110.py [--json] [--config.model.shortcut=C]

Multiply-adds count convolutions and the fc layer for one image at the config's input size (what Table 1
reports); BatchNorm, ReLU, pooling and additions are not counted.
"""
import collections
import json
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from absl import flags

from resnet_jax import cli, models, validation


def _group(path: tuple[str, ...]) -> str:
  """'stage2_block3/conv1' -> 'stage2'; 'stem_conv' -> 'stem'; 'head' -> 'head'."""
  top = path[0] if path else ''
  return top.split('_')[0] if top else top


def analyse(model: nn.Module, image_size: int, channels: int = 3) -> dict:
  """Parameters, multiply-adds and output shape per stage, for one image. Runs shapes only (no FLOPs)."""
  macs = collections.Counter()
  shapes = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name != '__call__':
      return out
    path = tuple(mod.path) if hasattr(mod, 'path') else ()
    if isinstance(mod, nn.Conv):
      kh, kw = mod.kernel_size
      cin = args[0].shape[-1]
      macs[_group(path)] += math.prod(out.shape[1:]) * kh * kw * cin // mod.feature_group_count
    elif isinstance(mod, nn.Dense):
      macs[_group(path)] += math.prod(out.shape[1:]) * args[0].shape[-1]
    if len(path) == 1 and hasattr(out, 'shape'):
      shapes[_group(path)] = tuple(out.shape[1:])  # the last block of a stage wins
    return out

  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  params = collections.Counter()
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params']):
    params[_group((path[0].key,))] += math.prod(leaf.shape)
  groups = list(dict.fromkeys(list(shapes) + list(params)))
  rows = [dict(name=g, shape=shapes.get(g), params=params[g], macs=macs[g]) for g in groups]
  return dict(rows=rows, params=sum(params.values()), macs=sum(macs.values()))


def count(model_config, image_size: int) -> tuple[int, int]:
  """(parameters, multiply-adds per image) of the network that `model_config` names."""
  result = analyse(models.create_model(model_config), image_size)
  return result['params'], result['macs']


def format_table(result: dict, title: str) -> str:
  lines = [title, f'{"stage":<8} {"output shape":>16} {"params":>14} {"mult-adds":>16}']
  for r in result['rows']:
    shape = 'x'.join(map(str, r['shape'])) if r['shape'] else ''
    lines.append(f'{r["name"]:<8} {shape:>16} {r["params"]:>14,} {r["macs"]:>16,}')
  lines.append(f'{"total":<8} {"":>16} {result["params"]:>14,} {result["macs"]:>16,}')
  lines.append(f'= {result["params"] / 1e6:.2f}M parameters, {result["macs"] / 1e9:.3f}e9 multiply-adds per image')
  return '\n'.join(lines)


def define_flags():
  flags.DEFINE_bool('json', False, 'Print one JSON object {"params": int, "macs": int, ...}.')


def main(config, workdir) -> None:
  del workdir
  validation.validate_model(config.model)
  result = analyse(models.create_model(config.model), config.data.image_size)
  if flags.FLAGS.json:
    print(json.dumps(dict(params=int(result['params']), macs=int(result['macs']),
                          stages={r['name']: dict(params=int(r['params']), macs=int(r['macs']),
                                                  shape=r['shape']) for r in result['rows']})))
  else:
    m = config.model
    kind = 'ResNet' if m.residual else 'plain'
    title = (f'{m.family} {kind}-{m.depth}, shortcut {m.shortcut}'
             + (f', bottleneck {m.bottleneck}' if m.family == 'imagenet' and m.depth >= 50 else '')
             + f', input {config.data.image_size}x{config.data.image_size}')
    print(format_table(result, title))


if __name__ == '__main__':
  cli.run(main, define_flags, workdir_help='A run\'s directory: without --config, summarise the network it trained.')
