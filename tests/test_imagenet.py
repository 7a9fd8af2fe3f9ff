"""ImageNet: the streaming input pipeline, the testing protocols, BN recalibration and torchvision weights.

Everything runs on a tiny generated image folder (3 classes, JPEGs of several sizes) and small images (32 instead
of 224), so the real pipeline code is tested without ImageNet, and without TensorFlow. The torch tests skip with the
reason when torch is missing.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import (bn_recalibration, checkpoint, config_base, data_sources, errors, evaluate, image_ops,
                        input_pipeline, mesh as mesh_lib, metrics_io, models, streams, torchvision_weights,
                        validation)
import faults
from helpers import tiny_config, train_view

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec('torch') is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason='torch is not installed (pip install torch)')

CLASSES = ('ant', 'bee', 'cow')
SIZES = [(40, 56), (64, 48), (37, 37), (50, 80)]  # (h, w): landscape, portrait, square, wide
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 3


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG, smooth random images of various sizes."""
  root = tmp_path_factory.mktemp('imagenet_folder')
  rng = np.random.default_rng(0)
  for split, n in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
    for c in CLASSES:
      (root / split / c).mkdir(parents=True)
      for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(root / split / c / f'{c}_{i}.JPEG', format='JPEG', quality=95)
  return root


def tiny_imagenet_config(root, **overrides):
  """ResNet-18 (the smallest ImageNet-family net) on 32x32 crops of the tiny folder."""
  c = config_base.imagenet(18)
  c.model.num_classes = len(CLASSES)
  c.data.source, c.data.data_dir = 'folder', str(root)
  c.data.image_size, c.data.scale_range, c.data.eval_resize = 32, (32, 48), 36
  c.data.multiscale_sizes = (32, 40)
  c.data.mean_examples = 0
  c.batch_size, c.bn_group_size, c.eval_batch_size = 8, 2, 4
  c.num_steps, c.lr_boundaries = 2, (1,)
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def _read_image(path):
  return np.asarray(Image.open(path).convert('RGB'))


# ---------------------------------------------------------------------------------------------------------------
# The input pipeline.

def _streamed(c):
  return input_pipeline.StreamedInput(c, mesh_lib.make_mesh())


def _record(path):
  with open(path, 'rb') as f:
    return {'image': f.read(), 'label': 0, 'name': str(path)}


def _host_batches(c, step=0):
  """This process's host batches of the training stream from the batch of `step` on."""
  return streams.train_iterator(c, data_sources.streamed_source(c.data, 'train'), step * c.batch_size)


def test_train_stream_shapes_dtypes_labels_and_hosts(folder):
  c = tiny_imagenet_config(folder)
  inp = _streamed(c)
  assert inp.mean.shape == (32, 32, 3) and inp.class_names == list(CLASSES)
  stream = _host_batches(c)
  batches = [next(stream) for _ in range(4)]
  for images, noise, labels in batches:
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8  # a quarter of float32's bytes to copy
    assert noise.shape == (8, 3) and noise.dtype == np.float32 and np.abs(noise).max() > 0
    assert labels.shape == (8,) and labels.dtype == np.int32
  assert stream.get_state() == {streams.POSITION_KEY: 32}
  # The step's batch: noise added and the mean subtracted on the device, as the host reference does it.
  step_inputs = next(inp.train_inputs(1))
  x, y = jax.jit(lambda *a: inp.device_batch(1, *a, seed=0))(*step_inputs)
  np.testing.assert_allclose(np.asarray(x), image_ops.finish(*batches[1][:2], inp.mean), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(y), batches[1][2])
  # Each epoch (12 positions) is a permutation of the 12 training images: every label 4 times.
  labels = np.concatenate([y for _, _, y in batches])
  for epoch in range(2):
    assert sorted(labels[12 * epoch:12 * epoch + 12].tolist()) == sorted([0, 1, 2] * 4)
  # The mean image is the mean of the training images' centre views.
  views = np.concatenate([b['images'][b['mask'] > 0] for b in inp.eval_batches('train')])
  np.testing.assert_allclose(views.mean(0), 0.0, atol=1e-3)
  # Two hosts each read half of each global batch, and together exactly the one-host batch.
  source = data_sources.streamed_source(c.data, 'train')
  hosts = [streams.train_iterator(c, source, 8, process_index=i, process_count=2) for i in range(2)]
  parts = [next(h) for h in hosts]
  assert [p[0].shape for p in parts] == [(4, 32, 32, 3)] * 2
  key = lambda xs: sorted(x.tobytes() for x in xs)
  assert key(np.concatenate([p[0] for p in parts])) == key(batches[1][0])
  with pytest.raises(errors.USER_ERRORS, match='not divisible by the 3 hosts'):
    streams.train_iterator(c, source, 0, process_index=0, process_count=3)


