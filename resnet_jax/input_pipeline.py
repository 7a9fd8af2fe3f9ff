"""The one input interface the training loop, the evaluator and the tools see (`Input`), and its two implementations.

InMemoryInput (CIFAR, digits; data.py): the whole training set lives on the devices as uint8; the step draws its
batch from the epoch's permutation and augments it on the device (augment.py), so a step needs no host work.

StreamedInput (ImageNet; data_sources.py, image_ops.py, streams.py): batches are decoded, scaled, cropped and flipped
on the host by a grain pipeline, each process reading its share, and fed to the devices a few steps ahead as uint8;
the step adds each view's colour noise and subtracts the mean image.

Both record what they train on (`iterator_state()`: the number of training examples, the class names, and for the
in-memory sets a SHA-256 of every training image and label; the streamed input adds its stream position). The
trainer saves it with each checkpoint and hands it back to `train_inputs`, which refuses a checkpoint of other data.
"""
import collections
import hashlib
import itertools
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import augment, data, mesh as mesh_lib
from resnet_jax.errors import DataError


class Input(Protocol):
  """What an input gives the training loop, the evaluator and BN recalibration."""

  # What the data is.
  image_shape: tuple
  num_classes: int
  class_names: list
  num_train_examples: int
  description: str
  input_shardings: tuple   # how each of the step's input arrays is placed (NamedShardings)

  @property
  def mean(self) -> np.ndarray:
    """The mean image subtracted from every view."""

  def split_sizes(self) -> dict:
    """{'train': N, 'val': n, 'test': m}: the examples of the training split and of each held-out one."""

  # The step's inputs.
  def train_inputs(self, start_step: int, iterator_state: dict | None = None) -> Iterator[tuple]:
    """Per step from `start_step` on, the arrays the jitted step takes after the state. `iterator_state` (from the
    checkpoint being resumed) is checked against this data and continued from."""

  def device_batch(self, step, *inputs, seed):
    """Traced inside the step: the batch (x, y) of `step` for the replica of `seed` (which decides the data order
    and augmentation where the input draws them on the device)."""

  def iterator_state(self) -> dict:
    """What a checkpoint records of the input after the last step taken: the data's identity (and the stream
    position where there is one)."""

  # Held-out splits and training views on the host.
  def eval_splits(self) -> tuple:
    """The held-out splits: ('test',), ('val',), both or none."""

  def eval_batches(self, split: str, protocol: str = 'center', batch_size: int = 0, limit: int = 0) -> Iterator[dict]:
    """This process's padded batches {'images', 'labels', 'mask'} of `split`, every example once."""

  def training_batches(self, num_batches: int, batch_size: int) -> Iterator[np.ndarray]:
    """`num_batches` float32 batches of augmented training views, as the step sees them (BN recalibration)."""

  def close(self) -> None:
    """Stops whatever reads ahead (threads, worker processes)."""


def create(config, mesh, workdir: str | None = None) -> Input:
  """The input `config.data` describes, checked against the config (classes, batch) before anything is written."""
  inp = StreamedInput(config, mesh, workdir) if config.data.streaming else InMemoryInput(config, mesh)
  if inp.num_classes != config.model.num_classes:
    raise DataError(f'The dataset has {inp.num_classes} classes but config.model.num_classes='
                    f'{config.model.num_classes}.')
  if inp.num_train_examples < config.batch_size:
    raise DataError(f'The training split has {inp.num_train_examples} examples, fewer than config.batch_size='
                    f'{config.batch_size}.')
  return inp


def check_same_data(saved: dict | None, current: dict) -> None:
  """Raises ValueError naming what differs when a checkpoint's record of its data (`saved`, from
  `iterator_state()`) is not this input's (`current`): the classes, the number of training examples, the
  training images' fingerprint. A checkpoint written before such records were kept is not checked."""
  if not saved:
    return
  diffs = []
  old, new = list(saved.get('class_names', current['class_names'])), current['class_names']
  if old != new:
    gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
    diffs.append(f'{len(old)} classes, here {len(new)} (missing here: {gone[:5]}{" ..." if len(gone) > 5 else ""}; '
                 f'new here: {added[:5]}{" ..." if len(added) > 5 else ""}'
                 f'{"; same names in another order" if not gone and not added else ""})')
  if saved.get('num_examples', current['num_examples']) != current['num_examples']:
    diffs.append(f'{saved["num_examples"]} training examples, here {current["num_examples"]}')
  if saved.get('fingerprint', current.get('fingerprint')) != current.get('fingerprint'):
    diffs.append('training images or labels with another SHA-256 (same count and classes, other content)')
  if diffs:
    raise DataError('The checkpoint was trained on other data: ' + '; '.join(diffs) + '. Point config.data at the '
                    'dataset the run was trained on (it may live in another directory), or use another --workdir.')


