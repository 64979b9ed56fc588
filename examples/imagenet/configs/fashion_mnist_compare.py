"""The README's main job: ``fashion_mnist_resnet`` at quarter width and batch 64, small enough to
train twice (FP32 and DFP, ``main.py compare``) in a few minutes on two CPU cores.

Always on the shipped subset (not Debian's full set), so that every checkout compares on the
same data.
"""

import dataclasses

from examples.imagenet.configs import fashion_mnist_resnet
from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return dataclasses.replace(
      fashion_mnist_resnet.get_config(),
      model_kwargs={"num_filters": 16},
      dataset="fashion_mnist_subset",
      batch_size=64,
      base_learning_rate=0.4,  # 0.1 at batch 64, as fashion_mnist_resnet's 0.2 at 128
      num_train_steps=600,  # 6.4 epochs of the subset
      log_every_steps=50,
      eval_every_steps=200,
      checkpoint_every_steps=200,
  )
