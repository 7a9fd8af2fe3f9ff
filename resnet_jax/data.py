"""In-memory image classification datasets: CIFAR-10 (tfds or an image folder) and the embedded digits.

Every source returns uint8 images (N, H, W, 3) and int32 labels. The whole dataset then lives on the devices and
augmentation runs inside the jitted step (see `augment.py`), so a training step needs no host work.

Sources (`config.data.source`):
  'tfds'      tensorflow-datasets (`cifar10`); imported only here, only when asked for.
  'folder'    DIR/train/<class>/*.{png,jpg,...} and DIR/test/<class>/* (data_sources.py), decoded once with Pillow.
  'embedded'  scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled; needs no download.
"""
import dataclasses
import os

import numpy as np

from resnet_jax import data_sources
from resnet_jax.errors import ConfigError, CorruptImageError, DataError, DatasetNotFoundError

EMBEDDED_TEST_EXAMPLES = 297  # digits: 1,500 training and 297 test images

@dataclasses.dataclass
class Dataset:
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray | None
  test_labels: np.ndarray | None
  class_names: list[str]
  val_images: np.ndarray | None = None
  val_labels: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load(data_config) -> Dataset:
  """Loads the dataset `data_config` names and holds out `val_examples` of the training split for validation."""
  source = data_config.source
  if source == 'tfds':
    ds = _load_tfds(data_config.dataset, data_config.data_dir)
  elif source == 'folder':
    ds = load_folder(data_config.data_dir, data_config.image_size)
  elif source == 'embedded':
    if data_config.dataset != 'digits':
      raise ConfigError(f'Unknown embedded dataset {data_config.dataset!r}; valid choices: digits.')
    ds = load_digits(data_config.image_size)
  else:
    raise ConfigError(f'Unknown data source {source!r}; valid choices: tfds, folder, embedded.')
  if ds.train_images.shape[1:3] != (data_config.image_size,) * 2:
    raise DataError(f'Images are {ds.train_images.shape[1]}x{ds.train_images.shape[2]} but '
                    f'config.data.image_size={data_config.image_size}.')
  return split_validation(ds, data_config.val_examples)


def split_validation(ds: Dataset, val_examples: int) -> Dataset:
  """Holds out `val_examples` training images, chosen by a fixed permutation (the same split for every seed)."""
  if not val_examples:
    return ds
  n = len(ds.train_labels)
  if not 0 < val_examples < n:
    raise ConfigError(f'config.data.val_examples={val_examples} must be between 0 and the {n} training examples.')
  order = np.random.default_rng(0).permutation(n)
  val, train = np.sort(order[:val_examples]), np.sort(order[val_examples:])
  return dataclasses.replace(ds, train_images=ds.train_images[train], train_labels=ds.train_labels[train],
                             val_images=ds.train_images[val], val_labels=ds.train_labels[val])


def load_digits(image_size: int = 32) -> Dataset:
  """scikit-learn's 8x8 digits (16 grey levels), upscaled by pixel repetition to RGB `image_size` squares."""
  try:
    from sklearn.datasets import load_digits as sk_digits
  except ImportError as e:
    raise DatasetNotFoundError('The embedded digits dataset ships with scikit-learn: pip install scikit-learn '
                               "(or pip install -e '.[embedded]').") from e
  digits = sk_digits()
  if image_size % 8:
    raise ConfigError(f'The digits are 8x8; config.data.image_size={image_size} must be a multiple of 8.')
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  r = image_size // 8
  images = np.repeat(np.repeat(images, r, axis=1), r, axis=2)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))  # a fixed train/test split
  test, train = order[:EMBEDDED_TEST_EXAMPLES], order[EMBEDDED_TEST_EXAMPLES:]
  return Dataset(images[train], labels[train], images[test], labels[test], [str(d) for d in range(10)])


def _decode(paths, image_size: int) -> np.ndarray:
  from PIL import Image  # Pillow: needed only for folders
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  for i, path in enumerate(paths):
    try:
      with Image.open(path) as im:
        im = im.convert('RGB')
        if im.size != (image_size, image_size):
          im = im.resize((image_size, image_size), Image.BILINEAR)
        images[i] = np.asarray(im)
    except (OSError, ValueError) as e:
      raise CorruptImageError(f'Cannot read image {path}: {e}') from e
  return images


def load_folder(root: str, image_size: int = 32) -> Dataset:
  """Decodes DIR/train/<class>/* (and DIR/test/<class>/* when present) into memory."""
  paths, train_labels, class_names = data_sources.list_split(root, 'train')
  train_images = _decode(paths, image_size)
  test_images = test_labels = None
  if os.path.isdir(os.path.join(root, 'test')):
    paths, test_labels, _ = data_sources.list_split(root, 'test')
    test_images = _decode(paths, image_size)
  return Dataset(train_images, train_labels, test_images, test_labels, class_names)


def _load_tfds(name: str, data_dir: str) -> Dataset:
  tfds = data_sources.import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    builder.download_and_prepare()
    splits = {s: tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1)) for s in ('train', 'test')}
  except Exception as e:  # tfds raises many kinds of errors for a missing or unreachable dataset
    raise DatasetNotFoundError(f'Could not load {name!r} with tensorflow-datasets ({type(e).__name__}: {e}).\n'
                               + data_sources.tfds_prepare_help(name, data_dir)) from e
  names = builder.info.features['label'].names
  return Dataset(splits['train']['image'], splits['train']['label'].astype(np.int32),
                 splits['test']['image'], splits['test']['label'].astype(np.int32), list(names))
