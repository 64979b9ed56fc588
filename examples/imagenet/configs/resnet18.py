"""ResNet-18 on ImageNet, with ResNet-50's recipe (see default.py)."""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(model="resnet18")
