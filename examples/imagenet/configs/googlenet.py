"""GoogLeNet (Inception v1) on ImageNet.

The paper's recipe (Szegedy et al. 2015): momentum 0.9 and the learning rate cut by 4% every
8 epochs; the rest follows Caffe's bvlc_googlenet (0.01 at batch 32, i.e. 0.08 per 256 images,
weight decay 2e-4, 60 epochs). The auxiliary heads are off; enable them with
``model_kwargs={"aux_logits": True}`` (their losses are weighted by ``aux_loss_weight``).
"""

from examples.imagenet.configs.base import Config


def get_config() -> Config:
  return Config(
      model="googlenet",
      base_learning_rate=0.08,
      warmup_epochs=0.0,
      num_epochs=60.0,
      lr_decay_epochs=tuple(float(e) for e in range(8, 60, 8)),
      lr_decay_factor=0.96,
      weight_decay=2e-4,
  )
