"""AlexNet (the original two towers, with LRN) in the accuracy study (docs/accuracy.md).

Scaled from ``alexnet`` (Krizhevsky et al.'s recipe) by ``study.scale_recipe``: 64x64 inputs
(224 on ImageNet; at 32 the stride-4 conv1 leaves 1x1 maps from conv3 on, at 64 they are 3x3,
as 13x13 at 224), fc6/fc7 of 1024 (4096), batch 128 (256) at the same 0.01 per 256 images, and 3
epochs (90) with the decays by 10 (epochs 0.67, 1.33, 2, 2.67) compressed thirtyfold. Unchanged: the
convolutions' widths and towers, LRN, dropout 0.5, momentum 0.9, weight decay 5e-4.

The model's convolutions and fc6/fc7 start from He's fan-in form (``models.relu_init``), not the
paper's normal(0.01) with biases of 1: with He's fan-out form and normal(0.01) the activations
shrank layer by layer (rms 0.23 after conv1, 0.006 after fc7, logits 0.0008), each step moved the
weights by about 1e-6 of their norm and the loss stayed at 2.303 to step 60; with fan-in they stay
between 0.5 and 1.3 and the loss falls from 2.42 to 1.52 by step 50 (measured).
"""

from examples.imagenet import study
from examples.imagenet.configs import alexnet
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return study.scale_recipe(alexnet.get_config(), num_epochs=90 / 30, image_size=64,
                            model_kwargs={"hidden": 1024})


def get_study() -> study.Study:
  return study.Study("alexnet", get_config(), alexnet.get_config())
