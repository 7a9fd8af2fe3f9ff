"""Measure the ImageNet training pipeline's throughput (images/s) on this machine, without a model:

  python benchmarks/input_throughput.py --data_dir=/tmp/synthetic_imagenet --make_synthetic=1000 --steps=20 \
      [--workers=N] [--read_threads=N] [--jpeg_dct_scaling]

`--make_synthetic=N` first writes N ImageNet-like JPEGs (500x375 and 375x500, quality 90, smooth content plus
noise; docs/performance.md gives their size against ImageNet's) into DATA_DIR/train/<class>/ (10 classes) and one
per class into DATA_DIR/val; `--synthetic_size=H,W` writes larger ones. The stream is the training pipeline of
configs/imagenet_50.py as the host runs it (decode, scale augmentation to [256, 480], 224 crop, flip, and each
view's colour-noise offset; the step adds the offset and subtracts the mean on the device), batches of --batch_size
on this host, read by the training process's threads (--workers=0) or by N worker processes.
"""
import os
import time

import numpy as np
from absl import app, flags

from resnet_jax import config_base, data_sources, streams

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Image folder (DIR/train/<class>/*.JPEG).')
_MAKE = flags.DEFINE_integer('make_synthetic', 0, 'Write this many synthetic training JPEGs first.')
_SIZE = flags.DEFINE_list('synthetic_size', ['375', '500'], 'Height,width of the synthetic JPEGs (alternately '
                          'transposed).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Batches to time (after 2 warm-up batches).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per batch.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'config.data.workers: decoding worker processes.')
_THREADS = flags.DEFINE_integer('read_threads', 0, 'config.data.read_threads: decoding threads per process (0: one '
                                'per core).')
_DCT = flags.DEFINE_bool('jpeg_dct_scaling', False, 'config.data.jpeg_dct_scaling.')


def make_synthetic(root: str, n: int, classes: int = 10, seed: int = 0, size=(375, 500)) -> None:
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, count in (('train', n), ('val', classes)):
    for i in range(count):
      d = os.path.join(root, split, f'n{i % classes:08d}')
      os.makedirs(d, exist_ok=True)
      h, w = size if i % 2 == 0 else size[::-1]
      small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
      img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.int16)
      img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(os.path.join(d, f'{i}.JPEG'), format='JPEG', quality=90)


def main(argv):
  del argv
  if _MAKE.value:
    make_synthetic(_DATA_DIR.value, _MAKE.value, size=tuple(int(s) for s in _SIZE.value))
  c = config_base.imagenet(50)
  c.data.source, c.data.data_dir = 'folder', _DATA_DIR.value
  c.data.workers, c.data.read_threads, c.data.jpeg_dct_scaling = _WORKERS.value, _THREADS.value, _DCT.value
  c.batch_size = _BATCH.value
  source = data_sources.streamed_source(c.data, 'train')
  it = streams.train_iterator(c, source, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(_STEPS.value):
    next(it)
  dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
  n = _STEPS.value * _BATCH.value
  # CPU-seconds of this process (its threads; not the worker processes) tell the cost apart from how busy the
  # machine was.
  print(f'{n / dt:.1f} images/s, {n / dcpu:.1f} images per CPU-second of the training process ({_STEPS.value} '
        f'batches of {_BATCH.value}, {len(source)} files, workers={_WORKERS.value}, '
        f'read_threads={streams.read_threads(c.data)}, jpeg_dct_scaling={_DCT.value}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f})', flush=True)
  it.close()  # stops grain's worker processes


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  app.run(main)
