"""The ImageNet input pipeline of Sec. 3.4, streamed from disk through grain (the dataset does not fit in memory).

Sources (`config.data.source`), each a random-access list of (encoded image, label):
  'folder'  DIR/train/<class>/*.JPEG and DIR/val/<class>/* (any JPEG/PNG/BMP/GIF); classes are the sorted
            sub-folder names of DIR/train.
  'tfds'    tensorflow-datasets `imagenet2012` prepared as ArrayRecord (`_tfds_help` says how), read with
            `tfds.data_source`: random access without TensorFlow.

Training view (each step a named `config.data` option; the defaults are the paper's):
  decode -> shorter side resized to a random integer in `scale_range` ([256, 480], "scale augmentation" [41])
  -> random `image_size` (224) crop -> random horizontal flip (`random_flip`) -> AlexNet PCA colour noise with the
  standard ImageNet eigenvalues/eigenvectors (`lighting_std`, 0.1) -> mean subtraction (`mean`: 'per_pixel', the
  paper's "per-pixel mean subtracted"; or 'per_channel'; or 'none'). The host does everything up to the flip and
  draws the colour noise; the training step adds the noise and subtracts the mean on the device (`finish`).
Test views (Sec. 3.4): 'center' (the 224 centre crop of the image resized to `eval_resize` = 256), '10crop' (four
  corners and centre of that image and their flips) and 'multiscale' (the whole image, shorter side in
  `multiscale_sizes`, for the fully-convolutional evaluation in evaluate.py).

Determinism. Position p of the training stream is example `order(seed, epoch)[p mod N]` of epoch p // N (grain's
index shuffle, a new permutation every epoch), and its augmentation draws come from a generator seeded with
(seed, epoch, example index). Global batch k is positions [k B, (k + 1) B), each process taking every
process_count-th of them (grain's ElasticIterator). So the batches depend on neither the number of worker
processes nor the number of hosts, and the iterator's whole state is the next position, saved with every
checkpoint: a resumed run reads the batches an uninterrupted one would.

A file that cannot be decoded stops the run with its name (the run resumes from its last checkpoint once the file
is replaced or removed): skipping it would change every later batch, and ImageNet has no corrupt files.
"""
import collections
import io
import os
import time

import jax
import numpy as np
from PIL import Image

from resnet_jax.data import DatasetNotFoundError

SOURCES = ('tfds', 'folder')
MEAN_TYPES = ('per_pixel', 'per_channel', 'none')
PROTOCOLS = ('center', '10crop', 'multiscale')
FOLDER_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif')
SPLITS = {'train': ('train', 'train'), 'val': ('validation', 'val')}  # ours -> (tfds name, folder name)
POSITION_KEY = 'global_next_index'  # grain's ElasticIterator state: the next position of the global stream

# AlexNet's PCA colour augmentation: eigen-decomposition of the covariance of ImageNet RGB pixels scaled to [0, 1]
# (the values used by fb.resnet.torch, which the authors pointed to). Columns of IMAGENET_EIGVEC are eigenvectors.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float32)


class CorruptImageError(ValueError):
  """An image of the dataset cannot be decoded; the message names it."""


def _grain():
  try:
    import grain
  except ImportError as e:
    raise DatasetNotFoundError("The streamed input needs grain: pip install grain (or pip install -e .).") from e
  return grain


# ---------------------------------------------------------------------------------------------------------------
# Sources: random access to {'image': encoded bytes, 'label': int, 'name': str}.

def _tfds_help(data_dir: str) -> str:
  root = data_dir or '~/tensorflow_datasets'
  return (f'imagenet2012 is not prepared as ArrayRecord under {root}. tensorflow-datasets cannot download ImageNet: '
          'register at image-net.org, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, put both in '
          f'{os.path.join(root, "downloads", "manual")}/ and run once (hours, ~300 GB of disk; needs '
          "pip install -e '.[tfds]'):\n"
          f'  tfds build imagenet2012 --data_dir={root} --file_format=array_record\n'
          'Or use an image folder: --config.data.source=folder --config.data.data_dir=DIR with '
          'DIR/train/<class>/*.JPEG and DIR/val/<class>/*.')


