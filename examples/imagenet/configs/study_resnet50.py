"""ResNet-50 v1.5, the paper's main network, in the accuracy study (docs/accuracy.md).

Scaled from ``resnet50`` (the ImageNet recipe) by ``study.scale_recipe``: 32x32 inputs (224 on
ImageNet), quarter width (16 base filters, bottleneck outputs 64 to 512; 64 and 256 to 2048 on
ImageNet), batch 128 (256) at the same 0.1 per 256 images, and 3 epochs (90) with the warm-up
(1/6 epoch) and the decays by 10 (epochs 1, 2, 2.67) compressed thirtyfold. Unchanged: the ImageNet
stem, momentum 0.9, weight decay 1e-4.
"""

from examples.imagenet import study
from examples.imagenet.configs import resnet50
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return study.scale_recipe(resnet50.get_config(), num_epochs=90 / 30, image_size=32,
                            model_kwargs={"num_filters": 16})


def get_study() -> study.Study:
  return study.Study("resnet50", get_config(), resnet50.get_config())
