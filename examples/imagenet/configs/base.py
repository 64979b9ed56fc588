"""The training configuration shared by every config file."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyper-parameters of one run; ``main.py`` flags override single fields.

  Epoch counts (``num_epochs``, ``warmup_epochs``, ``lr_decay_epochs``) define the learning-rate
  schedule; when ``num_train_steps`` is set the schedule is stretched or squeezed to that many
  steps, so a short run still warms up and decays.
  """
  # Model.
  model: str = "resnet50"
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  dtype: str = "float32"
  # Data (see input_pipeline.DATASETS).
  dataset: str = "imagenet_folder"
  data_dir: str | None = None
  image_size: int = 224
  crop_scale: tuple[float, float] = (0.08, 1.0)
  num_workers: int = 8
  # Optimisation: SGD with momentum, weight decay on kernels only.
  batch_size: int = 256
  base_learning_rate: float = 0.1  # for 256 images; scaled linearly with batch_size
  lr_schedule: str = "step"  # "step" or "cosine", after a linear warm-up from 0
  warmup_epochs: float = 5.0
  num_epochs: float = 90.0
  lr_decay_epochs: tuple[float, ...] = (30.0, 60.0, 80.0)  # "step" only
  lr_decay_factor: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-4
  aux_loss_weight: float = 0.3  # GoogLeNet's auxiliary heads, when enabled
  # Loop.
  num_train_steps: int = -1  # -1: num_epochs of the training set
  log_every_steps: int = 100
  eval_every_steps: int = -1  # -1: once per epoch
  checkpoint_every_steps: int = -1  # -1: once per epoch
  max_checkpoints: int = 3
  seed: int = 0
  # XLA:CPU's memory-optimized schedule for the jitted steps (train.compiler_options): the same
  # bits with fewer buffers alive; off, XLA's default schedule, which orders for concurrency.
  memory_optimized_schedule: bool = True
  # BatchNorm's and the head's sums over the batch by dfpjax.reproducible_sum (ResNets only,
  # examples/imagenet/batch_sums.py): a step's bits then do not depend on the device count
  # (with dfp; FP32's products stay float sums); off, XLA's float sums.
  reproducible_batch_sums: bool = False
  # DFP runs' state split over the devices ZeRO-style (parallel.DataParallel.state_sharding):
  # each device keeps and updates a block of every convolution kernel, the same bits; it saves
  # memory, not time (docs/examples.md), so off: replicated.
  shard_state: bool = False
  # DFP (dfpjax.DFPConfig); off trains in FP32.
  dfp: bool = False
  dfp_bits: int = 16
  dfp_rounding: str = "nearest"
  dfp_headroom: int = 0  # 2 is the paper's exponent choice (dfpjax.QuantConfig.headroom)
  dfp_keep_float: tuple[str, ...] = ()
