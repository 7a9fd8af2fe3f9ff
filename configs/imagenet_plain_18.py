"""ImageNet plain-18 (Table 2): the ResNet-18 stack without shortcuts."""
from resnet_jax import config_base


def get_config():
  return config_base.imagenet(18, residual=False)
