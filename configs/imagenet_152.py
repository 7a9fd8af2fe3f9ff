"""ImageNet ResNet-152 (Table 1), the paper's recipe (Sec. 3.4)."""
from resnet_jax import config_base


def get_config():
  return config_base.imagenet(152)
