"""The ImageNet input pipeline of Sec. 3.4, streamed from disk with tf.data (the dataset does not fit in memory).

Sources (`config.data.source`):
  'tfds'    tensorflow-datasets `imagenet2012` (manual download: the two ILSVRC2012 tars, see `_tfds_help`).
  'folder'  DIR/train/<class>/*.JPEG and DIR/val/<class>/* (any JPEG/PNG/BMP/GIF): small local datasets and tests
            run the same code as the real thing.

Training view (each step a named `config.data` option; the defaults are the paper's):
  decode -> shorter side resized to a random integer in `scale_range` ([256, 480], "scale augmentation" [41])
  -> random `image_size` (224) crop -> random horizontal flip (`random_flip`) -> AlexNet PCA colour noise with the
  standard ImageNet eigenvalues/eigenvectors (`lighting_std`, 0.1) -> mean subtraction (`mean`: 'per_pixel', the
  paper's "per-pixel mean subtracted"; or 'per_channel'; or 'none').
Test views (Sec. 3.4): 'center' (the 224 centre crop of the image resized to `eval_resize` = 256), '10crop' (four
  corners and centre of that image and their flips) and 'multiscale' (the whole image, shorter side in
  `multiscale_sizes`, for the fully-convolutional evaluation in evaluate.py).

Every host reads only its shard (`jax.process_index()` of `jax.process_count()`): the training stream of a host
yields `batch_size / process_count` examples a step, and `prefetch_to_device` assembles the global batch from the
hosts' parts. TensorFlow is imported only inside this module's functions and never sees the accelerators.
"""
import collections
import dataclasses
import os

import jax
import numpy as np

from resnet_jax.data import DatasetNotFoundError

SOURCES = ('tfds', 'folder')
MEAN_TYPES = ('per_pixel', 'per_channel', 'none')
PROTOCOLS = ('center', '10crop', 'multiscale')
FOLDER_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif')
SPLITS = {'train': ('train', 'train'), 'val': ('validation', 'val')}  # ours -> (tfds name, folder name)

# AlexNet's PCA colour augmentation: eigen-decomposition of the covariance of ImageNet RGB pixels scaled to [0, 1]
# (the values used by fb.resnet.torch, which the authors pointed to). Columns of IMAGENET_EIGVEC are eigenvectors.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float32)


def _tf():
  try:
    import tensorflow as tf
  except ImportError as e:
    raise DatasetNotFoundError(
        'The ImageNet input pipeline needs TensorFlow (tf.data): pip install tensorflow-cpu tensorflow-datasets '
        "(or pip install -e '.[tfds]').") from e
  tf.config.set_visible_devices([], 'GPU')  # the accelerators belong to JAX
  return tf


# ---------------------------------------------------------------------------------------------------------------
# Sources: (encoded image bytes, int32 label) datasets, sharded per host.

@dataclasses.dataclass
class SplitInfo:
  num_examples: int   # in the whole split (all hosts)
  class_names: list


def _tfds_help(data_dir: str) -> str:
  root = data_dir or '~/tensorflow_datasets'
  return (f'imagenet2012 is not prepared under {root}. tensorflow-datasets cannot download ImageNet: register at '
          'image-net.org, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, put both in '
          f'{os.path.join(root, "downloads", "manual")}/ and run once (hours, ~300 GB of disk):\n'
          f'  tfds build imagenet2012 --data_dir={root}\n'
          'Or use an image folder: --config.data.source=folder --config.data.data_dir=DIR with '
          'DIR/train/<class>/*.JPEG and DIR/val/<class>/*.')


def _folder_help(root: str) -> str:
  return (f'Expected an ImageNet-style image folder at {root!r}: {root}/train/<class>/*.JPEG and '
          f'{root}/val/<class>/* (classes = sub-folder names, sorted). Or use --config.data.source=tfds.')


def list_folder(root: str, split: str):
  """(paths, labels, class_names) of DIR/<split>/<class>/*, classes named by the train split's folders."""
  if not root or not os.path.isdir(os.path.join(root, 'train')):
    raise DatasetNotFoundError(_folder_help(root or '<config.data.data_dir is empty>'))
  classes = sorted(c for c in os.listdir(os.path.join(root, 'train')) if os.path.isdir(os.path.join(root, 'train', c)))
  if not classes:
    raise DatasetNotFoundError(f'No class folders under {root}/train. ' + _folder_help(root))
  d = os.path.join(root, SPLITS[split][1])
  if not os.path.isdir(d):
    raise DatasetNotFoundError(f'No {d}. ' + _folder_help(root))
  extra = sorted(set(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))) - set(classes))
  if extra:
    raise ValueError(f'{d} has classes that {root}/train lacks: {extra}.')
  paths, labels = [], []
  for label, c in enumerate(classes):
    cdir = os.path.join(d, c)
    if not os.path.isdir(cdir):
      continue
    for f in sorted(os.listdir(cdir)):
      if f.lower().endswith(FOLDER_EXTENSIONS):
        paths.append(os.path.join(cdir, f))
        labels.append(label)
  if not paths:
    raise DatasetNotFoundError(f'No images (*{", *".join(FOLDER_EXTENSIONS)}) under {d}/<class>/. '
                               + _folder_help(root))
  return paths, np.asarray(labels, np.int32), classes


