"""Image operations of the streamed input (Sec. 3.4), in Pillow and numpy: decode, resize, crop, flip, colour noise.

Training view: decode -> shorter side resized to a random integer in `config.data.scale_range` ([256, 480], "scale
augmentation" [41]) -> random `image_size` (224) crop -> random horizontal flip (`random_flip`) -> AlexNet PCA colour
noise with the standard ImageNet eigenvalues/eigenvectors (`lighting_std`, 0.1) -> mean subtraction. The host does
everything up to the flip and draws the colour noise (`train_crop`); the training step adds the noise and subtracts
the mean on the device (`finish`).
Test views (Sec. 3.4, `PROTOCOLS`): 'center' (the 224 centre crop of the image resized to `eval_resize` = 256),
'10crop' (four corners and centre of that image and their flips) and 'multiscale' (the whole image, shorter side in
`multiscale_sizes`, for the fully-convolutional evaluation in evaluate.py).

A file that cannot be decoded raises CorruptImageError naming it: skipping it would change every later batch.
"""
import io

import numpy as np
from PIL import Image

from resnet_jax.errors import CorruptImageError

PROTOCOLS = ('center', '10crop', 'multiscale')

# AlexNet's PCA colour augmentation: eigen-decomposition of the covariance of ImageNet RGB pixels scaled to [0, 1]
# (the values used by fb.resnet.torch, which the authors pointed to). Columns of IMAGENET_EIGVEC are eigenvectors.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]], np.float32)


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
