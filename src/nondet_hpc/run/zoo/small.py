"""The authors' small models: linear, one hidden layer (fully connected or conv), the MNIST CNN.

The authors define each twice, for CIFAR-10 (3x32x32) and for MNIST (1x28x28), with the flattened
sizes written out for that input (32*32*3, 16*16*64, 28*28*1, 14*14*64, 9216). Here the input
shape [C, H, W] is a constructor argument and those sizes are computed from it; for the authors'
inputs they are the authors' numbers. Parameter names are theirs (``fc``, ``fc1``, ``fc2``,
``conv1``, ``conv2``): their optimiser groups and bit change go by name. Every layer keeps
PyTorch's default initialisation (run/zoo/rng.py draws it from the init stream).

- ``LinearNet`` (linearnet, mnistlinearnet): ``fc``: C*H*W -> classes. Convex in its weights.
- ``HiddenFC`` (hiddennet1, mnisthiddennet1): ``fc1``: C*H*W -> 512, ReLU, ``fc2``: 512 -> classes.
- ``HiddenConv`` (hiddennet2, mnisthiddennet2): ``conv1``: 5x5, stride 2, padding 2, C -> 64, with
  bias, ReLU, ``fc1``: 64 * ceil(H/2) * ceil(W/2) -> classes.
- ``MnistCNN`` (mnistnet): ``conv1`` 3x3 C -> 32, ReLU, ``conv2`` 3x3 32 -> 64, ReLU (no padding),
  2x2 max-pool, ``fc1``: 64 * ((H-4)//2) * ((W-4)//2) -> 128, ReLU, ``fc2``: 128 -> classes (no
  dropout: the authors' version has none).

``forward_features`` is the input of the last linear layer (for CKA); for ``LinearNet`` that is
the flattened image itself, the same for every model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Shape = tuple[int, int, int]  # [C, H, W]


def _flat(shape: Shape) -> int:
    c, h, w = shape
    return c * h * w


class LinearNet(nn.Module):
    def __init__(self, in_shape: Shape, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(_flat(in_shape), num_classes)
        self.feature_dim = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class HiddenFC(nn.Module):
    def __init__(self, in_shape: Shape, num_classes: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(_flat(in_shape), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(torch.flatten(x, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.forward_features(x))


class HiddenConv(nn.Module):
    def __init__(self, in_shape: Shape, num_classes: int, channels: int = 64):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, channels, kernel_size=5, stride=2, padding=2, bias=True)
        # a 5x5 stride-2 conv with padding 2 maps n pixels to ceil(n / 2)
        self.fc1 = nn.Linear(channels * ((h + 1) // 2) * ((w + 1) // 2), num_classes)
        self.feature_dim = self.fc1.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.relu(self.conv1(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.forward_features(x))


class MnistCNN(nn.Module):
    def __init__(self, in_shape: Shape, num_classes: int):
        super().__init__()
        c, h, w = in_shape
        if h < 6 or w < 6:
            raise ValueError(f"mnistnet needs images of at least 6x6 pixels, got {h}x{w}")
        self.conv1 = nn.Conv2d(c, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.fc1 = nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128)  # 9216 for 28x28
        self.fc2 = nn.Linear(128, num_classes)
        self.feature_dim = 128

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.forward_features(x))