def batch_indices(config, num_examples: int, step, seed):
  """The indices of `step`'s batch: epochs are reshuffled from `seed` (a traced value under vmap); the last
  partial batch of an epoch is skipped (as a data loader with drop_last), so every batch has exactly
  config.batch_size examples."""
  steps_per_epoch = num_examples // config.batch_size
  epoch, within = step // steps_per_epoch, step % steps_per_epoch
  data_key = jax.random.fold_in(jax.random.key(seed), 1)
  perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, within * config.batch_size, config.batch_size)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
  """SHA-256 of the images' and labels' bytes (and shapes): the same data gives the same digest wherever it lives."""
  h = hashlib.sha256(f'{images.shape}|{images.dtype.str}|{labels.shape}|{labels.dtype.str}|'.encode())
  h.update(np.ascontiguousarray(images).data)
  h.update(np.ascontiguousarray(labels).data)
  return h.hexdigest()


class InMemoryInput:
  def __init__(self, config, mesh, dataset: data.Dataset | None = None):
    ds = data.load(config.data) if dataset is None else dataset
    self._config, self._mesh, self._ds = config, mesh, ds
    self.image_shape = ds.train_images.shape[1:]
    self.class_names = list(ds.class_names)
    self.num_classes = ds.num_classes
    self.num_train_examples = len(ds.train_labels)
    self.mean = augment.pixel_mean(ds.train_images)
    self.description = f'{self.num_train_examples} images of {config.data.dataset}'
    self._splits = {name: (images, labels) for name, images, labels in
                    (('val', ds.val_images, ds.val_labels), ('test', ds.test_images, ds.test_labels))
                    if images is not None}
    replicated = mesh_lib.replicated(mesh)
    self.input_shardings = (replicated, replicated, replicated)
    self._batch_sharding = mesh_lib.batch_sharding(mesh)
    self._resident = None
    self._identity = {'num_examples': self.num_train_examples, 'class_names': self.class_names,
                      'fingerprint': fingerprint(ds.train_images, ds.train_labels)}

  def split_sizes(self) -> dict:
    return {'train': self.num_train_examples, **{s: len(labels) for s, (_, labels) in self._splits.items()}}

  def train_inputs(self, start_step: int, iterator_state: dict | None = None):
    check_same_data(iterator_state, self._identity)
    if self._resident is None:  # placed once, on first use: the training set, its labels and the mean image
      sharding = self.input_shardings[0]
      self._resident = tuple(jax.device_put(a, sharding)
                             for a in (self._ds.train_images, self._ds.train_labels, self.mean))
    return itertools.repeat(self._resident)

  def iterator_state(self) -> dict:
    return dict(self._identity)  # batch k is a function of (seed, k): the step is the rest of the state

  def close(self) -> None:
    pass

  def device_batch(self, step, images, labels, mean, *, seed):
    """The batch of `step` for the replica of `seed`: indices from the epoch's permutation, cropped and flipped on
    the device (each device gathers and augments its own slice of the batch)."""
    config = self._config
    idx = jax.lax.with_sharding_constraint(batch_indices(config, images.shape[0], step, seed), self._batch_sharding)
    aug_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
    return augment.train_view(aug_key, images[idx], mean, config.data.pad, config.data.random_flip), labels[idx]

  def training_batches(self, num_batches: int, batch_size: int):
    """The first `num_batches` training batches of seed config.seed, augmented as in the step (batch_size must
    be config.batch_size: the data order is drawn per batch of that size)."""
    if batch_size != self._config.batch_size:
      raise ValueError(f'The in-memory input draws batches of config.batch_size={self._config.batch_size}, not '
                       f'{batch_size}.')
    inputs = next(self.train_inputs(0))
    batch = jax.jit(lambda step, *a: self.device_batch(step, *a, seed=self._config.seed)[0])
    for step in range(num_batches):
      yield np.asarray(batch(step, *inputs))

  def eval_splits(self) -> tuple:
    return tuple(self._splits)

  def eval_batches(self, split: str, protocol: str = 'center', batch_size: int = 0, limit: int = 0):
    if protocol != 'center':
      raise ValueError(f'The in-memory datasets are tested on the single original view (protocol center), not '
                       f'{protocol!r}.')
    images, labels = self._splits[split]
    if limit:
      images, labels = images[:limit], labels[:limit]
    yield from padded_batches(images, labels, batch_size or self._config.eval_batch_size,
                              lambda x: augment.normalize(x, self.mean))


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, prepare=lambda x: x):
  """This process's share of the split as {'images', 'labels', 'mask'} batches of `batch_size`: the split is cut
  into batches, the last padded (mask 0), and the batches dealt round the processes. `prepare` maps the images of
  a batch (e.g. mean subtraction) on the host."""
  n, pi, pc = len(labels), jax.process_index(), jax.process_count()
  for b, start in enumerate(range(0, n, batch_size)):
    if b % pc != pi:
      continue
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    k, pad = len(y), batch_size - len(y)
    yield {'images': np.asarray(prepare(np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]))),
           'labels': np.concatenate([y, np.zeros((pad,), y.dtype)]),
           'mask': np.concatenate([np.ones(k, np.float32), np.zeros(pad, np.float32)])}


