"""AlexNet (original two-tower net with LRN) on ImageNet.

Caffe's bvlc_alexnet solver, which follows Krizhevsky et al. (2012): batch 256, learning rate 0.01
divided by 10 every 20 epochs, 90 epochs, weight decay 5e-4. ``model_kwargs={"one_tower": True}``
gives torchvision's single-tower variant.
"""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(
      model="alexnet",
      base_learning_rate=0.01,
      warmup_epochs=0.0,
      num_epochs=90.0,
      lr_decay_epochs=(20.0, 40.0, 60.0, 80.0),
      weight_decay=5e-4,
  )
