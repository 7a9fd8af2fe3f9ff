"""Is a config a run we can do? One entry point, `validate(config, num_devices)`, called once per run before anything
is read or written: the model, the data options, the recipe, the batch against the devices and the BN groups. Each
mistake is a ConfigError that says what to change; a value outside an option's choices (config_base.OPTIONS) is
refused with the valid ones. `devices_fit` is the device rule
alone, for choosing a CPU device count; `check_memory` compares a compiled step with the devices' memory.

What depends on the data itself (the number of classes and of examples, a checkpoint's data) is checked where the
data is read (input_pipeline.create, input_pipeline.check_same_data).
"""
from resnet_jax import config_base, data_sources, models
from resnet_jax.errors import ConfigError

POSITIVE = ('batch_size', 'num_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
            'eval_batch_size', 'keep_checkpoints', 'steps_per_call')


def _choices_error(what: str, value, valid) -> ConfigError:
  return ConfigError(f'Unknown {what} {value!r}; valid choices: {", ".join(map(str, valid))}.')


def validate(config, num_devices: int) -> None:
  """Raises ConfigError with what to change when `config` cannot run on `num_devices` devices."""
  check_choices(config)
  validate_model(config.model)
  _check_data(config)
  _check_recipe(config)
  _check_devices(config, num_devices)


def validate_model(model_config) -> None:
  """The network `config.model` names: an unknown family, depth, shortcut, bottleneck, dtype or fc initialiser is
  refused with the valid choices. (The whole run is `validate`; this part alone serves the tools that build only a
  network: summary, torchvision_weights.)"""
  check_choices(model_config, 'model')
  family, depth = model_config.family, model_config.depth
  if family == 'cifar':
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
      raise ConfigError(f'Unknown CIFAR depth {depth!r}: CIFAR nets have depth 6n+2 for n >= 1 '
                        '(8, 14, 20, 26, 32, 38, 44, 50, 56, ..., 110, ..., 1202).')
  elif depth not in models.IMAGENET_STAGES:
    raise _choices_error('ImageNet depth', depth, sorted(models.IMAGENET_STAGES))


def check_choices(config, section: str = '') -> None:
  """Refuses the first field of `config` (the whole config, or the `section` it is) whose value is not one of its
  option's choices (config_base.OPTIONS), naming the field and listing the choices."""
  prefix = f'{section}.' if section else ''
  for name, option in config_base.OPTIONS.items():
    if option.choices is None or not name.startswith(prefix):
      continue
    node = config
    for part in name[len(prefix):].split('.'):
      node = node[part]
    if node not in option.choices:
      raise _choices_error(f'config.{name}', node, option.choices)


def _check_data(config) -> None:
  d = config.data
  if d.streaming:
    if d.source not in data_sources.STREAMED_SOURCES:
      raise _choices_error('streaming data source', d.source, data_sources.STREAMED_SOURCES)
    lo, hi = d.scale_range
    if not 0 < lo <= hi or lo < d.image_size:
      raise ConfigError(f'config.data.scale_range={tuple(d.scale_range)} must satisfy image_size ({d.image_size}) '
                        '<= min <= max.')
    if d.eval_resize < d.image_size:
      raise ConfigError(f'config.data.eval_resize={d.eval_resize} is smaller than the crop image_size={d.image_size}.')
    if d.workers < 0 or d.read_threads < 0:
      raise ConfigError(f'config.data.workers={d.workers} and config.data.read_threads={d.read_threads} must be >= 0.')
    if config.num_seeds > 1:
      raise ConfigError(f'config.num_seeds={config.num_seeds} needs an in-memory dataset: the streamed input draws '
                        'one data order for the whole run, not one per seed. Train each seed in its own run.')
    if config.steps_per_call > 1:
      raise ConfigError(f'config.steps_per_call={config.steps_per_call} needs an in-memory dataset: the streamed '
                        'input feeds a new batch every step. Use 1.')
  else:
    if d.source == 'embedded' and d.dataset != 'digits':
      raise _choices_error('embedded dataset', d.dataset, ('digits',))
    if d.source == 'embedded' and d.image_size % 8:
      raise ConfigError(f'The digits are 8x8; config.data.image_size={d.image_size} must be a multiple of 8.')
  if d.val_examples < 0:
    raise ConfigError(f'config.data.val_examples={d.val_examples} must be >= 0 (0: no validation hold-out).')


def _check_recipe(config) -> None:
  for name in POSITIVE:
    if config[name] <= 0:
      raise ConfigError(f'config.{name}={config[name]} must be positive.')
  if config.learning_rate <= 0:
    raise ConfigError(f'config.learning_rate={config.learning_rate} must be positive.')
  _check_schedule(config)
  if config.num_seeds < 1:
    raise ConfigError(f'config.num_seeds={config.num_seeds} must be at least 1: the number of seeds trained together '
                      f'(config.seed, config.seed + 1, ...).')
  ls = config.loss_scale
  if ls.enabled and config.model.dtype != 'float16':
    raise ConfigError(f'config.loss_scale.enabled applies to float16 compute only, but config.model.dtype='
                      f'{config.model.dtype!r}; set --config.model.dtype=float16 or disable loss scaling.')
  if ls.enabled and (ls.initial <= 0 or ls.factor <= 1 or ls.growth_interval <= 0):
    raise ConfigError('config.loss_scale needs initial > 0, factor > 1 and growth_interval > 0.')


