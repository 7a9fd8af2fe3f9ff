"""Small configs and data for fast tests."""
import numpy as np
from PIL import Image

from resnet_jax import config_base, input_pipeline, models, train_step, xla_workarounds

def tiny_config(**overrides):
  """A ResNet-8 on the embedded digits at 8x8: a step takes milliseconds on the CPU."""
  c = config_base.cifar(8)
  c.data.dataset, c.data.source, c.data.image_size, c.data.pad = 'digits', 'embedded', 8, 1
  c.data.random_flip = True
  c.batch_size = 32
  c.bn_group_size = 8
  c.num_steps = 6
  c.lr_boundaries = (4,)
  c.log_every_steps = 3
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.eval_batch_size = 100
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def model_and_state(config, mesh, abstract=False):
  """(model, initial state) of `config` on `mesh`, as a run builds them."""
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  return model, train_step.create_state(config, model, mesh, abstract)


def step_caller(config, model, mesh, inp, device_loop=None):
  """The jitted step as a run calls it: steps(state, n, *inputs)."""
  return xla_workarounds.StepCaller(train_step.make_step(config, model, mesh, inp), config, mesh,
                                    inp.input_shardings, device_loop)


def training_step(config, mesh, dataset=None):
  """(model, initial state, the step as a run calls it for one step: step(state, *inputs), the step's inputs) of
  `config` on `mesh`, built as a run builds them."""
  inp = input_pipeline.InMemoryInput(config, mesh, dataset)
  model, state = model_and_state(config, mesh)
  steps = step_caller(config, model, mesh, inp)
  one = lambda state, *inputs: steps(state, 1, *inputs)
  one.lower = steps.lower  # a full call's program (one step at the default steps_per_call on the CPU)
  return model, state, one, next(inp.train_inputs(0))


def write_image_folder(root, splits=('train', 'test'), classes=('cat', 'dog', 'frog'), per_class=4, size=32,
                       seed=0):
  """Writes random PNG/JPEG images in the DIR/<split>/<class>/ layout; returns the images written per split."""
  rng = np.random.default_rng(seed)
  written = {}
  for split in splits:
    for c in classes:
      d = root / split / c
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        ext = 'png' if i % 2 == 0 else 'jpg'
        Image.fromarray(img).save(d / f'{i}.{ext}')
        written[(split, c, f'{i}.{ext}')] = img
  return written


def train_view(record, rng, data_config, mean):
  """One streamed training example as the step sees it (float32): the host's view and colour noise, `finish`ed."""
  from resnet_jax import image_ops
  return image_ops.finish(*image_ops.train_crop(record, rng, data_config), np.asarray(mean, np.float32))
