"""A half-width ResNet-18 on Fashion-MNIST at 32x32: a quick run (minutes on two CPU cores) on
real images with no download. Uses Debian's full Fashion-MNIST when installed
(``apt-get install dataset-fashion-mnist``), otherwise the subset shipped in ``data/``.

Half width (32 base filters) because XLA:CPU is slow on 3x3 convolutions over the 2x2 and 1x1
maps that a 32x32 input leaves in ResNet's last stages; the ImageNet stem is kept.
"""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(
      model="resnet18",
      model_kwargs={"num_filters": 32},
      dataset="fashion_mnist",
      image_size=32,
      crop_scale=(0.35, 1.0),  # 28x28 items fill the frame: milder crops than ImageNet's 0.08
      num_workers=1,
      batch_size=128,
      base_learning_rate=0.2,
      lr_schedule="cosine",
      warmup_epochs=0.1,
      num_epochs=1.0,
      num_train_steps=300,  # the schedule above is fitted to these steps, whichever data is used
      weight_decay=5e-4,
      log_every_steps=20,
      eval_every_steps=100,
      checkpoint_every_steps=100,
  )
