"""grain streams over a source (data_sources.py): the training batches, the evaluation batches, the mean image.

Determinism. Position p of the training stream is example `order(seed, epoch)[p mod N]` of epoch p // N (grain's
index shuffle, a new permutation every epoch), and its augmentation draws come from a generator seeded with
(seed, epoch, example index). Global batch k is positions [k B, (k + 1) B), each process taking every
process_count-th of them (grain's ElasticIterator). So the batches depend on neither the number of worker
processes nor the number of hosts, and the iterator's whole state is the next position, saved with every
checkpoint: a resumed run reads the batches an uninterrupted one would.
"""
import os
import time

import jax
import numpy as np

from resnet_jax import image_ops
from resnet_jax.errors import ConfigError, DatasetNotFoundError

POSITION_KEY = 'global_next_index'  # grain's ElasticIterator state: the next position of the global stream


def _grain():
  try:
    import grain
  except ImportError as e:
    raise DatasetNotFoundError("The streamed input needs grain: pip install grain (or pip install -e .).") from e
  return grain


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
  offset, int32 label): `image_ops.train_crop`'s parts."""

  def __init__(self, source, data_config, seed: int):
    self.source, self.data_config, self.seed = source, data_config, seed

  def __setstate__(self, state):  # unpickled: in a grain worker process
    self.__dict__.update(state)
    _exit_with_parent()

  def __call__(self, position: int, index: int):
    epoch = position // len(self.source)
    rng = np.random.default_rng([self.seed, epoch, int(index)])
    record = self.source[int(index)]
    return (*image_ops.train_crop(record, rng, self.data_config), np.int32(record['label']))


def train_stream(config, source):
  """The global training stream as a grain MapDataset: position p -> (uint8 view, noise, label) (see the module's
  doc)."""
  grain = _grain()
  seed = config.seed % 2**32
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()  # a new permutation every epoch
  return ds.map_with_index(TrainView(source, config.data, seed))


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ConfigError(f'The batch of {global_batch} is not divisible by the {process_count} hosts.')
  return global_batch // process_count


def train_iterator(config, source, position: int = 0, process_index: int | None = None,
                   process_count: int | None = None):
  """This process's training batches (uint8 (b, crop, crop, 3) views, float32 (b, 3) colour-noise offsets, int32
  (b,) labels; `image_ops.finish` makes the float32 inputs), b = batch_size / process_count, from global stream position
  `position` (a multiple of batch_size at a step boundary). `get_state()` gives the position after the last batch
  taken."""
  grain = _grain()
  d = config.data
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
    return image_ops.eval_view(record, self.data_config, self.mean, self.protocol), np.int32(record['label'])


def eval_batches(config, source, mean, protocol: str, batch_size: int, limit: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
  """This process's evaluation batches as numpy dicts {'images', 'labels', 'mask'}: the split cut into batches of
  `batch_size` in file order, dealt round the processes; the last padded (mask 0), and processes with one batch
  fewer end with an empty one, so all step in lockstep. 'multiscale' yields one image per batch, with one
  'images_<size>' entry per scale."""
  grain = _grain()
  if protocol not in image_ops.PROTOCOLS:
    raise ConfigError(f'Unknown test protocol {protocol!r}; valid choices: {", ".join(image_ops.PROTOCOLS)}.')
  d = config.data
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
    return image_ops.center_view(self.source[int(self.indices[j])], self.data_config)


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