def test_batches_depend_on_seed_and_position_only(folder):
  c = tiny_imagenet_config(folder)
  a = _host_batches(c)
  first = [next(a) for _ in range(5)]
  resumed = _host_batches(c, 3)  # a run resumed at step 3 reads batches 3 and 4 again, bit for bit
  for k in (3, 4):
    for a, b in zip(next(resumed), first[k]):
      np.testing.assert_array_equal(a, b)
  other = _host_batches(tiny_imagenet_config(folder, seed=1))
  assert not np.array_equal(next(other)[0], first[0][0])  # another seed, another stream


@pytest.mark.slow
def test_worker_processes_do_not_change_the_batches(folder):
  one = _host_batches(tiny_imagenet_config(folder), 2)
  two = _host_batches(tiny_imagenet_config(folder, **{'data.workers': 2, 'data.read_threads': 1}), 2)
  for _ in range(3):
    for a, b in zip(next(one), next(two)):
      np.testing.assert_array_equal(a, b)
  assert two.get_state() == one.get_state() == {streams.POSITION_KEY: 40}


def test_scale_augmentation_window_lies_in_range_and_inside_the_image():
  c = tiny_imagenet_config('unused')
  lo, hi, crop = 32, 48, 32
  shorters = []
  for (h, w) in SIZES:
    for i in range(60):
      d = image_ops.train_draws(np.random.default_rng([0, 1, i]), h, w, c.data)
      (nh, nw), top, left = d['size'], d['top'], d['left']
      assert lo <= d['shorter'] <= hi and min(nh, nw) == d['shorter']
      assert abs(max(nh, nw) / d['shorter'] - max(h, w) / min(h, w)) < 0.05  # aspect ratio kept
      assert 0 <= top <= nh - crop and 0 <= left <= nw - crop
      shorters.append(d['shorter'])
  assert min(shorters) == lo and max(shorters) == hi  # both ends of the range are drawn


def test_train_view_is_the_resized_image_cropped_at_the_sampled_window(folder):
  c = tiny_imagenet_config(folder, **{'data.lighting_std': 0.0})
  path = folder / 'train' / 'cow' / 'cow_3.JPEG'  # 50x80
  record = _record(path)
  image = Image.open(path).convert('RGB')
  flips = set()
  for i in range(12):
    view = train_view(record, np.random.default_rng([5, i]), c.data, 0.0)
    d = image_ops.train_draws(np.random.default_rng([5, i]), 50, 80, c.data)
    (nh, nw), t, l = d['size'], d['top'], d['left']
    # The whole image resized (in float, per channel), then cropped: the pipeline resizes only the window, in
    # 8 bits, so it is within Pillow's rounding (one level) of that.
    whole = np.stack([np.asarray(ch.convert('F').resize((nw, nh), Image.BILINEAR)) for ch in image.split()], -1)
    whole = whole[t:t + 32, l:l + 32]
    assert np.abs(view - (whole[:, ::-1] if d['flip'] else whole)).max() <= 1.0 + 1e-3
    flips.add(d['flip'])
  assert flips == {True, False}


def test_colour_noise_has_the_configured_magnitude(tmp_path):
  std = 0.1
  rng = np.random.default_rng(0)
  noise = np.stack([image_ops.lighting_noise(rng.normal(0, std, 3)) for _ in range(1500)])
  # noise = V (alpha * eigval) * 255 with V orthonormal, so alpha = V^T noise / (eigval * 255) ~ N(0, std).
  alpha = noise @ image_ops.IMAGENET_EIGVEC / (image_ops.IMAGENET_EIGVAL * 255.0)
  np.testing.assert_allclose(alpha.std(0), std, rtol=0.1)
  np.testing.assert_allclose(alpha.mean(0), 0.0, atol=4 * std / np.sqrt(1500))
  # The noise is one RGB offset per image: a flat image stays flat.
  c = tiny_imagenet_config('unused', **{'data.scale_range': (32, 32), 'data.random_flip': False})
  Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / 'flat.png')
  view = train_view(_record(tmp_path / 'flat.png'), np.random.default_rng(2), c.data, 0.0)
  offset = image_ops.lighting_noise(
      image_ops.train_draws(np.random.default_rng(2), 40, 40, c.data)['alpha'] * c.data.lighting_std)
  assert np.abs(offset).max() > 0.01
  np.testing.assert_allclose(view, np.broadcast_to(128 + offset, view.shape), atol=1e-3)


def test_ten_crops_are_the_corners_centre_and_their_flips():
  h, w, crop = 36, 50, 32
  image = np.arange(h * w * 3, dtype=np.float32).reshape(h, w, 3)  # every pixel distinct
  views = image_ops.ten_crops(image, crop)
  assert views.shape == (10, crop, crop, 3)
  np.testing.assert_array_equal(views[0], image[:crop, :crop])                       # top-left, pixel by pixel
  np.testing.assert_array_equal(views[1], image[:crop, w - crop:])                   # top-right
  np.testing.assert_array_equal(views[2], image[h - crop:, :crop])                   # bottom-left
  np.testing.assert_array_equal(views[3], image[h - crop:, w - crop:])               # bottom-right
  t, l = (h - crop) // 2, (w - crop) // 2
  np.testing.assert_array_equal(views[4], image[t:t + crop, l:l + crop])             # centre
  np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])                       # their flips
  assert len({v.tobytes() for v in views}) == 10


