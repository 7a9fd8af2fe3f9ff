"""Where the images come from, for both inputs (in memory: data.py; streamed: input_pipeline.StreamedInput):

  image folders             ROOT/train/<class>/* and a held-out split ROOT/test/<class>/* (CIFAR) or
                            ROOT/val/<class>/* (ImageNet); the classes are the sorted folder names of ROOT/train
  tensorflow-datasets       imported only where asked for, with one message when it is missing

and the streamed input's random-access sources: `FolderSource` (files of a folder) and `TfdsSource` (a tfds dataset
prepared as ArrayRecord, read without TensorFlow), each a list of {'image': encoded bytes, 'label', 'name'}.
"""
import os

import numpy as np

from resnet_jax.errors import DataError, DatasetNotFoundError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
STREAMED_SOURCES = ('tfds', 'folder')
TFDS_SPLITS = {'train': 'train', 'val': 'validation', 'test': 'test'}  # ours -> tfds's


def folder_help(root: str) -> str:
  return (f'Expected an image folder at {root!r}: {root}/train/<class>/*.JPEG|jpg|png and, if there is one, a '
          f'held-out split: {root}/test/<class>/* (CIFAR) or {root}/val/<class>/* (ImageNet); the classes are the '
          'folder names of train/. docs/cifar.md and docs/imagenet.md say how to write one.')


def list_split(root: str, split: str):
  """(paths, labels, class names) of the images ROOT/SPLIT/<class>/*, classes in sorted order, each class's files
  sorted by name. The classes are those of ROOT/train, so labels mean the same in every split: a held-out split may
  lack a class, but not have one that train/ lacks, and every training class needs images."""
  if not root or not os.path.isdir(os.path.join(root, 'train')):
    raise DatasetNotFoundError(folder_help(root or '<config.data.data_dir is empty>'))
  train_dir = os.path.join(root, 'train')
  classes = sorted(c for c in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, c)))
  if not classes:
    raise DatasetNotFoundError(f'No class folders under {train_dir}. ' + folder_help(root))
  d = os.path.join(root, split)
  if not os.path.isdir(d):
    raise DatasetNotFoundError(f'No {d}. ' + folder_help(root))
  extra = sorted(set(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c))) - set(classes))
  if extra:
    raise DataError(f'{d} has classes that {train_dir} lacks: {extra}. The classes are the folder names of '
                    f'{train_dir}; add those folders there, or remove them from {d}.')
  paths, labels, empty = [], [], []
  for label, c in enumerate(classes):
    cdir = os.path.join(d, c)
    files = sorted(f for f in os.listdir(cdir) if f.lower().endswith(IMAGE_EXTENSIONS)) if os.path.isdir(cdir) else []
    if not files:
      empty.append(c)
    paths += [os.path.join(cdir, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise DatasetNotFoundError(f'No images (*{", *".join(IMAGE_EXTENSIONS)}) under {d}/<class>/. '
                               + folder_help(root))
  if split == 'train' and empty:
    raise DataError(f'{len(empty)} class folder(s) of {d} hold no images (*{", *".join(IMAGE_EXTENSIONS)}): '
                    f'{empty[:5]}{" ..." if len(empty) > 5 else ""}. Every class needs training images: add them, '
                    'or remove the empty folders (the classes are the folder names, so that renumbers the labels).')
  return paths, np.asarray(labels, np.int32), classes


def import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetNotFoundError(
        'config.data.source=tfds needs tensorflow-datasets: pip install tensorflow-datasets tensorflow-cpu (or '
        "pip install -e '.[tfds]'). Without them, use an image folder: --config.data.source=folder "
        '--config.data.data_dir=DIR with DIR/train/<class>/*.png.') from e
  return tfds


def tfds_prepare_help(name: str, data_dir: str) -> str:
  root = data_dir or '~/tensorflow_datasets'
  if name == 'imagenet2012':
    return (f'imagenet2012 is not prepared as ArrayRecord under {root}. tensorflow-datasets cannot download '
            'ImageNet: register at image-net.org, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, '
            f'put both in {os.path.join(root, "downloads", "manual")}/ and run once (hours, ~300 GB of disk; needs '
            "pip install -e '.[tfds]'):\n"
            f'  tfds build imagenet2012 --data_dir={root} --file_format=array_record\n'
            'Or use an image folder: --config.data.source=folder --config.data.data_dir=DIR with '
            'DIR/train/<class>/*.JPEG and DIR/val/<class>/*.')
  return (f'Prepare {name} where the network is reachable with `tfds build {name} --data_dir={root}` and pass '
          '--config.data.data_dir=<that data_dir>.')


class FolderSource:
  """One split of an image folder: element i is the i-th file of the sorted class folders, still encoded."""

  def __init__(self, root: str, split: str):
    self.paths, self.labels, self.class_names = list_split(root, split)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], 'rb') as f:
      return {'image': f.read(), 'label': int(self.labels[i]), 'name': self.paths[i]}


class TfdsSource:
  """One split of a tfds dataset prepared as ArrayRecord, through `tfds.data_source` (no TensorFlow); the images
  stay encoded. Opened lazily, so that grain's worker processes each open their own reader."""

  def __init__(self, data_config, split: str):
    tfds = import_tfds()
    self._dataset, self._data_dir, self._split = data_config.dataset, data_config.data_dir or None, TFDS_SPLITS[split]
    builder = tfds.builder(self._dataset, data_dir=self._data_dir)
    if not builder.is_prepared():
      raise DatasetNotFoundError(tfds_prepare_help(self._dataset, data_config.data_dir))
    if 'array_record' not in str(builder.info.file_format).lower():
      raise DatasetNotFoundError(f'{self._dataset} under {data_config.data_dir or "~/tensorflow_datasets"} is '
                                 f'prepared as {builder.info.file_format}, not ArrayRecord (random access). '
                                 + tfds_prepare_help(self._dataset, data_config.data_dir))
    self.class_names = list(builder.info.features['label'].names)
    self._length = builder.info.splits[self._split].num_examples
    self._source = None

  def _open(self):
    if self._source is None:
      tfds = import_tfds()
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


def streamed_source(data_config, split: str):
  """The streamed input's source of `split` ('train' | 'val') that `config.data` names."""
  if data_config.source == 'folder':
    return FolderSource(data_config.data_dir, split)
  return TfdsSource(data_config, split)