def _tfds_builder(data_config):
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetNotFoundError('config.data.source=tfds needs tensorflow-datasets: pip install tensorflow-datasets '
                               "tensorflow-cpu (or pip install -e '.[tfds]').") from e
  builder = tfds.builder(data_config.dataset, data_dir=data_config.data_dir or None)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_tfds_help(data_config.data_dir))
  return tfds, builder


def split_info(data_config, split: str) -> SplitInfo:
  _check_source(data_config)
  if data_config.source == 'folder':
    paths, _, classes = list_folder(data_config.data_dir, split)
    return SplitInfo(len(paths), classes)
  _, builder = _tfds_builder(data_config)
  return SplitInfo(builder.info.splits[SPLITS[split][0]].num_examples, list(builder.info.features['label'].names))


def _check_source(data_config):
  if data_config.source not in SOURCES:
    raise ValueError(f'Unknown streaming data source {data_config.source!r}; valid choices: {", ".join(SOURCES)}.')


def encoded_dataset(data_config, split: str, process_index: int = 0, process_count: int = 1, shuffle: bool = False,
                    seed: int = 0, limit: int = 0):
  """tf.data of (encoded bytes, int32 label): this host's shard of `split` ('train' | 'val'), in file order unless
  `shuffle`. `limit` > 0 takes the first `limit` examples of the split before sharding."""
  tf = _tf()
  _check_source(data_config)
  if data_config.source == 'folder':
    paths, labels, _ = list_folder(data_config.data_dir, split)
    if limit:
      paths, labels = paths[:limit], labels[:limit]
    # Shard the file list: host i reads files i, i + count, ..., so every file is read by exactly one host.
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shard(process_count, process_index)
    if shuffle:
      ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)  # a full shuffle of the file names
    return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
  tfds, builder = _tfds_builder(data_config)
  name = SPLITS[split][0]
  if limit:
    name = f'{name}[:{limit}]'
  part = tfds.even_splits(name, n=process_count, drop_remainder=False)[process_index]
  ds = builder.as_dataset(split=part, shuffle_files=shuffle, decoders={'image': tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  return ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))


def _cached(ds, cache: str):
  if not cache:
    return ds
  return ds.cache() if cache == 'memory' else ds.cache(cache)


# ---------------------------------------------------------------------------------------------------------------
# Image operations (TensorFlow graph functions; stateless random ops seeded per example).

def decode(image_bytes):
  """Encoded JPEG/PNG/... bytes -> uint8 (H, W, 3); grey and CMYK JPEGs become RGB."""
  tf = _tf()
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resized_shape(height, width, shorter):
  """(h, w) with the shorter side `shorter` and the aspect ratio kept (the longer side rounded)."""
  tf = _tf()
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s = tf.cast(shorter, tf.float32) / tf.minimum(h, w)
  nh = tf.where(h <= w, tf.cast(shorter, tf.int32), tf.cast(tf.round(h * s), tf.int32))
  nw = tf.where(h <= w, tf.cast(tf.round(w * s), tf.int32), tf.cast(shorter, tf.int32))
  return nh, nw


def resize_shorter(image, shorter):
  """float32 image with its shorter side resized to `shorter` (bilinear, antialiased when shrinking)."""
  tf = _tf()
  shape = tf.shape(image)
  nh, nw = resized_shape(shape[0], shape[1], shorter)
  return tf.image.resize(tf.cast(image, tf.float32), tf.stack([nh, nw]), method='bilinear', antialias=True)


def sample_crop_window(height, width, seed, scale_range, crop: int):
  """The scale-augmentation window: (shorter side, resized h, resized w, top, left) of a random `crop` square."""
  tf = _tf()
  lo, hi = scale_range
  s_seed, t_seed, l_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shorter = tf.random.stateless_uniform([], s_seed, minval=lo, maxval=hi + 1, dtype=tf.int32)
  nh, nw = resized_shape(height, width, shorter)
  top = tf.random.stateless_uniform([], t_seed, minval=0, maxval=nh - crop + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], l_seed, minval=0, maxval=nw - crop + 1, dtype=tf.int32)
  return shorter, nh, nw, top, left


