"""Every option of a run, defined once: its default, its valid choices and what a resumed run may change. Each paper
hyperparameter names its source.

The files in `configs/` are one per paper experiment; each calls `cifar()` or `imagenet()` here and sets the few
fields that differ. Override any field on the command line: `--config.model.shortcut=C`, `--config.num_steps=100`.

`OPTIONS` is the table the rest of the package reads: validation.py refuses a value outside `choices` (listing them),
and run_record.py refuses to resume a run under another value of a `SAME` field (the model, the data, the recipe);
a `FREE` field (where the data lives, how often to log, how the step is laid out on the devices) may change between
the runs of one workdir. `SCHEDULE` fields are compared as the learning-rate schedule they give
(`schedule_boundaries`), so a run recorded with explicit drops resumes under the equivalent fractions.
"""
from typing import Any, NamedTuple

import ml_collections

SAME, FREE, SCHEDULE = 'same', 'free', 'schedule'  # resume rules


class Option(NamedTuple):
  default: Any
  choices: tuple | None = None  # the valid values; None: any value validation.py accepts
  resume: str = SAME


def _options(*rows) -> dict:
  return {name: Option(*rest) for name, *rest in rows}


OPTIONS = _options(
    # The network (Sec. 3.3, 4.2, Table 1).
    ('model.family', 'cifar', ('cifar', 'imagenet')),
    ('model.depth', 20),                      # CIFAR: 6n+2; ImageNet: 18, 34, 50, 101, 152
    ('model.residual', True),                 # False: the plain net (same stack, no shortcuts)
    ('model.shortcut', 'A', ('A', 'B', 'C')),  # Sec. 3.3
    # 'v1': stride on the first 1x1 (the paper); 'v1.5': on the 3x3 (torchvision)
    ('model.bottleneck', 'v1', ('v1', 'v1.5')),
    # compute dtype; parameters stay float32
    ('model.dtype', 'float32', ('float32', 'bfloat16', 'float16')),
    ('model.num_classes', 10),
    ('model.zero_init_last_bn', False),       # not in the paper
    # The fc layer's weights: 'he' (Sec. 3.4: "We initialize the weights as in [13]", zero-mean Gaussian with std
    # sqrt(2 / fan_in), as for the convs) or 'flax' (Flax's Dense default, LeCun normal: std sqrt(1 / fan_in)).
    ('model.head_init', 'he', ('he', 'flax')),
    ('model.bn_momentum', 0.9),               # moving-average decay for evaluation statistics (PyTorch's 0.1)
    ('model.bn_epsilon', 1e-5),
    ('model.scan_blocks', False),             # compile-time option: scan over a stage's identical blocks

    # The data.
    ('data.dataset', 'cifar10'),
    # In memory: 'tfds' | 'folder' | 'embedded' (the digits); streamed: 'tfds' | 'folder'.
    ('data.source', 'tfds', ('tfds', 'folder', 'embedded')),
    ('data.data_dir', '', None, FREE),        # tfds data_dir, or the root of the image folder: the data may move
    # Held out of the training split for validation (the paper chose its schedule on a 45k/5k split, then trained on
    # all 50k: Sec. 4.2).
    ('data.val_examples', 0),
    ('data.image_size', 32),
    ('data.pad', 4),                          # Sec. 4.2: 4 pixels padded on each side, random 32x32 crop
    ('data.random_flip', True),               # Sec. 4.2: random horizontal flip
    ('data.streaming', False),                # False: the dataset lives on the devices (CIFAR); True: streamed
    # The streamed input (ImageNet: input_pipeline.StreamedInput): grain from disk. Each augmentation is one option;
    # imagenet() sets Sec. 3.4's.
    ('data.scale_range', (256, 480)),         # Sec. 3.4: shorter side "randomly sampled in [256, 480]"
    ('data.mean', 'per_pixel', ('per_pixel', 'per_channel', 'none')),  # Sec. 3.4: "per-pixel mean subtracted"
    ('data.mean_rgb', ()),                    # a fixed per-channel mean (e.g. torchvision's) instead of the data's
    ('data.mean_examples', 50_000),           # training images the mean image is estimated from (0 = all)
    ('data.lighting_std', 0.1),               # Sec. 3.4: "the standard color augmentation in [21]"; 0: off
    ('data.eval_resize', 256),                # Sec. 3.4 testing: 224 crops of the image resized to 256
    ('data.multiscale_sizes', (224, 256, 384, 480, 640)),  # Sec. 3.4: scores averaged over these scales
    ('data.workers', 0, None, FREE),          # grain worker processes (0: decode in the training process)
    ('data.read_threads', 0, None, FREE),     # decoding threads per process (0: one per core)
    # Let the JPEG decoder downscale by 2/4/8 when the image is that much larger than its resized view (faster;
    # slightly different pixels; not in the paper).
    ('data.jpeg_dct_scaling', False),
    ('data.prefetch_to_device', 2, None, FREE),  # batches in flight to the devices

    # The recipe (Sec. 4.2; recipe.py).
    ('batch_size', 128),                      # global mini-batch
    ('num_steps', 64_000),                    # "terminate training at 64k iterations"
    ('learning_rate', 0.1),
    # "divide it by 10 at 32k and 48k iterations": the drops as fractions of num_steps (32k and 48k of 64k), so a
    # shortened run (--config.num_steps=N) keeps the schedule's shape. Explicit steps in lr_boundaries win.
    ('lr_drop_fractions', (0.5, 0.75), None, SCHEDULE),
    ('lr_boundaries', (), None, SCHEDULE),
    ('lr_decay_factor', 0.1),
    ('momentum', 0.9),
    # How momentum meets the learning rate. 'caffe' (the authors' framework): v = m v - lr g; w += v, so a velocity
    # carries the lr of the steps that made it. 'pytorch' (torch.optim.SGD): v = m v + g; w -= lr v, so a new lr
    # also rescales the velocity. They differ after each lr change. Weight decay is L2 added to g in both.
    ('momentum_form', 'caffe', ('caffe', 'pytorch')),
    ('weight_decay', 1e-4),
    # Which parameters decay. The paper states weight decay 1e-4 with no exception (Caffe decays every parameter
    # unless a layer opts out), so 'all': conv and fc weights, fc bias, BN scale/bias. 'kernels': conv and fc weights.
    ('weight_decay_on', 'all', ('all', 'kernels')),
    # ResNet-110/1202 (Sec. 4.2): lr `warmup.learning_rate` until the training error falls below `until_error`,
    # then `learning_rate`. The error tested is a moving average of batch errors (decay `ema`), so one lucky batch
    # does not end the warm-up; `max_steps` guarantees the return to the full learning rate.
    ('warmup.enabled', False),
    ('warmup.learning_rate', 0.01),
    ('warmup.until_error', 0.8),
    ('warmup.ema', 0.9),
    ('warmup.max_steps', 2_000),
    # The paper's CIFAR runs normalised each BN over 64 examples per GPU (batch 128 on 2 GPUs). 0 = whole batch.
    ('bn_group_size', 64),
    ('seed', 0),

    # Not in the paper; each default leaves the paper's arithmetic alone.
    # Dynamic loss scaling for float16 compute: the loss is multiplied by `scale` before the backward pass and the
    # gradients divided by it; a step whose gradients overflow is skipped and halves the scale; after
    # `growth_interval` finite steps in a row the scale doubles. bfloat16 has float32's range and needs none.
    ('loss_scale.enabled', False, None, FREE),
    ('loss_scale.initial', 2.0 ** 15, None, FREE),
    ('loss_scale.growth_interval', 2_000, None, FREE),
    ('loss_scale.factor', 2.0, None, FREE),
    # A step whose loss or updated parameters are not finite: 'stop' ends the run at the next log or checkpoint
    # point, naming the step and the last good checkpoint; 'skip' drops such updates and counts them.
    ('nonfinite_loss', 'stop', ('stop', 'skip'), FREE),
    # Precision of float32 matmuls and convolutions (jax.default_matmul_precision). On recent NVIDIA GPUs XLA's
    # 'default' runs them as TF32; 'highest' keeps full float32 (the paper's; on a CPU what float32 does anyway).
    ('matmul_precision', 'highest', ('highest', 'high', 'default'), FREE),
    # The device mesh: the batch is split over every axis, parameters are replicated. One 'data' axis over all
    # devices by default; e.g. axes=('replica', 'data'), shape=(2, -1) lets the compiler all-reduce within each
    # group first. -1 takes the remaining devices. BN groups mean the same thing on any mesh.
    ('mesh.axes', ('data',), None, FREE),
    ('mesh.shape', (-1,), None, FREE),
    # CPU backend only: JAX devices in this process. 0 = one per core (the most that fit the batch and the BN
    # groups; cpu_devices.py). The numerics do not depend on it (BN groups are fixed by bn_group_size).
    ('cpu_devices', 0, None, FREE),
    # Seeds trained together in one program (seeds.py): replicas with seeds seed, seed + 1, ..., each with its own
    # initialisation, data order, augmentation, BN statistics, warm-up and non-finite handling. Replica k trains as
    # the run with seed + k alone would.
    ('num_seeds', 1),
    # How the seeds share the step: 'vmap' (one vectorised step, whose convolutions become grouped convolutions,
    # which XLA:CPU runs in its slow generic loop), 'unroll' (each seed's step in turn in the same program), or
    # 'auto' (unroll on the CPU, vmap elsewhere). Measured in docs/performance.md.
    ('seed_batching', 'auto', ('auto', 'vmap', 'unroll'), FREE),
    # Training steps per call of the jitted step: on GPUs and TPUs N > 1 runs N steps in one device-side loop
    # (xla_workarounds.StepCaller); every N > 1 gives the same run bit for bit. In-memory datasets only.
    ('steps_per_call', 1, None, FREE),
    ('log_every_steps', 100, None, FREE),
    ('eval_every_steps', 2_000, None, FREE),
    ('checkpoint_every_steps', 2_000, None, FREE),
    ('keep_checkpoints', 3, None, FREE),
    ('eval_batch_size', 500, None, FREE),
)


