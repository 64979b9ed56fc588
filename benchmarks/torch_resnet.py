"""A PyTorch ResNet-50 train step: train_step.py's reference rows, not part of dfpjax.

ResNet-50 v1.5 (stride on the 3x3 convolution) in torchvision's layout, written here so that
torchvision is not needed; channels_last, SGD with momentum, in FP32 or under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand, plus the input (projected where the shape changes)."""

  def __init__(self, cin: int, width: int, stride: int):
    super().__init__()
    cout = 4 * width
    self.body = nn.Sequential(
        nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
        nn.ReLU(inplace=True), nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
    self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                 if stride != 1 or cin != cout else nn.Identity())

  def forward(self, x):
    return (self.body(x) + self.proj(x)).relu_()


def resnet50(num_classes: int) -> nn.Sequential:
  """ResNet-50 v1.5; 25,557,032 parameters at 1000 classes, as torchvision's."""
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for stage, blocks in enumerate((3, 4, 6, 3)):
    for block in range(blocks):
      layers.append(Bottleneck(cin, 64 * 2**stage, 2 if stage and not block else 1))
      cin = 256 * 2**stage
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes)]
  return nn.Sequential(*layers)


def make_train_step(batch: int, image_size: int, num_classes: int, bf16: bool):
  """A zero-argument function that runs one train step on a fixed random batch, and a note
  (torch version, threads, parameter count) for the report."""
  torch.manual_seed(0)
  model = resnet50(num_classes).to(memory_format=torch.channels_last).train()
  # The examples' recipe: SGD, momentum 0.9, weight decay 1e-4 (here on every parameter).
  opt = torch.optim.SGD(model.parameters(), lr=0.1 * batch / 256, momentum=0.9,
                        weight_decay=1e-4)
  x = torch.randn(batch, 3, image_size, image_size).to(memory_format=torch.channels_last)
  y = torch.randint(0, num_classes, (batch,))

  def run_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  params = sum(p.numel() for p in model.parameters())
  note = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {params:,} parameters"
  return run_step, note
