"""The one input interface the training loop, the evaluator and the tools see, and its two implementations.

An `Input` answers four questions:
  what the data is     `image_shape`, `num_classes`, `class_names`, `num_train_examples`, `mean`, `description`
  the step's inputs    `train_inputs(start_step)`: an iterator giving, per step from `start_step` on, the arrays the
                       jitted step takes after the state (`input_shardings` says how each is placed), and
                       `device_batch(step, *inputs, seed=)`: traced inside the step, returns the batch (x, y)
                       the update sees; `seed` (traced under vmap when several seeds train together) decides the
                       data order and augmentation. The loop never looks inside.
  where a run resumes  `iterator_state()` goes into each checkpoint (None when the step is the whole state: batch k
                       a function of (seed, k)); `train_inputs(start_step, iterator_state)` continues from it, so
                       a resumed run feeds the batches an uninterrupted one would.
  what to evaluate     `eval_splits()` and `eval_batches(split, protocol, batch_size)`: this process's padded batches
                       {'images', 'labels', 'mask'} of the split, every example once (evaluate.py sums them);
                       `split_sizes()` the number of examples of the training split and of each held-out one.
  when it is done      `close()` stops whatever reads ahead (threads, worker processes).

InMemoryInput (CIFAR, digits; data.py): the whole training set lives on the devices as uint8; the step draws its
batch from the epoch's permutation and augments it on the device (augment.py), so a step needs no host work.

StreamedInput (ImageNet; imagenet_input.py): batches are decoded, scaled, cropped and flipped on the host by a
grain pipeline, each process reading its share, and fed to the devices a few steps ahead as uint8; the step adds each
view's colour noise and subtracts the mean image. Its
`iterator_state()` (the stream position after the batch the step took last) is saved with each checkpoint and given
back to `train_inputs(start_step, iterator_state)` on resume.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import augment, data, train


def create(config, mesh, workdir: str | None = None):
  """The input `config.data` describes, checked against the config (classes, batch) before anything is written."""
  inp = StreamedInput(config, mesh, workdir) if config.data.streaming else InMemoryInput(config, mesh)
  if inp.num_classes != config.model.num_classes:
    raise ValueError(f'The dataset has {inp.num_classes} classes but config.model.num_classes='
                     f'{config.model.num_classes}.')
  if inp.num_train_examples < config.batch_size:
    raise ValueError(f'The training split has {inp.num_train_examples} examples, fewer than config.batch_size='
                     f'{config.batch_size}.')
  return inp


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
    replicated = NamedSharding(mesh, P())
    self.input_shardings = (replicated, replicated, replicated)
    self._batch_sharding = NamedSharding(mesh, train.batch_spec(mesh))
    self._resident = None

  def train_inputs(self, start_step: int, iterator_state: dict | None = None):
    if self._resident is None:  # placed once, on first use: the training set, its labels and the mean image
      sharding = self.input_shardings[0]
      self._resident = tuple(jax.device_put(a, sharding)
                             for a in (self._ds.train_images, self._ds.train_labels, self.mean))
    return itertools.repeat(self._resident)

  def iterator_state(self) -> None:
    return None  # batch k is a function of (seed, k): the step is the whole state

  def close(self) -> None:
    pass

  def device_batch(self, step, images, labels, mean, *, seed):
    """The batch of `step` for the replica of `seed`: indices from the epoch's permutation, cropped and flipped on
    the device (each device gathers and augments its own slice of the batch)."""
    config = self._config
    idx = jax.lax.with_sharding_constraint(train.batch_indices(config, images.shape[0], step, seed),
                                           self._batch_sharding)
    aug_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
    return augment.train_view(aug_key, images[idx], mean, config.data.pad, config.data.random_flip), labels[idx]

  def eval_splits(self) -> tuple:
    return tuple(self._splits)

  def split_sizes(self) -> dict:
    return {'train': self.num_train_examples, **{s: len(labels) for s, (_, labels) in self._splits.items()}}

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
    from resnet_jax import imagenet_input
    self._imagenet = imagenet_input
    self._config, self._mesh = config, mesh
    imagenet_input.check_data_config(config.data)
    self._train = imagenet_input.source(config.data, 'train')
    self.class_names = list(self._train.class_names)
    self.num_classes = len(self.class_names)
    self.num_train_examples = len(self._train)
    size = config.data.image_size
    self.image_shape = (size, size, 3)
    try:
      self._val = imagenet_input.source(config.data, 'val')
    except data.DatasetNotFoundError:
      self._val = None
    self._workdir = workdir
    self._mean = None
    self._position = None
    self._host = None
    self.description = f'{self.num_train_examples} images of {config.data.dataset} (streamed)'
    batch = NamedSharding(mesh, train.batch_spec(mesh))
    # uint8 views, their colour-noise offsets and labels, a batch a step; the mean image, placed once.
    self.input_shardings = (batch, batch, batch, NamedSharding(mesh, P()))
    self._mean_on_devices = None

  @property
  def mean(self) -> np.ndarray:
    if self._mean is None:  # read from the workdir when a run saved it, else computed (and saved) once
      self._mean = self._imagenet.input_mean(self._config.data, self._train, self._workdir)
    return self._mean

  def resume_position(self, start_step: int, iterator_state: dict | None) -> int:
    """The stream position to resume at: the one saved with the checkpoint (refused if the checkpoint was written
    with other classes or another number of training examples), or start_step x batch for a checkpoint without
    one (the same position: batch k is positions [kB, (k + 1)B))."""
    if not iterator_state:
      return start_step * self._config.batch_size
    saved_classes = list(iterator_state.get('class_names', self.class_names))
    if saved_classes != self.class_names:
      gone = [c for c in saved_classes if c not in self.class_names]
      new = [c for c in self.class_names if c not in saved_classes]
      raise ValueError(
          f'The checkpoint was trained on {len(saved_classes)} classes; this data source has {len(self.class_names)}'
          f' (missing here: {gone[:5]}{" ..." if len(gone) > 5 else ""}; new here: {new[:5]}'
          f'{" ..." if len(new) > 5 else ""}{"; same names in another order" if not gone and not new else ""}). '
          'Point config.data at the dataset the run was trained on, or use another --workdir.')
    saved_n = iterator_state.get('num_examples', self.num_train_examples)
    if saved_n != self.num_train_examples:
      raise ValueError(
          f'The checkpoint was trained on {saved_n} training examples; this data source has '
          f'{self.num_train_examples}, so its epochs would be other permutations. Point config.data at the dataset '
          'the run was trained on, or use another --workdir.')
    return int(iterator_state[self._imagenet.POSITION_KEY])

  def host_batches(self, start_step: int, iterator_state: dict | None = None):
    """This process's share of each training batch from `start_step` on, as numpy (uint8 images, colour-noise
    offsets, labels) (`imagenet_input.finish` makes the float32 images); its `get_state()` is the stream position
    after the last batch taken."""
    return self._imagenet.train_iterator(self._config, self._train,
                                         self.resume_position(start_step, iterator_state))

  def train_inputs(self, start_step: int, iterator_state: dict | None = None):
    host = self.host_batches(start_step, iterator_state)
    self._host = host
    self._position = host.get_state()[self._imagenet.POSITION_KEY]
    stream = self._imagenet.prefetch_to_device(host, self.input_shardings[0], self._config.data.prefetch_to_device,
                                               tag=lambda: host.get_state()[self._imagenet.POSITION_KEY])

    if self._mean_on_devices is None:
      self._mean_on_devices = jax.device_put(np.asarray(self.mean, np.float32), self.input_shardings[3])

    def inputs():
      for arrays, position in stream:
        self._position = position  # the batch handed to the step: its position is what a checkpoint records
        yield (*arrays, self._mean_on_devices)
    return inputs()

  def iterator_state(self) -> dict | None:
    """The stream's state after the last batch the step took, for the checkpoint of that step: the position, and
    what the position means (the classes, the number of examples)."""
    if self._position is None:  # no stream started
      return None
    return {self._imagenet.POSITION_KEY: self._position, 'num_examples': self.num_train_examples,
            'class_names': self.class_names}

  def close(self) -> None:
    """Stops the training stream's decoding threads and worker processes."""
    if self._host is not None:
      self._host.close()
      self._host = None

  def device_batch(self, step, images, noise, labels, mean, *, seed):
    """The host-augmented batch with its colour noise added and the mean subtracted; the stream is seeded from
    config.seed (one seed per run: train.validate)."""
    return self._imagenet.finish(images, noise, mean, jnp), labels

  def eval_splits(self) -> tuple:
    return ('val',) if self._val is not None else ()

  def split_sizes(self) -> dict:
    return {'train': self.num_train_examples, **({'val': len(self._val)} if self._val is not None else {})}

  def eval_batches(self, split: str, protocol: str = 'center', batch_size: int = 0, limit: int = 0):
    source = {'val': self._val, 'train': self._train}[split]
    return self._imagenet.eval_batches(self._config, source, self.mean, protocol,
                                       batch_size or self._config.eval_batch_size, limit=limit)
