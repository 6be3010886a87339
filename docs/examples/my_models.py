"""An example of "your own model" for nondet_hpc (docs/own_model.md): one file, one factory.

    python -m nondet_hpc -m model=custom model.factory=my_models:small_cnn \
        'model.kwargs={width: 16}' source=none,init,bitflip 'seed=range(1,7)'

The factory returns a torch.nn.Module mapping uint8-normalised images [B, C, H, W] to logits
[B, classes]. Build it on the CPU and draw any random numbers from torch's (or numpy's, or Python's)
global generator, as PyTorch's layers do: nondet_hpc calls it inside a fork of those generators
seeded from the run's init stream, so the init source varies the weights and nothing else does.
"""

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, a global average pool, a linear classifier."""

    def __init__(self, channels: int, classes: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))  # a mean, not AdaptiveAvgPool2d: deterministic on CUDA


def small_cnn(channels: int = 1, classes: int = 10, width: int = 16) -> nn.Module:
    """The factory: keyword arguments come from model.kwargs (defaults: the digits data set)."""
    return SmallCNN(channels, classes, width)