def base() -> ml_collections.ConfigDict:
  """Every option at its default (the CIFAR recipe of Sec. 4.2)."""
  c = ml_collections.ConfigDict()
  for name, option in OPTIONS.items():
    *sections, leaf = name.split('.')
    node = c
    for s in sections:
      if s not in node:
        node[s] = ml_collections.ConfigDict()
      node = node[s]
    node[leaf] = option.default
  return c


def schedule_boundaries(config) -> tuple:
  """The steps at which the learning rate is divided: config.lr_boundaries when given, else each of
  config.lr_drop_fractions of config.num_steps, rounded to a step (at least step 1)."""
  if config.lr_boundaries:
    return tuple(int(b) for b in config.lr_boundaries)
  return fraction_boundaries(config.lr_drop_fractions, config.num_steps)


def fraction_boundaries(fractions, num_steps: int) -> tuple:
  """The steps of drops at `fractions` of a run of `num_steps`, each at least step 1."""
  return tuple(max(1, round(f * num_steps)) for f in fractions)


def cifar(depth: int, residual: bool = True) -> ml_collections.ConfigDict:
  """A CIFAR-10 experiment of Table 6: option A in all cases (Sec. 4.2)."""
  c = base()
  c.model.family = 'cifar'
  c.model.depth = depth
  c.model.residual = residual
  c.model.shortcut = 'A'
  if depth >= 110:
    # Sec. 4.2: "we use 0.01 to warm up the training until the training error is below 80% (about 400
    # iterations), and then go back to 0.1". The same for the 1202-layer net.
    c.warmup.enabled = True
  return c


def imagenet(depth: int, residual: bool = True) -> ml_collections.ConfigDict:
  """An ImageNet network of Table 1; 18/34 with option A (Table 2), 50/101/152 with option B (Sec. 3.3)."""
  c = base()
  c.model.family = 'imagenet'
  c.model.depth = depth
  c.model.residual = residual
  c.model.shortcut = 'A' if depth in (18, 34) else 'B'
  c.model.num_classes = 1000
  c.data.dataset = 'imagenet2012'
  c.data.image_size = 224           # Sec. 3.4: "a 224x224 crop is randomly sampled"
  c.data.streaming = True           # streamed from disk: DIR/train/<class>/*.JPEG, DIR/val/<class>/*, or tfds
  # Sec. 3.4: mini-batch 256 on 8 GPUs (BN over 32 per GPU), lr 0.1 divided by 10 when the error plateaus,
  # up to 60e4 iterations. The plateaus are fixed here where they occur in Fig. 4: 150k, 300k and 450k of 600k.
  c.batch_size = 256
  c.bn_group_size = 32
  c.num_steps = 600_000
  c.lr_drop_fractions = (0.25, 0.5, 0.75)
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  return c
