"""CIFAR-10 plain-20 (Fig. 6 left): the ResNet-20 stack without shortcuts, the same recipe."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(20, residual=False)