def test_eval_streams_count_every_image_once_over_hosts(folder):
  c = tiny_imagenet_config(folder)
  source = data_sources.streamed_source(c.data, 'val')
  n = len(CLASSES) * VAL_PER_CLASS  # 9, not a multiple of the batch (4) nor of the hosts (2)
  expected = sorted(np.repeat(np.arange(len(CLASSES)), VAL_PER_CLASS).tolist())
  zero = np.zeros(3, np.float32)
  for protocol, shape in (('center', (4, 32, 32, 3)), ('10crop', (4, 10, 32, 32, 3))):
    batches = list(streams.eval_batches(c, source, zero, protocol, 4))
    assert [b['images'].shape for b in batches] == [shape] * 3
    assert sum(b['mask'].sum() for b in batches) == n
    assert sorted(np.concatenate([b['labels'][b['mask'] > 0] for b in batches]).tolist()) == expected
  hosts = [list(streams.eval_batches(c, source, zero, 'center', 4, process_index=i, process_count=2))
           for i in range(2)]
  assert len(hosts[0]) == len(hosts[1])  # the hosts step in lockstep
  labels = [b['labels'][b['mask'] > 0] for h in hosts for b in h]
  assert sorted(np.concatenate(labels).tolist()) == expected
  images = np.concatenate([b['images'][b['mask'] > 0] for h in hosts for b in h])
  assert len({im.tobytes() for im in images}) == n  # nine different images, none twice
  multi = list(streams.eval_batches(c, source, zero, 'multiscale', 4))
  assert len(multi) == n and all(b['images_40'].shape[1:3] in ((40, 56), (53, 40), (40, 40), (40, 64))
                                 for b in multi)


def test_mean_is_sampled_over_the_whole_training_split(folder):
  picked = streams.mean_sample(1000, 100)
  assert len(set(picked.tolist())) == 100 and picked.min() < 100 and picked.max() > 900  # not the first files
  np.testing.assert_array_equal(streams.mean_sample(12, 0), np.arange(12))
  c = tiny_imagenet_config(folder, **{'data.mean_examples': 6})
  source = data_sources.streamed_source(c.data, 'train')
  idx = streams.mean_sample(len(source), 6)
  assert len(set(source.labels[idx].tolist())) > 1  # more than the first class
  views = [image_ops.center_view(source[int(i)], c.data).astype(np.float64) for i in idx]
  np.testing.assert_allclose(streams.compute_pixel_mean(c.data, source), np.mean(views, 0), atol=1e-4)


