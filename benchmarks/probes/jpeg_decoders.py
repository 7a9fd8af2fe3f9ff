"""Time the JPEG decoders a training view could use, one thread, on this machine's CPU:

  python benchmarks/probes/jpeg_decoders.py --data_dir=/tmp/synthetic_imagenet [--files=200] [--repeats=3]

For each decoder: milliseconds per image to decode, and to produce the training view (decode, resize the window
to the sampled scale, crop 224; benchmarks/input_throughput.py --make_synthetic writes suitable files).
  pillow              Pillow, full decode (the pipeline's default)
  pillow_draft        Pillow with draft(): libjpeg scales by 1/2, 1/4, 1/8 in the DCT domain while the result stays
                      at least as large as the resized image (config.data.jpeg_dct_scaling)
  simplejpeg          libjpeg-turbo through simplejpeg, full decode, if installed
  simplejpeg_dct      the same with min_height/min_width: the DCT scaling of pillow_draft
  turbojpeg           libjpeg-turbo through PyTurboJPEG, if installed with its shared library
The resize is Pillow's in every case, so the differences are the decoders'.
"""
import glob
import io
import os
import time

import numpy as np
from absl import app, flags
from PIL import Image

from resnet_jax import config_base, image_ops

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Image folder (DIR/train/<class>/*.JPEG).')
_FILES = flags.DEFINE_integer('files', 200, 'Images to decode per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Repeats; the fastest is reported.')


def _decoders():
  out = {'pillow': lambda b, size: Image.open(io.BytesIO(b)).convert('RGB')}

  def draft(b, size):
    im = Image.open(io.BytesIO(b))
    im.draft('RGB', size)
    return im.convert('RGB')
  out['pillow_draft'] = draft
  try:
    import simplejpeg
    out['simplejpeg'] = lambda b, size: Image.fromarray(simplejpeg.decode_jpeg(b, colorspace='RGB'))
    out['simplejpeg_dct'] = lambda b, size: Image.fromarray(
        simplejpeg.decode_jpeg(b, colorspace='RGB', min_width=size[0], min_height=size[1]))
  except ImportError:
    print('simplejpeg: not installed (pip install simplejpeg)')
  try:
    import turbojpeg
    tj = turbojpeg.TurboJPEG()
    out['turbojpeg'] = lambda b, size: Image.fromarray(tj.decode(b, pixel_format=turbojpeg.TJPF_RGB))
  except (ImportError, RuntimeError, OSError) as e:
    print(f'turbojpeg: not usable ({type(e).__name__}: {str(e).splitlines()[0][:80]})')
  return out


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(_DATA_DIR.value, 'train', '*', '*.JPEG')))[:_FILES.value]
  blobs = [open(p, 'rb').read() for p in paths]
  c = config_base.imagenet(50)
  rng = np.random.default_rng(0)
  sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
  draws = [image_ops.train_draws(rng, h, w, c.data) for (w, h) in sizes]
  print(f'{len(blobs)} files of {np.mean([len(b) for b in blobs]) / 1e3:.0f} KB on average, the first '
        f'{sizes[0][0]}x{sizes[0][1]}; one thread; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')
  for name, decode in _decoders().items():
    best_dec, best_view = np.inf, np.inf
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      for b, d in zip(blobs, draws):
        decode(b, d['size'][::-1])
      best_dec = min(best_dec, (time.perf_counter() - t) / len(blobs))
      t = time.perf_counter()
      for b, d in zip(blobs, draws):
        im = decode(b, d['size'][::-1])
        image_ops.resized_window(im, *d['size'], d['top'], d['left'], 224, 224)
      best_view = min(best_view, (time.perf_counter() - t) / len(blobs))
    print(f'{name:15s} decode {1e3 * best_dec:6.2f} ms/image   view {1e3 * best_view:6.2f} ms/image '
          f'({1 / best_view:5.0f} images/s per core)')


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  app.run(main)
