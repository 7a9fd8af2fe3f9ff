"""CIFAR-10 plain-44 (Fig. 6 left): the ResNet-44 stack without shortcuts, the same recipe."""
from resnet_jax import config_base


def get_config():
  return config_base.cifar(44, residual=False)