def test_missing_data_errors_say_what_to_do(tmp_path):
  c = tiny_imagenet_config(tmp_path / 'nothing')
  with pytest.raises(errors.DatasetNotFoundError, match='train/<class>/\\*.JPEG'):
    data_sources.streamed_source(c.data, 'train')
  c = tiny_imagenet_config(tmp_path, **{'data.source': 'tfds', 'data.dataset': 'imagenet2012'})
  if importlib.util.find_spec('tensorflow_datasets') is None:
    with pytest.raises(errors.DatasetNotFoundError, match='pip install tensorflow-datasets'):
      data_sources.streamed_source(c.data, 'train')
    return
  with pytest.raises(errors.DatasetNotFoundError) as e:
    data_sources.streamed_source(c.data, 'train')
  assert 'ILSVRC2012_img_train.tar' in str(e.value) and '--file_format=array_record' in str(e.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in str(e.value)
  c.data.source = 'lmdb'
  with pytest.raises(errors.USER_ERRORS, match='valid choices: tfds, folder'):
    validation.validate(c, 1)


class _FakeTfds:
  """Stands in for tensorflow_datasets: a prepared dataset of three encoded images, as `tfds.data_source` reads
  ArrayRecord files (a random-access sequence of dicts)."""

  def __init__(self, records, file_format='array_record'):
    import types
    self.records, self.file_format, self.calls = records, file_format, []
    self.decode = types.SimpleNamespace(SkipDecoding=lambda: 'skip')
    fake = self

    class Builder:
      def __init__(self, name, data_dir=None):
        self.info = types.SimpleNamespace(
            file_format=fake.file_format, splits={'train': types.SimpleNamespace(num_examples=len(records)),
                                                  'validation': types.SimpleNamespace(num_examples=0)},
            features={'label': types.SimpleNamespace(names=list(CLASSES))})

      def is_prepared(self):
        return True
    self.builder = Builder

  def data_source(self, name, split, data_dir, download, decoders):
    self.calls.append((name, split, decoders))
    return self.records


def test_tfds_array_record_source_reads_encoded_images_by_index(folder, monkeypatch):
  paths = sorted((folder / 'train').glob('*/*.JPEG'))[:3]
  records = [{'image': open(p, 'rb').read(), 'label': i, 'file_name': p.name.encode()} for i, p in enumerate(paths)]
  fake = _FakeTfds(records)
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', fake)
  c = tiny_imagenet_config('', **{'data.source': 'tfds', 'model.num_classes': 3})
  source = data_sources.streamed_source(c.data, 'train')
  assert len(source) == 3 and source.class_names == list(CLASSES)
  r = source[2]
  assert r['label'] == 2 and r['image'] == records[2]['image'] and paths[2].name in r['name']
  assert fake.calls == [('imagenet2012', 'train', {'image': 'skip'})]  # the images stay encoded
  view = image_ops.center_view(r, c.data)
  np.testing.assert_array_equal(view, image_ops.center_view(_record(paths[2]), c.data))
  fake.file_format = 'tfrecord'
  with pytest.raises(errors.DatasetNotFoundError, match='not ArrayRecord'):
    data_sources.streamed_source(c.data, 'train')


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def test_an_empty_class_folder_is_named(folder, tmp_path):
  import shutil
  root = tmp_path / 'data'
  shutil.copytree(folder, root)
  (root / 'train' / 'dog').mkdir()
  c = tiny_imagenet_config(root)
  with pytest.raises(errors.USER_ERRORS, match=r"hold no images .*\['dog'\]"):
    data_sources.streamed_source(c.data, 'train')
  (root / 'val' / 'dog').mkdir()
  (root / 'train' / 'dog' / 'a.JPEG').write_bytes((folder / 'train' / 'ant' / 'ant_0.JPEG').read_bytes())
  assert len(data_sources.streamed_source(c.data, 'val')) == 9  # a class without validation images is fine


def test_a_corrupt_image_stops_the_stream_naming_the_file(folder, tmp_path):
  import shutil
  root = tmp_path / 'data'
  shutil.copytree(folder, root)
  bad = root / 'train' / 'bee' / 'bee_1.JPEG'
  bad.write_bytes(bad.read_bytes()[:200])  # truncated in the middle of the image data
  stream = _host_batches(tiny_imagenet_config(root, **{'data.mean': 'none'}))
  with pytest.raises(errors.CorruptImageError, match='bee_1.JPEG.*Replace or remove that file'):
    for _ in range(3):  # two epochs: the file is read in one of the first three batches
      next(stream)
  with pytest.raises(errors.CorruptImageError, match='bee_1.JPEG'):  # the mean image reads it too
    _streamed(tiny_imagenet_config(root)).mean
  assert isinstance(errors.CorruptImageError('x'), errors.USER_ERRORS)


def test_resuming_continues_the_saved_position_and_refuses_other_classes_or_examples(folder):
  inp = _streamed(tiny_imagenet_config(folder))
  assert inp.iterator_state() == {'num_examples': 12, 'class_names': list(CLASSES)}  # no stream started yet
  saved = {streams.POSITION_KEY: 16, 'num_examples': 12, 'class_names': list(CLASSES)}
  for state in (saved, None):  # a checkpoint without the state: step x batch, the same position
    next(inp.train_inputs(2, state))
    assert inp.iterator_state() == {**saved, streams.POSITION_KEY: 24}  # after the batch of step 2
    inp.close()
  with pytest.raises(errors.USER_ERRORS, match=r"missing here: \['bear'\]; new here: \['bee'\]"):
    inp.train_inputs(2, {**saved, 'class_names': ['ant', 'bear', 'cow']})
  with pytest.raises(errors.USER_ERRORS, match='13 training examples, here 12'):
    inp.train_inputs(2, {**saved, 'num_examples': 13})


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.

def _resnet8(num_classes=3):
  c = tiny_config()
  c.model.num_classes = num_classes
  model = models.create_model(c.model)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  return model, variables


@pytest.mark.slow
def test_evaluator_top1_top5_match_a_direct_computation(folder):
  c = tiny_imagenet_config(folder, **{'data.mean': 'none'})
  model, variables = _resnet8(num_classes=7)
  mean = np.zeros(3, np.float32)
  source = data_sources.streamed_source(c.data, 'val')
  batches = list(streams.eval_batches(c, source, mean, 'center', 4))
  x = np.concatenate([b['images'][b['mask'] > 0] for b in batches])
  y = np.concatenate([b['labels'][b['mask'] > 0] for b in batches])
  log_probs = np.asarray(jax.jit(lambda x: jax.nn.log_softmax(model.apply(variables, x, train=False)))(x))
  order = np.argsort(-log_probs, axis=1)
  r = evaluate.evaluate(model, variables, streams.eval_batches(c, source, mean, 'center', 4))
  assert r['count'] == 9
  assert r['top1_error'] == pytest.approx(np.mean(order[:, 0] != y))
  assert r['top5_error'] == pytest.approx(np.mean(~np.any(order[:, :5] == y[:, None], 1)))
  assert r['loss'] == pytest.approx(np.mean(-log_probs[np.arange(9), y]), rel=1e-5)
  for protocol in ('10crop', 'multiscale'):
    bs = evaluate.protocol_batch_size(c, protocol, jax.local_device_count())
    r = evaluate.evaluate(model, variables, streams.eval_batches(c, source, mean, protocol, bs), protocol)
    assert r['count'] == 9 and 0 <= r['top5_error'] <= r['top1_error'] <= 1


def test_dense_scores_reduce_to_the_logits_when_the_pool_covers_the_map():
  model, variables = _resnet8()
  x = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  logits = model.apply(variables, x, train=False)
  np.testing.assert_allclose(evaluate.dense_scores(model, variables, x, window=100), logits, atol=1e-5)
  # A smaller window averages the fc over positions of a sliding pool: different from the global pool here.
  assert not np.allclose(evaluate.dense_scores(model, variables, x, window=3), logits, atol=1e-3)


def test_evaluating_a_workdir_without_checkpoint_is_a_clear_error(tmp_path):
  c = tiny_imagenet_config(tmp_path)
  with pytest.raises(errors.CheckpointNotFoundError, match='No checkpoint under'):
    checkpoint.restore_from_workdir(c, str(tmp_path), mesh_lib.make_mesh())


# ---------------------------------------------------------------------------------------------------------------
# BN recalibration.

def test_bn_recalibration_equals_the_statistics_of_the_data_it_saw():
  model, variables = _resnet8()
  key = jax.random.key(3)
  batches = [2.0 * jax.random.normal(jax.random.fold_in(key, i), (k, 8, 8, 3)) + 0.5 for i, k in enumerate((8, 4, 8))]
  new = bn_recalibration.recalibrate(model, variables, batches)
  # The truth: every BN's input is the output of the conv before it, in the same training-mode passes.
  stats_model = model.clone(bn_group_size=0)
  conv_outputs = jax.jit(lambda x: stats_model.apply(
      variables, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, m: type(mdl).__name__ == 'Conv')[1]['intermediates'])
  convs = {}
  for x in batches:
    for path, v in jax.tree_util.tree_flatten_with_path(conv_outputs(x))[0]:
      keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
      if keys[-1] == '__call__':  # a conv's output (not the sown 'bn_3x3')
        convs.setdefault(tuple(keys[:-1]), []).append(np.asarray(v))
  assert len(convs) == len(jax.tree_util.tree_leaves(new['batch_stats'])) // 2
  bn_of = {'stem_conv': 'stem_bn', 'proj_conv': 'proj_bn', 'conv1': 'bn1', 'conv2': 'bn2'}
  for names, outs in convs.items():
    a = np.concatenate(outs).reshape(-1, outs[0].shape[-1]).astype(np.float64)
    stats = new['batch_stats']
    for n in names[:-1] + (bn_of[names[-1]],):
      stats = stats[n]
    np.testing.assert_allclose(stats['mean'], a.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats['var'], a.var(0), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(new['params']), jax.tree_util.tree_leaves(variables['params'])):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# torchvision weights.

def torch_resnet(depth, num_classes):
  """A ResNet with torchvision's module layout and parameter names, written here (no torchvision needed)."""
  import torch
  from torch import nn
  blocks, bottleneck = models.IMAGENET_STAGES[depth]

  class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.downsample = downsample

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, downsample):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: the stride on the 3x3
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(width * 4)
      self.downsample = downsample

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

  block = Bottleneck if bottleneck else Basic

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      cin = 64
      for s, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        layers = []
        for b in range(n):
          stride = 2 if s > 0 and b == 0 else 1
          down = None
          if stride != 1 or cin != width * block.expansion:
            down = nn.Sequential(nn.Conv2d(cin, width * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(width * block.expansion))
          layers.append(block(cin, width, stride, down))
          cin = width * block.expansion
        setattr(self, f'layer{s + 1}', nn.Sequential(*layers))
      self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for s in range(4):
        x = getattr(self, f'layer{s + 1}')(x)
      return self.fc(x.mean((2, 3)))

  torch.manual_seed(depth)
  net = ResNet()
  with torch.no_grad():  # non-trivial BN parameters and running statistics
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.momentum = None  # cumulative average: the running stats become those of the batches below
    net.train()
    for i in range(2):
      net(torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(i)))
  return net.eval()


