"""ResNet-50 v1.5 on ImageNet (ImageFolder tree), the paper's main network.

Das et al. train DFP with the hyper-parameters of the FP32 baseline unchanged; this is the
standard FP32 recipe: SGD with momentum 0.9, learning rate 0.1 per 256 images with a 5-epoch
linear warm-up (Goyal et al. 2017), divided by 10 at epochs 30, 60 and 80 of 90, weight decay 1e-4.
"""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(model="resnet50")
