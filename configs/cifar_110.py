"""CIFAR-10 ResNet-110 (Table 6), the paper's recipe (Sec. 4.2)."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(110)