def _tv_config(depth, num_classes):
  c = config_base.imagenet(depth)
  c.model.num_classes, c.model.shortcut, c.model.bottleneck = num_classes, 'B', 'v1.5'
  return c


@needs_torch
@pytest.mark.parametrize('depth', [18, 50])
def test_torchvision_weights_give_the_same_logits(depth):
  import torch
  net = torch_resnet(depth, num_classes=5)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  c = _tv_config(depth, 5)
  params, batch_stats = torchvision_weights.convert(sd, c.model)
  x = np.random.default_rng(0).normal(size=(2, 48, 40, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  model = models.create_model(c.model)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  got = np.asarray(apply({'params': params, 'batch_stats': batch_stats}, x))
  assert np.abs(want).max() > 0.1  # the logits are not trivially small
  assert np.abs(got - want).max() < 1e-4
  if depth == 18:
    # torchvision's input normalisation folded into the stem: raw 0..255 pixels minus the channel mean.
    raw = np.random.default_rng(1).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    norm = (raw / 255 - torchvision_weights.TORCHVISION_MEAN) / torchvision_weights.TORCHVISION_STD
    with torch.no_grad():
      want = net(torch.from_numpy(norm.transpose(0, 3, 1, 2).copy())).numpy()
    folded = torchvision_weights.fold_input_normalization(params)
    got = apply({'params': folded, 'batch_stats': batch_stats}, raw - torchvision_weights.TORCHVISION_MEAN * 255)
    assert np.abs(np.asarray(got) - want).max() < 1e-4


def _fake_state_dict(depth=18, num_classes=5):
  c = _tv_config(depth, num_classes)
  shapes = jax.eval_shape(lambda: models.create_model(c.model).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                                     train=False))
  rng = np.random.default_rng(0)
  sd = {}
  for key, (col, path) in torchvision_weights.name_map(shapes).items():
    leaf = shapes[col]
    for p in path:
      leaf = leaf[p]
    shape = leaf.shape
    shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    sd[key] = rng.normal(size=shape).astype(np.float32)
  return c, sd


def test_torchvision_name_map_is_explicit_and_mismatches_are_named(tmp_path):
  c, sd = _fake_state_dict()
  assert {'conv1.weight', 'bn1.running_var', 'layer2.0.downsample.0.weight', 'layer2.0.downsample.1.weight',
          'layer4.1.bn2.bias', 'fc.weight', 'fc.bias'} <= set(sd)
  assert len(sd) == 102  # ResNet-18: 20 convs + 20 BNs x 4 + fc weight and bias
  params, stats = torchvision_weights.convert(dict(sd, **{'bn1.num_batches_tracked': np.int64(3)}), c.model)
  np.testing.assert_array_equal(params['stage2_block1']['shortcut']['proj_conv']['kernel'],
                                sd['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats['stage3_block2']['bn1']['mean'], sd['layer3.1.bn1.running_mean'])
  np.testing.assert_array_equal(params['head']['kernel'], sd['fc.weight'].T)
  missing = {k: v for k, v in sd.items() if k != 'layer3.1.bn2.running_mean'}
  with pytest.raises(torchvision_weights.WeightsError, match="lack 1 key.*'layer3.1.bn2.running_mean'"):
    torchvision_weights.convert(missing, c.model)
  with pytest.raises(torchvision_weights.WeightsError, match="'layer5.0.conv1.weight'"):
    torchvision_weights.convert(dict(sd, **{'layer5.0.conv1.weight': np.zeros(1)}), c.model)
  with pytest.raises(torchvision_weights.WeightsError, match='fc.weight: shape'):
    torchvision_weights.convert(dict(sd, **{'fc.weight': np.zeros((1000, 512), np.float32)}), c.model)
  c.model.shortcut = 'A'
  with pytest.raises(torchvision_weights.WeightsError, match='shortcut=B'):
    torchvision_weights.convert(sd, c.model)
  # .npz and .safetensors load without torch.
  np.savez(tmp_path / 'w.npz', **sd)
  loaded = torchvision_weights.load_state_dict(str(tmp_path / 'w.npz'))
  assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
  if importlib.util.find_spec('safetensors') is not None:
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / 'w.safetensors'))
    loaded = torchvision_weights.load_state_dict(str(tmp_path / 'w.safetensors'))
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------------------------
# End to end: main trains from the folder through the streaming pipeline; the evaluator reads its checkpoint.

# A streamed run of a tiny network on the folder: 6 steps of 8 images, so the 12 training images make 4 epochs and
# most batches straddle two epochs.
STREAMED_RUN = ['--config.model.family=cifar', '--config.model.depth=8', '--config.model.num_classes=3',
                '--config.data.source=folder', '--config.data.image_size=32', '--config.data.scale_range=(32,48)',
                '--config.data.eval_resize=36', '--config.data.mean_examples=6', '--config.batch_size=8',
                '--config.bn_group_size=4', '--config.eval_batch_size=4', '--config.num_steps=6',
                '--config.lr_boundaries=(4,)', '--config.log_every_steps=1', '--config.eval_every_steps=2',
                '--config.checkpoint_every_steps=2']


def _streamed_main(folder, workdir, *extra, fault=None, cache=None, tmp=None, command=None):
  """`python -m resnet_jax.main` (or tests/faults.py with `fault`, or `command` with --workdir and `extra` alone) on
  the folder, with TensorFlow made unimportable: a stand-in package that raises ImportError comes first on the
  path."""
  blocker = os.path.join(str(tmp or workdir) + '_no_tf', 'tensorflow')
  os.makedirs(blocker, exist_ok=True)
  with open(os.path.join(blocker, '__init__.py'), 'w') as f:
    f.write("raise ImportError('TensorFlow is not installed here')\n")
  env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, 'XLA_FLAGS')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             PYTHONPATH=os.pathsep.join([os.path.dirname(blocker), REPO] +
                                        [p for p in [os.environ.get('PYTHONPATH')] if p]))
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  if fault:
    env[faults.ENV] = fault
  if command:
    args = [f'--workdir={workdir}', *extra]
  else:
    command = [os.path.join(REPO, 'tests', 'faults.py')] if fault else ['-m', 'resnet_jax.main']
    args = [f'--config={REPO}/configs/imagenet_18.py', f'--workdir={workdir}', f'--config.data.data_dir={folder}',
            *STREAMED_RUN, *extra]
  # A run takes seconds; a worker process outliving a killed run would hold its output pipes open until the timeout.
  return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=240)


