"""On-device preprocessing for the in-memory datasets (Sec. 4.2), run inside the jitted step.

Training: subtract the per-pixel mean of the training set, pad 4 pixels on each side with zeros, take a random
crop of the original size, flip horizontally with probability 1/2. Testing: the single original view, mean
subtracted. Padding follows mean subtraction, so the padded border is the mean image (zero after normalisation),
as in the Torch reimplementation the authors pointed to (fb.resnet.torch).
"""
import jax
import jax.numpy as jnp
import numpy as np


def pixel_mean(train_images: np.ndarray) -> np.ndarray:
  """The per-pixel mean (H, W, C) of the training images, in float32."""
  return train_images.mean(axis=0, dtype=np.float64).astype(np.float32)


def normalize(images, mean):
  return images.astype(jnp.float32) - mean


def random_crop(key, images, pad: int):
  """Per-example random crop of the zero-padded images, the same size as the input."""
  if pad == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_flip(key, images):
  """Flips each example left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def train_view(key, images, mean, pad: int = 4, flip: bool = True):
  """uint8 images -> augmented, mean-subtracted float32 images."""
  crop_key, flip_key = jax.random.split(key)
  x = random_crop(crop_key, normalize(images, mean), pad)
  return random_flip(flip_key, x) if flip else x