def _folder_help(root: str) -> str:
  return (f'Expected an ImageNet-style image folder at {root!r}: {root}/train/<class>/*.JPEG and '
          f'{root}/val/<class>/* (classes = sub-folder names, sorted). Or use --config.data.source=tfds.')


def list_folder(root: str, split: str):
  """(paths, labels, class_names) of DIR/<split>/<class>/*, classes named by the train split's folders. Every
  class must have training images; a class may have no validation images."""
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
  paths, labels, empty = [], [], []
  for label, c in enumerate(classes):
    cdir = os.path.join(d, c)
    files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(FOLDER_EXTENSIONS)) if os.path.isdir(cdir) else []
    if not files:
      empty.append(c)
    paths += [os.path.join(cdir, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise DatasetNotFoundError(f'No images (*{", *".join(FOLDER_EXTENSIONS)}) under {d}/<class>/. '
                               + _folder_help(root))
  if split == 'train' and empty:
    raise ValueError(f'{len(empty)} class folder(s) of {d} hold no images (*{", *".join(FOLDER_EXTENSIONS)}): '
                     f'{empty[:5]}{" ..." if len(empty) > 5 else ""}. Every class needs training images: add them, '
                     'or remove the empty folders (the classes are the folder names, so that renumbers the labels).')
  return paths, np.asarray(labels, np.int32), classes


class FolderSource:
  """One split of an image folder: element i is the i-th file of the sorted class folders."""

  def __init__(self, root: str, split: str):
    self.paths, self.labels, self.class_names = list_folder(root, split)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[i]), 'name': self.paths[i]}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetNotFoundError('config.data.source=tfds needs tensorflow-datasets: pip install tensorflow-datasets '
                               "(or pip install -e '.[tfds]').") from e
  return tfds


