"""ResNet-50 v1.5 on ImageNet: the default config."""

from examples.imagenet.configs import default
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return default.get_config()