@pytest.mark.slow
def test_evaluate_reads_the_runs_own_config_from_its_workdir(folder, tmp_path):
  workdir = tmp_path / 'run'
  trained = _streamed_main(folder, workdir, '--config.batch_size=4', '--config.bn_group_size=2')
  assert trained.returncode == 0, trained.stderr[-3000:]
  moved = tmp_path / 'moved'
  shutil.copytree(folder, moved)
  # --workdir alone: the network, data and batch come from the run's config.json; an override (where the data now
  # lives) changes only what it names.
  out = _streamed_main(folder, workdir, '--protocol=10crop', f'--config.data.data_dir={moved}',
                       command=['-m', 'resnet_jax.evaluate'], tmp=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(workdir / 'eval_10crop_step6.json'))
  assert result['count'] == 3 * VAL_PER_CLASS and result['protocol'] == '10crop'
  assert json.load(open(workdir / 'config.json'))['batch_size'] == 4
  missing = _streamed_main(folder, tmp_path / 'nothing', '--protocol=center', command=['-m', 'resnet_jax.evaluate'],
                           tmp=tmp_path)
  assert missing.returncode != 0 and 'Traceback' not in missing.stderr
  assert '--config is required' in missing.stderr or 'config.json' in missing.stderr


@pytest.fixture(scope='module')
def streamed_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('streamed_jax_cache')