class StreamedInput:
  def __init__(self, config, mesh, workdir: str | None = None):
    from resnet_jax import data_sources, image_ops, streams  # Pillow and grain: only for streamed data
    self._ops, self._streams = image_ops, streams
    self._config, self._mesh = config, mesh
    self._train = data_sources.streamed_source(config.data, 'train')
    self.class_names = list(self._train.class_names)
    self.num_classes = len(self.class_names)
    self.num_train_examples = len(self._train)
    size = config.data.image_size
    self.image_shape = (size, size, 3)
    try:
      self._val = data_sources.streamed_source(config.data, 'val')
    except data_sources.DatasetNotFoundError:
      self._val = None
    self._workdir = workdir
    self._mean = None
    self._position = None
    self._host = None
    self.description = f'{self.num_train_examples} images of {config.data.dataset} (streamed)'
    batch = mesh_lib.batch_sharding(mesh)
    # uint8 views, their colour-noise offsets and labels, a batch a step; the mean image, placed once.
    self.input_shardings = (batch, batch, batch, mesh_lib.replicated(mesh))
    self._mean_on_devices = None

  @property
  def mean(self) -> np.ndarray:
    if self._mean is None:  # read from the workdir when a run saved it, else computed (and saved) once
      self._mean = self._streams.input_mean(self._config.data, self._train, self._workdir)
    return self._mean

  def split_sizes(self) -> dict:
    return {'train': self.num_train_examples, **({'val': len(self._val)} if self._val is not None else {})}

  def _identity(self) -> dict:
    return {'num_examples': self.num_train_examples, 'class_names': self.class_names}

  def _host_batches(self, position: int):
    """This process's share of each training batch from stream `position` on, as numpy (uint8 images, colour-noise
    offsets, labels); its `get_state()` is the stream position after the last batch taken."""
    return self._streams.train_iterator(self._config, self._train, position)

  def train_inputs(self, start_step: int, iterator_state: dict | None = None):
    check_same_data(iterator_state, self._identity())
    # The position saved with the checkpoint; for a checkpoint without one, start_step x batch (the same position:
    # batch k is positions [kB, (k + 1)B)).
    position = int((iterator_state or {}).get(self._streams.POSITION_KEY, start_step * self._config.batch_size))
    host = self._host_batches(position)
    self._host = host
    self._position = host.get_state()[self._streams.POSITION_KEY]
    stream = prefetch_to_device(host, self.input_shardings[0], self._config.data.prefetch_to_device,
                                tag=lambda: host.get_state()[self._streams.POSITION_KEY])
    if self._mean_on_devices is None:
      self._mean_on_devices = jax.device_put(np.asarray(self.mean, np.float32), self.input_shardings[3])

    def inputs():
      for arrays, position in stream:
        self._position = position  # the batch handed to the step: its position is what a checkpoint records
        yield (*arrays, self._mean_on_devices)
    return inputs()

  def iterator_state(self) -> dict:
    """The data's identity, and the stream's position after the last batch the step took (none before a stream
    started)."""
    position = {} if self._position is None else {self._streams.POSITION_KEY: self._position}
    return {**self._identity(), **position}

  def close(self) -> None:
    """Stops the training stream's decoding threads and worker processes."""
    if self._host is not None:
      self._host.close()
      self._host = None

  def device_batch(self, step, images, noise, labels, mean, *, seed):
    """The host-augmented batch with its colour noise added and the mean subtracted; the stream is seeded from
    config.seed (one seed per run: validation.validate)."""
    return self._ops.finish(images, noise, mean, jnp), labels

  def training_batches(self, num_batches: int, batch_size: int):
    """Batches of the training stream from its start, this process's share of each (the stream's batch is
    config.batch_size, split over the processes)."""
    if batch_size != self._config.batch_size:
      raise ValueError(f'The stream reads batches of config.batch_size={self._config.batch_size}, not {batch_size}.')
    stream = self._host_batches(0)
    mean = np.asarray(self.mean, np.float32)
    try:
      for _ in range(num_batches):
        images, noise, _ = next(stream)
        yield self._ops.finish(images, noise, mean)
    finally:
      stream.close()  # stops the decoding threads and worker processes

  def eval_splits(self) -> tuple:
    return ('val',) if self._val is not None else ()

  def eval_batches(self, split: str, protocol: str = 'center', batch_size: int = 0, limit: int = 0):
    source = {'val': self._val, 'train': self._train}[split]
    return self._streams.eval_batches(self._config, source, self.mean, protocol,
                                      batch_size or self._config.eval_batch_size, limit=limit)


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
