"""torchvision ResNet weights -> our `params` and `batch_stats` (ResNet-18/34/50/101/152).

torchvision's ResNets are the paper's networks with two differences our config names: projection shortcuts only
where the shape changes (`config.model.shortcut='B'`, also for 18/34, which the paper ran with option A), and the
bottleneck stride on the 3x3 conv (`config.model.bottleneck='v1.5'`, for 50/101/152). The converter refuses any
other setting, naming the field to change.

Names are mapped explicitly (ours <- torchvision):
  stem_conv/kernel                         <- conv1.weight
  stem_bn/{scale,bias}, {mean,var}         <- bn1.{weight,bias}, bn1.{running_mean,running_var}
  stage{S}_block{B}/conv{i}, bn{i}         <- layer{S}.{B-1}.conv{i}, bn{i}
  stage{S}_block{B}/shortcut/proj_conv     <- layer{S}.{B-1}.downsample.0
  stage{S}_block{B}/shortcut/proj_bn       <- layer{S}.{B-1}.downsample.1
  head/{kernel,bias}                       <- fc.{weight,bias}
Conv kernels go from (out, in, h, w) to (h, w, in, out); the fc weight is transposed. `*.num_batches_tracked` is
read and dropped. A key we need that the file lacks, a key of the file we do not use, or a shape that differs is an
error naming the key.

Files: `.pth`/`.pt` (needs torch), `.npz` or `.safetensors` (no torch needed; safetensors needs the `safetensors`
package). Convert the real pretrained weights into a workdir the evaluator reads:

  python -m resnet_jax.torchvision_weights --weights=resnet50-11ad3fa6.pth --config=configs/imagenet_50.py \
      --config.model.bottleneck=v1.5 --workdir=runs/torchvision_50

torchvision's models expect (x / 255 - mean) / std; the converter stores that normalisation so our pipeline
(which subtracts a mean from 0..255 pixels) gives the same inputs: the channel mean goes to WORKDIR/pixel_mean.npy
and 1 / (255 std) is folded into the stem conv's kernel, which is exact (zero padding is zero in both forms).
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from resnet_jax import cli, models, run_record, validation
from resnet_jax.errors import ConfigError, MissingFileError

TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision's ImageNet input normalisation
TORCHVISION_STD = np.array([0.229, 0.224, 0.225], np.float32)
_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


class WeightsError(ValueError):
  """The file does not fit the model; the message names the key."""


def check_model_config(model_config) -> None:
  validation.validate_model(model_config)
  if model_config.family != 'imagenet' or not model_config.residual:
    raise WeightsError('torchvision weights exist for the residual ImageNet networks only '
                       f'(config.model.family={model_config.family!r}, residual={model_config.residual}).')
  if model_config.shortcut != 'B':
    raise WeightsError(f'torchvision ResNets use projection shortcuts where the shape changes: set '
                       f'--config.model.shortcut=B (it is {model_config.shortcut!r}).')
  bottleneck = models.IMAGENET_STAGES[model_config.depth][1]
  if bottleneck and model_config.bottleneck != 'v1.5':
    raise WeightsError('torchvision bottlenecks put the stride on the 3x3 conv: set '
                       f'--config.model.bottleneck=v1.5 (it is {model_config.bottleneck!r}).')


def _torch_module(path: tuple) -> str:
  """Our module path (('stage2_block1', 'shortcut', 'proj_bn')) -> torchvision's ('layer2.0.downsample.1')."""
  out = []
  for name in path:
    m = re.fullmatch(r'stage(\d+)_block(\d+)', name)
    if m:
      out.append(f'layer{m[1]}.{int(m[2]) - 1}')
    elif name == 'stem_conv':
      out.append('conv1')
    elif name == 'stem_bn':
      out.append('bn1')
    elif name == 'head':
      out.append('fc')
    elif name == 'shortcut':
      out.append('downsample')
    elif name == 'proj_conv':
      out[-1] += '.0'
    elif name == 'proj_bn':
      out[-1] += '.1'
    else:
      out.append(name)
  return '.'.join(out)


def name_map(variables) -> dict:
  """{torchvision key: (collection, our path tuple)} for every array of `variables` (shapes or arrays)."""
  mapping = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = tuple(p.key for p in path)
    collection, module, leaf = keys[0], keys[1:-1], keys[-1]
    is_bn = collection == 'batch_stats' or module[-1].startswith(('bn', 'stem_bn', 'proj_bn'))
    torch_leaf = _BN[leaf] if is_bn else {'kernel': 'weight', 'bias': 'bias'}[leaf]
    mapping[f'{_torch_module(module)}.{torch_leaf}'] = (collection, keys[1:])
  return mapping


