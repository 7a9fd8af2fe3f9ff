"""CIFAR-10 plain-110 (Fig. 6 left): the ResNet-110 stack without shortcuts, the same recipe."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(110, residual=False)