def lighting_noise(seed, std: float):
  """AlexNet's PCA colour noise for one image, in 0..255 pixel units: eigvec @ (alpha * eigval), alpha ~ N(0, std)."""
  tf = _tf()
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  return tf.linalg.matvec(tf.constant(IMAGENET_EIGVEC), alpha * tf.constant(IMAGENET_EIGVAL)) * 255.0


def train_view(image_bytes, seed, data_config, mean):
  """One training example: decode, scale augmentation, crop, flip, colour noise, mean subtraction (float32)."""
  tf = _tf()
  crop = data_config.image_size
  image = decode(image_bytes)
  shape = tf.shape(image)
  w_seed, f_seed, c_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shorter, _, _, top, left = sample_crop_window(shape[0], shape[1], w_seed, tuple(data_config.scale_range), crop)
  x = resize_shorter(image, shorter)[top:top + crop, left:left + crop]
  if data_config.random_flip:
    flip = tf.random.stateless_uniform([], f_seed) < 0.5
    x = tf.cond(flip, lambda: tf.image.flip_left_right(x), lambda: x)
  if data_config.lighting_std:
    x = x + lighting_noise(c_seed, data_config.lighting_std)
  x = x - mean
  x.set_shape([crop, crop, 3])
  return x


def ten_crops(image, crop: int):
  """The ten views of Sec. 3.4 / AlexNet: top-left, top-right, bottom-left, bottom-right, centre, then the same
  five flipped left-right. (10, crop, crop, C)."""
  tf = _tf()
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  ct, cl = (h - crop) // 2, (w - crop) // 2
  corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (ct, cl)]
  views = [image[t:t + crop, l:l + crop] for t, l in corners]
  views = tf.stack(views + [tf.image.flip_left_right(v) for v in views])
  views.set_shape([10, crop, crop, image.shape[-1]])
  return views


def eval_view(image_bytes, data_config, mean, protocol: str):
  """'center': (crop, crop, 3); '10crop': (10, crop, crop, 3); 'multiscale': a tuple of whole images, one per size
  in `multiscale_sizes`. Mean subtracted (the per-pixel mean as its channel average for whole images)."""
  tf = _tf()
  crop = data_config.image_size
  image = decode(image_bytes)
  if protocol == 'multiscale':
    channel_mean = tf.reduce_mean(tf.reshape(mean, [-1, 3]), 0)
    return tuple(resize_shorter(image, s) - channel_mean for s in data_config.multiscale_sizes)
  x = resize_shorter(image, data_config.eval_resize)
  if protocol == '10crop':
    return ten_crops(x, crop) - mean  # the (per-pixel) mean is subtracted from each view, as from training crops
  shape = tf.shape(x)
  t, l = (shape[0] - crop) // 2, (shape[1] - crop) // 2
  v = x[t:t + crop, l:l + crop] - mean
  v.set_shape([crop, crop, 3])
  return v


# ---------------------------------------------------------------------------------------------------------------
# The mean image (Sec. 3.4, "per-pixel mean subtracted").

def compute_pixel_mean(data_config, num_examples: int | None = None) -> np.ndarray:
  """The per-pixel mean (crop, crop, 3) of the centre views (shorter side `eval_resize`, centre `image_size` crop)
  of the first `num_examples` training images (`config.data.mean_examples`; 0 = all), float64-accumulated."""
  tf = _tf()
  n = data_config.mean_examples if num_examples is None else num_examples
  crop, resize = data_config.image_size, data_config.eval_resize

  def centre(b, y):
    x = resize_shorter(decode(b), resize)
    s = tf.shape(x)
    t, l = (s[0] - crop) // 2, (s[1] - crop) // 2
    return x[t:t + crop, l:l + crop]

  ds = encoded_dataset(data_config, 'train', limit=n).map(centre, num_parallel_calls=tf.data.AUTOTUNE)
  total, count = np.zeros((crop, crop, 3), np.float64), 0
  for batch in ds.batch(256).prefetch(2).as_numpy_iterator():
    total += batch.sum(0, dtype=np.float64)
    count += len(batch)
  return (total / count).astype(np.float32)