def _to_ours(key: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:   # conv (out, in, h, w) -> (h, w, in, out)
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:   # fc (out, in) -> (in, out)
    return value.T
  return value


def _set(tree: dict, path: tuple, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def convert(state_dict, model_config):
  """torchvision state dict (name -> array) -> (params, batch_stats) for `model_config` (float32 numpy)."""
  check_model_config(model_config)
  model = models.create_model(model_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  mapping = name_map(shapes)
  given = {k: v for k, v in state_dict.items() if not k.endswith('.num_batches_tracked')}
  missing = sorted(set(mapping) - set(given))
  extra = sorted(set(given) - set(mapping))
  if missing:
    raise WeightsError(f'The weights lack {len(missing)} key(s) that ResNet-{model_config.depth} needs, first '
                       f'{missing[0]!r}: {missing[:8]}. Is --config (depth {model_config.depth}) the right network?')
  if extra:
    raise WeightsError(f'The weights have {len(extra)} key(s) that ResNet-{model_config.depth} does not use, first '
                       f'{extra[0]!r}: {extra[:8]}. Is --config (depth {model_config.depth}) the right network?')
  out = {'params': {}, 'batch_stats': {}}
  for key, (collection, path) in mapping.items():
    value = _to_ours(key, np.asarray(given[key], np.float32))
    expected = _get(shapes[collection], path).shape
    if value.shape != expected:
      raise WeightsError(f'{key}: shape {value.shape} (after transposing to our layout) but the model needs '
                         f'{expected}. config.model.num_classes={model_config.num_classes}; is the config right?')
    _set(out[collection], path, value)
  return out['params'], out['batch_stats']


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def fold_input_normalization(params, std=TORCHVISION_STD * 255.0):
  """Divides the stem kernel's input channels by `std`, so that conv(x - m) equals torchvision's conv((x - m) / std)
  on 0..255 pixels. Returns new params."""
  params = jax.tree_util.tree_map(lambda a: a, params)
  params['stem_conv'] = dict(params['stem_conv'], kernel=params['stem_conv']['kernel']
                             / np.asarray(std, np.float32)[None, None, :, None])
  return params


def load_state_dict(path: str) -> dict:
  """name -> numpy array from a .pth/.pt (torch), .npz or .safetensors file."""
  if not os.path.exists(path):
    raise MissingFileError(f'No weights file {path!r}.')
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.pth', '.pt'):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'Reading {path} needs torch (pip install torch). Without torch, save the state dict as '
                        '.safetensors or .npz where torch is installed and convert that.') from e
    sd = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
      sd = sd['state_dict']
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  if ext == '.npz':
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if ext == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(f'Reading {path} needs safetensors (pip install safetensors).') from e
    return load_file(path)
  raise ConfigError(f'Unknown weights format {ext!r} of {path}; valid: .pth, .pt, .npz, .safetensors.')


def write_checkpoint(config, params, batch_stats, workdir: str) -> None:
  """A step-0 checkpoint in WORKDIR (for `python -m resnet_jax.evaluate`), its run record (config.json), and
  torchvision's channel mean as its mean image (WORKDIR/pixel_mean.npy, shape (1, 1, 3))."""
  from resnet_jax import checkpoint, train_step
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  size = config.data.image_size
  state = train_step.init_state(config, model, (size, size, 3), config.model.num_classes)
  state = state.replace(params=jax.tree_util.tree_map(jnp.asarray, params),
                        batch_stats=jax.tree_util.tree_map(jnp.asarray, batch_stats))
  with run_record.hold(workdir):  # one writer per workdir, as for a training run
    np.save(os.path.join(workdir, 'pixel_mean.npy'), (TORCHVISION_MEAN * 255.0).reshape(1, 1, 3))
    ckpt = checkpoint.Checkpointer(workdir)
    if ckpt.all_steps():
      raise FileExistsError(f'{ckpt.directory} already holds checkpoints {ckpt.all_steps()}; choose a new --workdir.')
    ckpt.save(state, force=True)
    ckpt.close()
    run_record.write(workdir, config)  # so that the evaluator reads the network and data from the workdir


def define_flags():
  flags.DEFINE_string('weights', None, 'torchvision state dict: .pth, .npz or .safetensors.')


def main(config, workdir: str) -> None:
  weights = flags.FLAGS.weights
  if not (weights and workdir):
    raise ConfigError('--weights, --config and --workdir are required (python -m resnet_jax.torchvision_weights '
                      '--helpshort).')
  try:
    params, batch_stats = convert(load_state_dict(weights), config.model)
    write_checkpoint(config, fold_input_normalization(params), batch_stats, workdir)
  except (ImportError, OSError) as e:
    raise ConfigError(str(e)) from e
  print(f'Wrote {workdir}/checkpoints (step 0), config.json and pixel_mean.npy. Evaluate with:\n  python -m '
        f'resnet_jax.evaluate --workdir={workdir} --protocol=center [--config.data.data_dir=DATA_DIR]')


if __name__ == '__main__':
  cli.run(main, define_flags, workdir_help='Directory to write the checkpoint into.', config_from_workdir=False)
