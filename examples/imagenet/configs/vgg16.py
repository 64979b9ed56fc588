"""VGG-16 (configuration D, no BatchNorm) on ImageNet.

Simonyan & Zisserman (2015): batch 256, learning rate 0.01 divided by 10 three times when the
validation accuracy stopped improving (fixed epochs 25, 50 and 65 here), 74 epochs, weight decay
5e-4, dropout 0.5 on fc6/fc7. ``model_kwargs={"batch_norm": True}`` gives VGG-16-BN.
"""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(
      model="vgg16",
      base_learning_rate=0.01,
      warmup_epochs=0.0,
      num_epochs=74.0,
      lr_decay_epochs=(25.0, 50.0, 65.0),
      weight_decay=5e-4,
  )
