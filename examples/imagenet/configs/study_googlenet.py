"""GoogLeNet (Inception v1) in the accuracy study (docs/accuracy.md).

Scaled from ``googlenet`` (the paper's recipe) by ``study.scale_recipe``: 32x32 inputs (224 on
ImageNet), batch 128 (256) at the same 0.08 per 256 images, and 2 epochs (60) with the decay by
4% every 0.27 epochs (every 8) compressed thirtyfold. Added: a linear warm-up over the first 0.1
epoch (47 steps; none on ImageNet): without it the FP32 loss was NaN within 8 steps (measured),
as the He-initialised, unnormalised net starts with a loss near 20. Unchanged: the full widths of
Table 1 (the model has no width knob), LRN, dropout 0.4, no auxiliary heads, momentum 0.9,
weight decay 2e-4.
"""

import dataclasses

from examples.imagenet import study
from examples.imagenet.configs import googlenet
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return dataclasses.replace(
      study.scale_recipe(googlenet.get_config(), num_epochs=60 / 30, image_size=32),
      warmup_epochs=0.1)


def get_study() -> study.Study:
  return study.Study("googlenet", get_config(), googlenet.get_config())
