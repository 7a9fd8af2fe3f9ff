"""CIFAR-10 plain-32 (Fig. 6 left): the ResNet-32 stack without shortcuts, the same recipe."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(32, residual=False)