def _check_schedule(config) -> None:
  """The learning-rate drops must fall inside the run. Drops given as fractions of num_steps always do; explicit
  steps (config.lr_boundaries) must be increasing steps in 1..num_steps."""
  fractions = tuple(config.lr_drop_fractions)
  if any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
    raise ConfigError(f'config.lr_drop_fractions={fractions} must be increasing fractions of the run in (0, 1] '
                      "(the paper's CIFAR drops: '(0.5, 0.75)', i.e. 32k and 48k of 64k).")
  boundaries, n = tuple(config.lr_boundaries), config.num_steps
  if boundaries and (list(boundaries) != sorted(set(boundaries)) or any(b <= 0 or b > n for b in boundaries)):
    same = config_base.fraction_boundaries(fractions, n)
    raise ConfigError(f'config.lr_boundaries={boundaries} must be strictly increasing steps in 1..config.num_steps='
                      f'{n} (the iterations at which the learning rate is divided). Leave it empty, '
                      f"--config.lr_boundaries='()', and the drops follow num_steps at config.lr_drop_fractions="
                      f'{fractions} (here at steps {", ".join(map(str, same)) or "none"}).')


def _check_devices(config, num_devices: int) -> None:
  b, g = config.batch_size, config.bn_group_size
  if config.cpu_devices < 0:
    raise ConfigError(f'config.cpu_devices={config.cpu_devices} must be >= 0 (0: one per CPU core).')
  if b % num_devices:
    raise ConfigError(f'config.batch_size={b} is not divisible by the {num_devices} devices; use a multiple of '
                      f'{num_devices} (e.g. {num_devices * max(1, round(b / num_devices))}).')
  if config.eval_batch_size % num_devices:
    raise ConfigError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} '
                      'devices.')
  if g < 0 or g > b:
    raise ConfigError(f'config.bn_group_size={g} must be between 0 (whole batch) and config.batch_size={b}.')
  if g and b % g:
    divisors = [d for d in range(2, b) if b % d == 0][-2:]
    raise ConfigError(f'config.bn_group_size={g} does not divide config.batch_size={b}; use a divisor of it '
                      f'(e.g. {" or ".join(map(str, divisors)) or b}) or 0 for the whole batch.')
  if not _groups_fit(b, g, num_devices):
    raise ConfigError(f'config.bn_group_size={g} neither divides nor is a multiple of the {b // num_devices} '
                      f'examples per device ({b} over {num_devices} devices): a group would straddle devices unevenly.')


def _groups_fit(batch: int, group: int, num_devices: int) -> bool:
  per_device = batch // num_devices
  return not group or per_device % group == 0 or group % per_device == 0


def devices_fit(config, n: int) -> bool:
  """Whether `n` devices can hold the batch as `validate` requires: n divides the batch and the evaluation batch,
  and every BN group lies on one device or spans whole devices."""
  b, g = config.batch_size, config.bn_group_size
  return b > 0 and not b % n and not config.eval_batch_size % n and 0 <= g <= b and _groups_fit(b, g, n)


# ---------------------------------------------------------------------------------------------------------------
# Will the step fit in memory? (checked before training when several seeds share one program)

def step_memory_bytes(compiled) -> int | None:
  """Bytes one device needs to run the compiled step: its arguments (state, data), the outputs not aliased to
  donated arguments, and XLA's temporaries (activations, gradients), from XLA's own memory analysis. None where
  the backend does not report it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not implemented on this backend
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def available_memory_bytes(device) -> int | None:
  """What `device` may allocate: the accelerator's limit, or for CPU devices the host's available memory (which
  all of this process's CPU devices share). None when unknown."""
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    return int(stats['bytes_limit']) if 'bytes_limit' in stats else None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_memory(config, compiled, devices) -> int | None:
  """Raises ValueError, naming the estimate, when the compiled step needs more memory than the devices have.
  CPU devices share the host's memory, so their estimates add up. Returns the estimate (None when unknown)."""
  per_device = step_memory_bytes(compiled)
  have = available_memory_bytes(devices[0])
  if per_device is None or have is None:
    return per_device
  cpu = devices[0].platform == 'cpu'
  need = per_device * (len(devices) if cpu else 1)
  if need > have:
    gib = lambda b: f'{b / 2 ** 30:.2f} GiB'
    raise ConfigError(
        f'The training step of config.num_seeds={config.num_seeds} seed(s) needs about {gib(need)} '
        f'({"on the host, over " + str(len(devices)) + " CPU devices" if cpu else "per device"}: XLA\'s estimate of '
        f'the state, the batch and the activations) but {gib(have)} is available. Lower config.num_seeds or '
        'config.batch_size, or train the seeds in separate runs.')
  return need