@pytest.fixture(scope='module')
def streamed_reference(folder, tmp_path_factory, streamed_cache):
  workdir = tmp_path_factory.mktemp('streamed_reference') / 'run'
  r = _streamed_main(folder, workdir, cache=streamed_cache)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return workdir


def _run_record(workdir):
  rows = [{k: v for k, v in r.items() if k != 'examples_per_sec'}
          for r in metrics_io.read_metrics(str(workdir / 'metrics.jsonl'))]
  ckpt = checkpoint.Checkpointer(str(workdir))
  arrays = {jax.tree_util.keystr(p): np.asarray(a).tobytes()
            for p, a in jax.tree_util.tree_flatten_with_path(ckpt.load_arrays(6))[0]}
  data_state = ckpt.data_state(6)
  ckpt.close()
  return rows, arrays, data_state


def _processes_with(marker: str) -> list:
  """pids of the processes whose environment holds `marker` (a run's processes, its grain workers included)."""
  found = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


@pytest.mark.slow
@pytest.mark.parametrize('fault, killed_workers, resumed_workers',
                         [('kill@train:5', 2, 0), ('kill@checkpoint:4', 0, 2)])
def test_streamed_run_killed_anywhere_resumes_to_the_uninterrupted_result(folder, streamed_reference, streamed_cache,
                                                                       tmp_path, monkeypatch, fault, killed_workers,
                                                                       resumed_workers):
  """SIGKILL after step 5 (one step past the checkpoint of step 4), or inside the write of step 4's checkpoint;
  the same command resumes with another number of decoding worker processes. Every metrics line and the final
  checkpoint (parameters, BN statistics, momentum, the stream position) equal the uninterrupted run's, and the
  killed run's worker processes do not outlive it."""
  workdir = tmp_path / 'run'
  marker = f'RESNET_JAX_TEST_RUN={tmp_path.name}'
  monkeypatch.setenv('RESNET_JAX_TEST_RUN', tmp_path.name)
  killed = _streamed_main(folder, workdir, f'--config.data.workers={killed_workers}', fault=fault,
                          cache=streamed_cache, tmp=tmp_path)
  assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
  for _ in range(20):  # orphaned workers notice within a second or two
    if not _processes_with(marker):
      break
    time.sleep(0.5)
  assert not _processes_with(marker)
  monkeypatch.delenv('RESNET_JAX_TEST_RUN')
  with checkpoint.ocp.CheckpointManager(str(workdir / 'checkpoints'),
                                        options=checkpoint.ocp.CheckpointManagerOptions(read_only=True)) as m:
    assert list(m.all_steps()) in ([2], [2, 4])  # what the killed run left to resume from
  resumed = _streamed_main(folder, workdir, f'--config.data.workers={resumed_workers}', cache=streamed_cache,
                           tmp=tmp_path)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  rows, arrays, data_state = _run_record(workdir)
  ref_rows, ref_arrays, ref_data_state = _run_record(streamed_reference)
  assert [r['step'] for r in ref_rows] == [1, 2, 3, 4, 5, 6] and rows == ref_rows
  assert len(arrays) > 20 and arrays.keys() == ref_arrays.keys()
  for k in arrays:
    assert arrays[k] == ref_arrays[k], f'{k} differs'
  assert data_state == ref_data_state == {streams.POSITION_KEY: 48, 'num_examples': 12,
                                          'class_names': list(CLASSES)}


