"""The embedded default: a CIFAR-family ResNet on scikit-learn's bundled 8x8 digits (no download needed).

The digits are upscaled to 16x16 RGB, so the CIFAR net's three stages run on 16/8/4 maps. It is the paper's
recipe shortened to fit a 2-core CPU in under three minutes: same optimiser, augmentation and BN grouping,
lr 0.1 divided by 10 at 50% and 75% of the steps
(the paper's 32k/48k of 64k: the default drop fractions).
"""
from resnet_jax import config_base


def get_config():
  c = config_base.cifar(20)
  c.data.dataset = 'digits'
  c.data.source = 'embedded'
  c.data.image_size = 16
  c.data.pad = 2            # 4 pixels of 32, scaled to 16
  c.data.random_flip = False  # a mirrored digit is another glyph
  c.batch_size = 128
  c.num_steps = 600
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 200
  c.eval_batch_size = 300
  return c
