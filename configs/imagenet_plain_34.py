"""ImageNet plain-34 (Table 2): the ResNet-34 stack without shortcuts."""
from resnet_jax import config_base


def get_config():
  return config_base.imagenet(34, residual=False)
