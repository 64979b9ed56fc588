"""VGG-16 (configuration D, no BatchNorm) in the accuracy study (docs/accuracy.md).

Scaled from ``vgg16`` (Simonyan & Zisserman's recipe) by ``study.scale_recipe``: 32x32 inputs
(224 on ImageNet), quarter-width convolutions (16 to 128 channels; 64 to 512), fc6/fc7 of 1024
(4096), batch 128 (256) at the same 0.01 per 256 images, and 4.93 epochs (74) with the decays by
10 (epochs 1.67, 3.33, 4.33) compressed fifteenfold, half as much as the other networks: compressed
thirtyfold, its FP32 loss had only just left chance (2.24 at step 200, 1.63 at step 350, measured)
when the first decay came at step 390. Unchanged: 13 convolutions in five blocks, no BatchNorm,
dropout 0.5, momentum 0.9, weight decay 5e-4.
"""

from examples.imagenet import models, study
from examples.imagenet.configs import vgg16
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  layers = tuple(w if w == "M" else w // 4 for w in models.VGG16_LAYERS)
  return study.scale_recipe(vgg16.get_config(), num_epochs=74 / 15, image_size=32,
                            model_kwargs={"layers": layers, "hidden": 1024})


def get_study() -> study.Study:
  return study.Study("vgg16", get_config(), vgg16.get_config())