class TfdsSource:
  """One split of a tfds dataset prepared as ArrayRecord, through `tfds.data_source` (no TensorFlow); the images
  stay encoded. Opened lazily, so that grain's worker processes each open their own reader."""

  def __init__(self, data_config, split: str):
    tfds = _import_tfds()
    self._dataset, self._data_dir, self._split = data_config.dataset, data_config.data_dir or None, SPLITS[split][0]
    builder = tfds.builder(self._dataset, data_dir=self._data_dir)
    if not builder.is_prepared():
      raise DatasetNotFoundError(_tfds_help(data_config.data_dir))
    if 'array_record' not in str(builder.info.file_format).lower():
      raise DatasetNotFoundError(f'{self._dataset} under {data_config.data_dir or "~/tensorflow_datasets"} is '
                                 f'prepared as {builder.info.file_format}, not ArrayRecord (random access). '
                                 + _tfds_help(data_config.data_dir))
    self.class_names = list(builder.info.features['label'].names)
    self._length = builder.info.splits[self._split].num_examples
    self._source = None

  def _open(self):
    if self._source is None:
      tfds = _import_tfds()
      self._source = tfds.data_source(self._dataset, split=self._split, data_dir=self._data_dir, download=False,
                                      decoders={'image': tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def __len__(self):
    return self._length

  def __getitem__(self, i):
    ex = self._open()[i]
    name = ex.get('file_name', b'')
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {'image': ex['image'], 'label': int(ex['label']), 'name': f'{self._split}[{i}] {name}'.strip()}


def source(data_config, split: str):
  """The source of `split` ('train' | 'val') that `config.data` names."""
  if data_config.source not in SOURCES:
    raise ValueError(f'Unknown streaming data source {data_config.source!r}; valid choices: {", ".join(SOURCES)}.')
  if data_config.source == 'folder':
    return FolderSource(data_config.data_dir, split)
  return TfdsSource(data_config, split)


# ---------------------------------------------------------------------------------------------------------------
# Image operations (numpy and Pillow).

def open_image(record) -> Image.Image:
  """The image of a source record, not yet decoded (its size is known); CorruptImageError if unreadable."""
  try:
    return Image.open(io.BytesIO(record['image']))
  except Exception as e:
    raise _corrupt(record, e) from e


def decode(record, image: Image.Image | None = None, draft_size=None) -> Image.Image:
  """The decoded RGB image of a record (grey, palette and CMYK become RGB). `draft_size` (w, h) lets the JPEG
  decoder downscale by 2, 4 or 8 in the DCT domain while staying at least that large."""
  try:
    image = open_image(record) if image is None else image
    if draft_size is not None:
      image.draft('RGB', draft_size)
    return image.convert('RGB')
  except CorruptImageError:
    raise
  except Exception as e:
    raise _corrupt(record, e) from e


def _corrupt(record, e) -> CorruptImageError:
  return CorruptImageError(
      f'Cannot decode the image {record["name"]} ({type(e).__name__}: {e}). Replace or remove that file, then run '
      'the same command again: the run resumes from its last checkpoint.')


def resized_shape(height: int, width: int, shorter: int) -> tuple:
  """(h, w) with the shorter side `shorter` and the aspect ratio kept (the longer side rounded)."""
  if height <= width:
    return shorter, max(shorter, int(np.floor(width * shorter / height + 0.5)))
  return max(shorter, int(np.floor(height * shorter / width + 0.5))), shorter


def resized_window(image: Image.Image, height: int, width: int, top: int, left: int, out_h: int, out_w: int):
  """uint8 (out_h, out_w, 3): the window at (top, left) of `image` resized to (height, width), computed from the
  matching region of `image` only (Pillow's resize box; bilinear, antialiased when shrinking): the pixels of
  resizing the whole image and cropping, up to Pillow's rounding between its two passes (a rare pixel off by 1 or
  2 levels). `image` may be a DCT-downscaled draft of the original."""
  sy, sx = image.height / height, image.width / width
  box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
  return np.asarray(image.resize((out_w, out_h), Image.BILINEAR, box=box))


def resize_shorter(image: Image.Image, shorter: int) -> np.ndarray:
  """uint8 image with its shorter side resized to `shorter` (bilinear, antialiased when shrinking)."""
  h, w = resized_shape(image.height, image.width, shorter)
  return resized_window(image, h, w, 0, 0, h, w)


def lighting_noise(alpha: np.ndarray) -> np.ndarray:
  """AlexNet's PCA colour noise in 0..255 pixel units for draws `alpha` ~ N(0, std): eigvec @ (alpha * eigval)."""
  return (IMAGENET_EIGVEC @ (np.asarray(alpha, np.float32) * IMAGENET_EIGVAL) * 255.0).astype(np.float32)


def train_draws(rng: np.random.Generator, height: int, width: int, data_config) -> dict:
  """The random choices of one training view: shorter side, crop window, flip, colour-noise weights."""
  lo, hi = data_config.scale_range
  crop = data_config.image_size
  shorter = int(rng.integers(lo, hi + 1))
  nh, nw = resized_shape(height, width, shorter)
  return {'shorter': shorter, 'size': (nh, nw), 'top': int(rng.integers(0, nh - crop + 1)),
          'left': int(rng.integers(0, nw - crop + 1)), 'flip': bool(rng.random() < 0.5),
          'alpha': rng.normal(0.0, 1.0, 3).astype(np.float32)}


def train_crop(record, rng: np.random.Generator, data_config):
  """One training example as the host prepares it: the uint8 (crop, crop, 3) view (scale augmentation, crop, flip)
  and its float32 (3,) colour-noise offset. `finish` adds the offset and subtracts the mean, on the device in
  training (a quarter of the bytes to copy, and no float work on the host)."""
  crop = data_config.image_size
  image = open_image(record)
  w = train_draws(rng, image.height, image.width, data_config)
  nh, nw = w['size']
  draft = (nw, nh) if data_config.jpeg_dct_scaling else None
  x = resized_window(decode(record, image, draft), nh, nw, w['top'], w['left'], crop, crop)
  if data_config.random_flip and w['flip']:
    x = x[:, ::-1]
  noise = (lighting_noise(w['alpha'] * data_config.lighting_std) if data_config.lighting_std
           else np.zeros((3,), np.float32))
  return np.ascontiguousarray(x), noise


def finish(images, noise, mean, xp=np):
  """float32 training views from `train_crop`'s parts: uint8 images (..., H, W, 3) plus their colour-noise offsets
  (..., 3), minus the mean; `xp` is numpy on the host or jax.numpy inside the step."""
  return images.astype(xp.float32) + noise[..., None, None, :] - mean


def train_view(record, rng: np.random.Generator, data_config, mean) -> np.ndarray:
  """One training example (float32 (crop, crop, 3)): scale augmentation, crop, flip, colour noise, mean."""
  return finish(*train_crop(record, rng, data_config), np.asarray(mean, np.float32))


def ten_crops(image: np.ndarray, crop: int) -> np.ndarray:
  """The ten views of Sec. 3.4 / AlexNet: top-left, top-right, bottom-left, bottom-right, centre, then the same
  five flipped left-right. (10, crop, crop, C)."""
  h, w = image.shape[:2]
  ct, cl = (h - crop) // 2, (w - crop) // 2
  views = [image[t:t + crop, l:l + crop] for t, l in ((0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop),
                                                       (ct, cl))]
  return np.stack(views + [v[:, ::-1] for v in views])


def center_view(record, data_config) -> np.ndarray:
  """uint8 (crop, crop, 3): the centre crop of the image with its shorter side resized to `eval_resize`."""
  crop = data_config.image_size
  image = open_image(record)
  nh, nw = resized_shape(image.height, image.width, data_config.eval_resize)
  draft = (nw, nh) if data_config.jpeg_dct_scaling else None
  return resized_window(decode(record, image, draft), nh, nw, (nh - crop) // 2, (nw - crop) // 2, crop, crop)


def eval_view(record, data_config, mean, protocol: str):
  """'center': (crop, crop, 3); '10crop': (10, crop, crop, 3); 'multiscale': a tuple of whole images, one per size
  in `multiscale_sizes`. float32, mean subtracted (the per-pixel mean as its channel average for whole images)."""
  if protocol == 'center':
    return center_view(record, data_config).astype(np.float32) - mean
  image = decode(record)
  if protocol == 'multiscale':
    channel_mean = np.reshape(mean, (-1, 3)).mean(0)
    return tuple(resize_shorter(image, s).astype(np.float32) - channel_mean for s in data_config.multiscale_sizes)
  x = resize_shorter(image, data_config.eval_resize).astype(np.float32)
  return ten_crops(x, data_config.image_size) - mean  # the (per-pixel) mean subtracted from each view


# ---------------------------------------------------------------------------------------------------------------
# grain pipelines.

def check_data_config(d) -> None:
  """The streamed input's options, checked before any file is read (the source is checked by `source`)."""
  lo, hi = d.scale_range
  if not 0 < lo <= hi or lo < d.image_size:
    raise ValueError(f'config.data.scale_range={tuple(d.scale_range)} must satisfy image_size ({d.image_size}) <= '
                     'min <= max.')
  if d.eval_resize < d.image_size:
    raise ValueError(f'config.data.eval_resize={d.eval_resize} is smaller than the crop image_size={d.image_size}.')
  if d.workers < 0 or d.read_threads < 0:
    raise ValueError(f'config.data.workers={d.workers} and config.data.read_threads={d.read_threads} must be >= 0.')


def read_threads(d) -> int:
  """Threads decoding in each process (Pillow releases the GIL while it decodes and resizes): config.data.
  read_threads, or 0 for one per core."""
  return d.read_threads or os.cpu_count() or 1


_WATCHING_PARENT = []


def _exit_with_parent() -> None:
  """In a grain worker process: exit as soon as the process that started it is gone. A training process killed
  with SIGKILL runs no clean-up, and its workers would otherwise live on, holding memory and cores."""
  import multiprocessing
  import threading
  if _WATCHING_PARENT or multiprocessing.parent_process() is None:
    return  # watching already, or not a worker: a training process whose shell goes away must not stop
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)
  _WATCHING_PARENT.append(threading.Thread(target=watch, daemon=True, name='exit_with_parent'))
  _WATCHING_PARENT[0].start()


class TrainView:
  """Position p of the shuffled, repeated index stream (example `index`) -> (uint8 view, float32 colour-noise
  offset, int32 label): `train_crop`'s parts."""

  def __init__(self, source, data_config, seed: int):
    self.source, self.data_config, self.seed = source, data_config, seed

  def __setstate__(self, state):  # unpickled: in a grain worker process
    self.__dict__.update(state)
    _exit_with_parent()

  def __call__(self, position: int, index: int):
    epoch = position // len(self.source)
    rng = np.random.default_rng([self.seed, epoch, int(index)])
    record = self.source[int(index)]
    return (*train_crop(record, rng, self.data_config), np.int32(record['label']))


def train_stream(config, source):
  """The global training stream as a grain MapDataset: position p -> (uint8 view, noise, label) (see the module's
  doc)."""
  grain = _grain()
  seed = config.seed % 2**32
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()  # a new permutation every epoch
  return ds.map_with_index(TrainView(source, config.data, seed))


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'The batch of {global_batch} is not divisible by the {process_count} hosts.')
  return global_batch // process_count


def train_iterator(config, source, position: int = 0, process_index: int | None = None,
                   process_count: int | None = None):
  """This process's training batches (uint8 (b, crop, crop, 3) views, float32 (b, 3) colour-noise offsets, int32
  (b,) labels; `finish` makes the float32 inputs), b = batch_size / process_count, from global stream position
  `position` (a multiple of batch_size at a step boundary). `get_state()` gives the position after the last batch
  taken."""
  grain = _grain()
  d = config.data
  check_data_config(d)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local_batch_size(config.batch_size, pc)
  if d.workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a notebook or a test has parsed none
      flags.FLAGS.mark_as_parsed()
  it = grain.experimental.ElasticIterator(
      train_stream(config, source), config.batch_size, grain.sharding.ShardOptions(pi, pc),
      # The elements here are whole batches: each thread prepares one, and as many are buffered.
      read_options=grain.ReadOptions(num_threads=read_threads(d), prefetch_buffer_size=read_threads(d)),
      multiprocessing_options=grain.MultiprocessingOptions(num_workers=d.workers) if d.workers else None)
  it = iter(it)
  it.set_state({POSITION_KEY: int(position)})
  return it


class _EvalView:
  def __init__(self, source, data_config, mean, protocol):
    self.source, self.data_config, self.mean, self.protocol = source, data_config, mean, protocol

  def __call__(self, index: int):
    record = self.source[int(index)]
    return eval_view(record, self.data_config, self.mean, self.protocol), np.int32(record['label'])


def eval_batches(config, source, mean, protocol: str, batch_size: int, limit: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
  """This process's evaluation batches as numpy dicts {'images', 'labels', 'mask'}: the split cut into batches of
  `batch_size` in file order, dealt round the processes; the last padded (mask 0), and processes with one batch
  fewer end with an empty one, so all step in lockstep. 'multiscale' yields one image per batch, with one
  'images_<size>' entry per scale."""
  grain = _grain()
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown test protocol {protocol!r}; valid choices: {", ".join(PROTOCOLS)}.')
  d = config.data
  check_data_config(d)
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n = min(len(source), limit) if limit else len(source)
  if protocol == 'multiscale':
    batch_size = 1
  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(n).map(_EvalView(source, d, np.asarray(mean, np.float32), protocol))
  mine = ds.batch(batch_size)[pi::pc]
  count = 0
  for images, labels in mine.to_iter_dataset(grain.ReadOptions(num_threads=read_threads(d))):
    yield _padded(images, labels, batch_size, protocol, d)
    count += 1
  for _ in range(-(-num_batches // pc) - count):
    yield _padded(None, np.zeros((0,), np.int32), batch_size, protocol, d)


def _padded(images, labels, batch_size, protocol, d):
  k = len(labels)
  out = {'labels': np.pad(labels, (0, batch_size - k)),
         'mask': np.concatenate([np.ones(k, np.float32), np.zeros(batch_size - k, np.float32)])}
  if protocol == 'multiscale':
    if images is None:  # a dummy image of each scale's square size
      images = tuple(np.zeros((1, s, s, 3), np.float32) for s in d.multiscale_sizes)
    for s, im in zip(d.multiscale_sizes, images):
      out[f'images_{s}'] = im
    return out
  if images is None:
    shape = (d.image_size, d.image_size, 3) if protocol == 'center' else (10, d.image_size, d.image_size, 3)
    images = np.zeros((0,) + shape, np.float32)
  out['images'] = np.pad(images, [(0, batch_size - k)] + [(0, 0)] * (images.ndim - 1))
  return out


# ---------------------------------------------------------------------------------------------------------------
# The mean image (Sec. 3.4, "per-pixel mean subtracted").

def mean_sample(num_train: int, num_examples: int) -> np.ndarray:
  """The training examples the mean is estimated from: `num_examples` drawn uniformly without replacement from
  the whole split (0 or more than the split: all), in file order."""
  if not num_examples or num_examples >= num_train:
    return np.arange(num_train)
  return np.sort(np.random.default_rng(0).choice(num_train, num_examples, replace=False))


class _CenterView:
  def __init__(self, source, data_config, indices):
    self.source, self.data_config, self.indices = source, data_config, indices

  def __call__(self, j: int):
    return center_view(self.source[int(self.indices[j])], self.data_config)


def compute_pixel_mean(data_config, source, num_examples: int | None = None) -> np.ndarray:
  """The per-pixel mean (crop, crop, 3) of the centre views (shorter side `eval_resize`, centre `image_size` crop)
  of `config.data.mean_examples` training images sampled uniformly (0 = all), float64-accumulated; each process
  reads its share and the sums are added over processes."""
  grain = _grain()
  n = data_config.mean_examples if num_examples is None else num_examples
  mine = mean_sample(len(source), n)[jax.process_index()::jax.process_count()]
  crop = data_config.image_size
  total, count = np.zeros((crop, crop, 3), np.float64), np.zeros((), np.float64)
  if len(mine):
    ds = grain.MapDataset.range(len(mine)).map(_CenterView(source, data_config, mine)).batch(64)
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads(data_config))):
      total += batch.sum(0, dtype=np.float64)
      count += len(batch)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = np.sum(multihost_utils.process_allgather(total), 0)
    count = np.sum(multihost_utils.process_allgather(count))
  return (total / count).astype(np.float32)


def input_mean(data_config, source, workdir: str | None = None) -> np.ndarray:
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
    mean = compute_pixel_mean(data_config, source)
    if path and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      np.save(path + '.tmp.npy', mean)
      os.replace(path + '.tmp.npy', path)
  return mean if kind == 'per_pixel' else mean.mean((0, 1))


# ---------------------------------------------------------------------------------------------------------------
# To the devices.

def prefetch_to_device(iterator, sharding, size: int = 2, tag=None):
  """Yields each host-local numpy batch (a tuple or dict of arrays) as global jax Arrays sharded by `sharding`,
  keeping `size` batches in flight so the host-to-device copy overlaps the step. With `tag`, yields (batch,
  tag()) pairs, `tag()` read right after the batch was taken from `iterator` (e.g. the iterator's position)."""
  queue = collections.deque()

  def put(batch):
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch)

  for batch in iterator:
    queue.append(put(batch) if tag is None else (put(batch), tag()))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
