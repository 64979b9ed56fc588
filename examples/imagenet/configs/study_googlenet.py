"""GoogLeNet (Inception v1) in the accuracy study (docs/accuracy.md).

Scaled from ``googlenet`` (the paper's recipe) by ``study.scale_recipe``: 32x32 inputs (224 on
ImageNet; inception 3 runs at 4x4, 4 at 2x2 and 5 at 1x1, as 28, 14 and 7 at 224), batch 128
(256) at the same 0.08 per 256 images, and 2 epochs (60) with the decay by 4% every 0.27 epochs
(every 8) compressed thirtyfold. Unchanged: the full widths of Table 1 (the model has no width
knob), LRN, dropout 0.4, no auxiliary heads, no warm-up, momentum 0.9, weight decay 2e-4.

The model's initialisation is He's fan-in form (``models.relu_init``), not Caffe's Xavier: with
the fan-out form the activations' rms doubled per inception module (21.6 at the pooled features,
loss 10 at step 0, NaN within 8 steps without a warm-up, chance level to step 120 with one);
with fan-in they stay near 1, the loss starts at 2.30 and falls to 2.03 by step 60 (measured).
"""

from examples.imagenet import study
from examples.imagenet.configs import googlenet
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return study.scale_recipe(googlenet.get_config(), num_epochs=60 / 30, image_size=32)


def get_study() -> study.Study:
  return study.Study("googlenet", get_config(), googlenet.get_config())