def input_mean(data_config, workdir: str | None = None) -> np.ndarray:
  """The mean subtracted from every view: (crop, crop, 3) for 'per_pixel', (3,) for 'per_channel', 0 for 'none'.

  `config.data.mean_rgb`, when set, fixes the per-channel mean (e.g. torchvision's, for its converted weights). A
  computed mean is stored in WORKDIR/pixel_mean.npy, so a resumed run and the evaluator use the same one."""
  kind = data_config.mean
  if kind not in MEAN_TYPES:
    raise ValueError(f'Unknown config.data.mean {kind!r}; valid choices: {", ".join(MEAN_TYPES)}.')
  if kind == 'none':
    return np.zeros((3,), np.float32)
  if kind == 'per_channel' and len(data_config.mean_rgb):
    return np.asarray(data_config.mean_rgb, np.float32)
  path = os.path.join(workdir, 'pixel_mean.npy') if workdir else None
  if path and os.path.exists(path):
    mean = np.load(path)
  else:
    mean = compute_pixel_mean(data_config)
    if path and jax.process_index() == 0:
      np.save(path + '.tmp.npy', mean)
      os.replace(path + '.tmp.npy', path)
  return mean if kind == 'per_pixel' else mean.mean((0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Batched streams.

def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'The batch of {global_batch} is not divisible by the {process_count} hosts.')
  return global_batch // process_count


def train_dataset(config, mean, process_index: int | None = None, process_count: int | None = None,
                  seed_offset: int = 0):
  """An endless tf.data stream of this host's training batches: (float32 (b, crop, crop, 3), int32 (b,)), with
  b = config.batch_size / process_count. Reshuffled every epoch; the last partial batch is dropped. `seed_offset`
  (the resumed step) gives a resumed run a fresh order instead of replaying the first batches."""
  tf = _tf()
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  _check_scale_range(d)
  seed = (config.seed * 1_000_003 + seed_offset) * 1000 + pi  # each host (and each resume) draws its own order
  ds = encoded_dataset(d, 'train', pi, pc, shuffle=not d.cache, seed=seed)
  ds = _cached(ds, d.cache)  # the encoded bytes, read once
  if d.cache or d.source == 'tfds':  # tfds shuffles only its file order; a cache replays one order
    ds = ds.shuffle(d.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  seeds = tf.data.Dataset.random(seed=seed).batch(2)  # one stateless seed per example
  mean_t = tf.constant(mean, tf.float32)
  ds = tf.data.Dataset.zip((ds, seeds)).map(lambda ex, s: (train_view(ex[0], s, d, mean_t), ex[1]),
                                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(local_batch_size(config.batch_size, pc), drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _check_scale_range(d):
  lo, hi = d.scale_range
  if not 0 < lo <= hi or lo < d.image_size:
    raise ValueError(f'config.data.scale_range={tuple(d.scale_range)} must satisfy image_size ({d.image_size}) <= '
                     'min <= max.')


def eval_batches(config, mean, protocol: str, batch_size: int, split: str = 'val', process_index: int | None = None,
                 process_count: int | None = None, limit: int = 0):
  """This host's evaluation batches as numpy dicts {'images', 'labels', 'mask'}; every image of the split appears
  in exactly one host's stream exactly once, padded batches carry mask 0. All hosts yield the same number of
  batches (so a multi-host evaluation steps in lockstep). 'multiscale' yields one image per batch, with one
  'images_<size>' entry per scale."""
  tf = _tf()
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown test protocol {protocol!r}; valid choices: {", ".join(PROTOCOLS)}.')
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if d.eval_resize < d.image_size:
    raise ValueError(f'config.data.eval_resize={d.eval_resize} is smaller than the crop image_size={d.image_size}.')
  total = split_info(d, split).num_examples
  if limit:
    total = min(total, limit)
  per_host = -(-total // pc)
  if protocol == 'multiscale':
    batch_size = 1
  num_batches = -(-per_host // batch_size)
  mean_t = tf.constant(mean, tf.float32)
  ds = encoded_dataset(d, split, pi, pc, limit=limit)
  ds = ds.map(lambda b, y: (eval_view(b, d, mean_t, protocol), y), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  n = 0
  for images, labels in ds.as_numpy_iterator():
    yield _padded(images, labels, batch_size, protocol, d)
    n += 1
  for _ in range(num_batches - n):  # hosts with a shorter shard pad with empty batches
    yield _padded(None, np.zeros((0,), np.int32), batch_size, protocol, d)


def _padded(images, labels, batch_size, protocol, d):
  k = len(labels)
  out = {'labels': np.pad(labels, (0, batch_size - k)),
         'mask': np.concatenate([np.ones(k, np.float32), np.zeros(batch_size - k, np.float32)])}
  if protocol == 'multiscale':
    if images is None:  # a dummy image of the first scale's square size
      images = tuple(np.zeros((1, s, s, 3), np.float32) for s in d.multiscale_sizes)
    for s, im in zip(d.multiscale_sizes, images):
      out[f'images_{s}'] = im
    return out
  if images is None:
    shape = (d.image_size, d.image_size, 3) if protocol == 'center' else (10, d.image_size, d.image_size, 3)
    images = np.zeros((0,) + shape, np.float32)
  out['images'] = np.pad(images, [(0, batch_size - k)] + [(0, 0)] * (images.ndim - 1))
  return out


def prefetch_to_device(iterator, sharding, size: int = 2):
  """Yields each host-local numpy batch (a tuple or dict of arrays) as global jax Arrays sharded by `sharding`,
  keeping `size` batches in flight so the host-to-device copy overlaps the step."""
  queue = collections.deque()

  def put(batch):
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)

  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
