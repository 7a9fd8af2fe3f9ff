"""The shared base of every experiment config in `configs/`. Each paper hyperparameter names its source.

The files in `configs/` are one per paper experiment; each calls `cifar()` or `imagenet()` here and sets the few
fields that differ. Override any field on the command line: `--config.model.shortcut=C`, `--config.num_steps=100`.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.family = 'cifar'          # 'cifar' | 'imagenet'
  c.model.depth = 20
  c.model.residual = True           # False: the plain net (same stack, no shortcuts)
  c.model.shortcut = 'A'            # 'A' | 'B' | 'C' (Sec. 3.3)
  c.model.bottleneck = 'v1'         # 'v1': stride on the first 1x1 (the paper); 'v1.5': on the 3x3 (torchvision)
  c.model.dtype = 'float32'         # compute dtype: 'float32' | 'bfloat16' | 'float16'; parameters stay float32
  c.model.num_classes = 10
  c.model.zero_init_last_bn = False  # not in the paper
  # The fc layer's weights: 'he' (Sec. 3.4: "We initialize the weights as in [13]", zero-mean Gaussian with std
  # sqrt(2 / fan_in), as for the convs) or 'flax' (Flax's Dense default, LeCun normal: std sqrt(1 / fan_in)).
  c.model.head_init = 'he'          # 'he' | 'flax'
  c.model.bn_momentum = 0.9         # moving-average decay for evaluation statistics (PyTorch's 0.1)
  c.model.bn_epsilon = 1e-5
  c.model.scan_blocks = False       # compile-time option: scan over a stage's identical blocks (stacked params)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'cifar10'
  c.data.source = 'tfds'            # 'tfds' | 'folder' | 'embedded'
  c.data.data_dir = ''              # tfds data_dir, or the root of the image folder
  c.data.val_examples = 0           # held out of the training split for validation (the paper chose its schedule
                                    # on a 45k/5k split, then trained on all 50k: Sec. 4.2)
  c.data.image_size = 32
  c.data.pad = 4                    # Sec. 4.2: 4 pixels padded on each side, random 32x32 crop
  c.data.random_flip = True         # Sec. 4.2: random horizontal flip
  c.data.streaming = False          # False: the dataset lives on the devices (CIFAR); True: streamed (ImageNet)

  # Recipe (Sec. 4.2).
  c.batch_size = 128                # global mini-batch
  c.num_steps = 64_000              # "terminate training at 64k iterations"
  c.learning_rate = 0.1
  c.lr_boundaries = (32_000, 48_000)  # "divide it by 10 at 32k and 48k iterations"
  c.lr_decay_factor = 0.1
  c.momentum = 0.9
  # How momentum meets the learning rate. 'caffe' (the authors' framework): v = m v - lr g; w += v, so a velocity
  # carries the lr of the steps that made it. 'pytorch' (torch.optim.SGD, which most PyTorch reproductions use):
  # v = m v + g; w -= lr v, so a new lr also rescales the velocity. The same while the lr is constant; they differ
  # after each lr change (the ResNet-110 warm-up exit, each drop). Weight decay is L2 added to g in both.
  c.momentum_form = 'caffe'         # 'caffe' | 'pytorch'
  c.weight_decay = 1e-4
  # Which parameters decay. The paper states weight decay 1e-4 with no exception (Caffe, which the authors used,
  # decays every parameter unless a layer opts out), so 'all' is the default: conv and fc weights, fc bias, and BN
  # scale/bias. 'kernels' decays conv and fc weights only, as many later recipes do.
  c.weight_decay_on = 'all'         # 'all' | 'kernels'

  # ResNet-110/1202 (Sec. 4.2): lr `warmup.learning_rate` until the training error falls below `until_error`, then
  # `learning_rate`. The error tested is a moving average of batch errors (decay `ema`), so one lucky batch does not
  # end the warm-up; `max_steps` guarantees the return to the full learning rate even if the error never falls.
  c.warmup = ml_collections.ConfigDict()
  c.warmup.enabled = False
  c.warmup.learning_rate = 0.01
  c.warmup.until_error = 0.8
  c.warmup.ema = 0.9
  c.warmup.max_steps = 2_000

  # Dynamic loss scaling for float16 compute (model.dtype='float16'; not in the paper, which trained in float32).
  # The loss is multiplied by `scale` before the backward pass and the gradients divided by it; a step whose
  # gradients overflow is skipped (parameters, momentum and BN statistics kept) and halves the scale; after
  # `growth_interval` finite steps in a row the scale doubles. bfloat16 has float32's range and needs none.
  c.loss_scale = ml_collections.ConfigDict()
  c.loss_scale.enabled = False
  c.loss_scale.initial = 2.0 ** 15
  c.loss_scale.growth_interval = 2_000
  c.loss_scale.factor = 2.0

  # The paper's CIFAR runs normalised each BN over 64 examples per GPU (batch 128 on 2 GPUs). 0 = whole batch.
  c.bn_group_size = 64

  # A step whose loss or updated parameters are not finite (not in the paper, which reports none): 'stop' ends the
  # run at the next log or checkpoint point, naming the step and the last good checkpoint; 'skip' drops such updates
  # and counts them (metrics.jsonl field skipped_steps).
  c.nonfinite_loss = 'stop'         # 'stop' | 'skip'

  # The device mesh. The step is data-parallel: the batch is split over every axis, parameters are replicated.
  # One 'data' axis over all devices by default; e.g. axes=('replica', 'data'), shape=(2, -1) on two slices/hosts
  # lets the compiler all-reduce within each group first. -1 takes the remaining devices. BN groups
  # (bn_group_size) mean the same thing on any mesh.
  # Precision of float32 matmuls and convolutions (jax.default_matmul_precision around the whole run). The paper
  # trained in float32; on recent NVIDIA GPUs XLA's 'default' runs them as TF32 (10-bit mantissa inputs). 'highest'
  # keeps full float32 (on a CPU it is what float32 does anyway); 'high' and 'default' trade precision for speed.
  c.matmul_precision = 'highest'    # 'highest' | 'high' | 'default'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ('data',)
  c.mesh.shape = (-1,)
  # CPU backend only: JAX devices in this process. 0 = one per core (the most that fit the batch and the BN groups;
  # cpu_devices.py); XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment also decides. GPU and TPU
  # runs are unaffected. The numerics do not depend on it (BN groups are fixed by bn_group_size).
  c.cpu_devices = 0
  c.seed = 0
  # Seeds trained together in one program (not in the paper, which reports best and mean +- std of 5 runs for
  # ResNet-110, Table 6): the replicas have seeds seed, seed + 1, ..., seed + num_seeds - 1, each with its own
  # initialisation, data order, augmentation, BN statistics, warm-up and non-finite handling, vmapped over one
  # TrainState with a leading num_seeds axis. Replica k trains as the run with seed + k alone would.
  c.num_seeds = 1
  # How the seeds share the step (num_seeds > 1; not in the paper). 'vmap': one vectorised step, whose convolutions
  # become grouped convolutions: one kernel launch for all seeds on GPUs/TPUs, but XLA:CPU runs grouped convolutions
  # in its slow generic loop (6x slower per seed than one seed alone). 'unroll': each seed's step written out in turn
  # in the same program (the single-seed step each, equal to float rounding). 'auto': unroll on the CPU, vmap elsewhere.
  c.seed_batching = 'auto'          # 'auto' | 'vmap' | 'unroll'
  # Training steps per call of the jitted step (not in the paper): on GPUs and TPUs N > 1 runs N steps in one
  # device-side loop, so a fast accelerator is not held up by Python dispatching each step; on the CPU the steps of a
  # call are dispatched one by one (train_step.TrainSteps). Every N > 1 gives the same run bit for bit, and N = 1 the
  # same up to float rounding. Log, evaluation and checkpoint points stay where they are (a call never jumps one); a
  # stop signal is honoured after its call. In-memory datasets only (the streamed input feeds a new batch each step).
  c.steps_per_call = 1
  c.log_every_steps = 100
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3
  c.eval_batch_size = 500
  return c


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
  # The streaming input pipeline (imagenet_input.py): grain from disk, `source` 'folder' (DIR/train/<class>/*.JPEG,
  # DIR/val/<class>/*) or 'tfds' (prepared as ArrayRecord). Each augmentation is one option; the defaults are
  # Sec. 3.4's.
  c.data.streaming = True
  c.data.scale_range = (256, 480)   # Sec. 3.4: shorter side "randomly sampled in [256, 480] for scale augmentation"
  c.data.mean = 'per_pixel'         # Sec. 3.4: "per-pixel mean subtracted"; 'per_channel' | 'none'
  c.data.mean_rgb = ()              # a fixed per-channel mean (e.g. torchvision's) instead of the data's
  c.data.mean_examples = 50_000     # training images the mean image is estimated from (0 = all; not in the paper)
  c.data.lighting_std = 0.1         # Sec. 3.4: "the standard color augmentation in [21]" (AlexNet PCA noise); 0: off
  c.data.eval_resize = 256          # Sec. 3.4 testing: 224 crops of the image resized to 256 (centre / 10-crop)
  c.data.multiscale_sizes = (224, 256, 384, 480, 640)  # Sec. 3.4: fully-convolutional, scores averaged over these
  c.data.workers = 0                # grain worker processes decoding in parallel (0: decode in the training process)
  c.data.read_threads = 0           # decoding threads per process (0: one per core)
  c.data.jpeg_dct_scaling = False   # let the JPEG decoder downscale by 2/4/8 when the image is that much larger than
                                    # its resized view (faster; slightly different pixels; not in the paper)
  c.data.prefetch_to_device = 2     # batches in flight to the devices
  # Sec. 3.4: mini-batch 256 on 8 GPUs (BN over 32 per GPU), lr 0.1 divided by 10 when the error plateaus,
  # up to 60e4 iterations. The plateaus are fixed here at the iterations where they occur in Fig. 4.
  c.batch_size = 256
  c.bn_group_size = 32
  c.num_steps = 600_000
  c.lr_boundaries = (150_000, 300_000, 450_000)
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  return c
