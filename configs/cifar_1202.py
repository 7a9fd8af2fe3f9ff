"""CIFAR-10 ResNet-1202 (Table 6), the paper's recipe (Sec. 4.2).

Unrolled, XLA compiles its 1,202 layers in about 4 minutes (2-core CPU, 7 GB). Add `--config.model.scan_blocks=True`
to compile each stage's identical blocks as one loop: the same arithmetic and step time (4% slower on the CPU),
compiled in seconds, with the blocks' parameters stacked in the checkpoint (docs/performance.md, ResNet-1202).
"""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(1202)