@pytest.mark.slow
def test_streamed_run_refuses_a_checkpoint_of_other_classes(folder, streamed_reference, tmp_path):
  import shutil
  root, workdir = tmp_path / 'data', tmp_path / 'run'
  shutil.copytree(folder, root)
  shutil.copytree(streamed_reference, workdir)
  os.rename(root / 'train' / 'bee', root / 'train' / 'bear')
  os.rename(root / 'val' / 'bee', root / 'val' / 'bear')
  before = sorted(os.listdir(workdir))
  r = _streamed_main(root, workdir, '--config.num_steps=8', '--force_resume', tmp=tmp_path)
  assert r.returncode == 1 and "missing here: ['bee']; new here: ['bear']" in r.stderr, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr and sorted(os.listdir(workdir)) == before


@pytest.mark.slow
def test_main_trains_a_resnet18_on_the_folder_and_the_evaluator_reads_it(folder, tmp_path):
  workdir = tmp_path / 'run'
  args = [f'--config={REPO}/configs/imagenet_18.py', f'--workdir={workdir}', '--config.model.num_classes=3',
          '--config.data.source=folder', f'--config.data.data_dir={folder}', '--config.data.image_size=32',
          '--config.data.scale_range=(32,48)', '--config.data.eval_resize=36', '--config.data.mean_examples=0',
          '--config.batch_size=8', '--config.bn_group_size=2', '--config.eval_batch_size=4',
          '--config.num_steps=2', '--config.lr_boundaries=(1,)', '--config.log_every_steps=2',
          '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2']
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  r = subprocess.run([sys.executable, '-m', 'resnet_jax.main'] + args, cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '(streamed)' in r.stdout
  rows = metrics_io.read_metrics(str(workdir / 'metrics.jsonl'))
  assert [row['step'] for row in rows] == [2]
  assert 0 <= rows[0]['val_error'] <= 1 and np.isfinite(rows[0]['train_loss'])
  assert (workdir / 'pixel_mean.npy').exists()
  # The evaluator restores the checkpoint and counts each of the 9 validation images once.
  c = tiny_imagenet_config(folder)
  result = evaluate.run(c, str(workdir), 'center')
  assert result['count'] == 9 and result['step'] == 2
  assert result['top1_error'] == pytest.approx(rows[0]['val_error'])
  assert json.load(open(workdir / 'eval_center_step2.json'))['count'] == 9


def test_bn_recalibration_from_the_training_stream(folder):
  c = tiny_imagenet_config(folder, **{'data.mean': 'none'})
  model, variables = _resnet8()
  inp = input_pipeline.StreamedInput(c, mesh_lib.make_mesh())
  with pytest.raises(errors.USER_ERRORS, match='fewer than one batch'):
    bn_recalibration.recalibrate_from_input(c, model, variables, inp, 4)
  new = bn_recalibration.recalibrate_from_input(c, model, variables, inp, 16)
  stem = new['batch_stats']['stem_bn']
  # Fresh statistics are mean 0 / var 1; 0..255 pixels through the stem conv give something else entirely.
  assert np.all(np.isfinite(stem['var'])) and np.abs(np.asarray(stem['mean'])).max() > 1
  assert set(new['batch_stats']) == set(variables['batch_stats'])


def test_bn_recalibration_from_the_in_memory_training_views():
  c = tiny_config()  # the embedded digits at 8x8: the views are cropped and flipped on the device, as in the step
  inp = input_pipeline.create(c, mesh_lib.make_mesh())
  views = list(inp.training_batches(2, c.batch_size))
  step_batch = jax.jit(lambda step, *a: inp.device_batch(step, *a, seed=c.seed)[0])
  for step, view in enumerate(views):
    assert view.shape == (c.batch_size, 8, 8, 3) and view.dtype == np.float32
    np.testing.assert_array_equal(view, np.asarray(step_batch(step, *next(inp.train_inputs(0)))))
  model = models.create_model(c.model)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  new = bn_recalibration.recalibrate_from_input(c, model, variables, inp, 2 * c.batch_size)
  expected = bn_recalibration.recalibrate(model, variables, views)
  for a, b in zip(jax.tree_util.tree_leaves(new['batch_stats']), jax.tree_util.tree_leaves(expected['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match='batches of config.batch_size=32, not 16'):
    next(inp.training_batches(1, 16))
