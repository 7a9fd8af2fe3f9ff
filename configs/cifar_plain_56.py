"""CIFAR-10 plain-56 (Fig. 6 left): the ResNet-56 stack without shortcuts, the same recipe."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(56, residual=False)
