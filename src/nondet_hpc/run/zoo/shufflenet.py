"""The authors' ShuffleNetV2 for CIFAR at sizes 0.5 and 1.0 (their shufflenetv2.py).

Stem: 3x3 conv (stride 1, no bias) to 24 channels, BN, ReLU. Three stages (``layer1..3``), each a
down block then ``num_blocks`` basic blocks:

- down block (stride 2, out channels c, each branch c/2): left = depthwise 3x3 stride 2, BN, 1x1
  conv, BN, ReLU; right = 1x1 conv, BN, ReLU, depthwise 3x3 stride 2, BN, 1x1 conv, BN, ReLU;
  concatenated, then a channel shuffle (2 groups).
- basic block: split the channels in halves; the second goes through 1x1 conv, BN, ReLU,
  depthwise 3x3, BN, 1x1 conv, BN, ReLU; concatenated with the first, then a channel shuffle.

Head: 1x1 conv to the last width (1024), BN, ReLU, average pool, ``linear``. No conv has a bias.
Names are theirs (``conv1``, ``bn1``, ``layer{1,2,3}.{k}.conv{1..5}/bn{1..5}``, ``conv2``, ``bn2``,
``linear``); their bit change: ``conv1.weight``. Init: PyTorch's defaults (run/zoo/rng.py).

Pooling: the authors average 4x4 windows, which for 32x32 inputs (4x4 after three stride-2
stages) is the global mean; here it is the global mean for any input size, so other sizes keep the
1024-wide head instead of failing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: size -> (stage widths, width of the head conv), (blocks per stage after the down block)
SIZES: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
}


def _shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: [N, g*k, H, W] -> channel order k-major."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)


def _pw(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=False)


class BasicUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        c = channels - self.half
        self.conv1, self.bn1 = _pw(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _dw(c, 1), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = _pw(c, c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, x = x[:, : self.half], x[:, self.half:]
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = F.relu(self.bn3(self.conv3(x)))
        return _shuffle(torch.cat([keep, x], 1))


class DownUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = _dw(c_in, 2), nn.BatchNorm2d(c_in)  # left branch
        self.conv2, self.bn2 = _pw(c_in, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _pw(c_in, mid), nn.BatchNorm2d(mid)  # right branch
        self.conv4, self.bn4 = _dw(mid, 2), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _pw(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    def __init__(self, size: float, in_channels: int, num_classes: int):
        super().__init__()
        if float(size) not in SIZES:
            raise ValueError(f"ShuffleNetV2 size {size}: valid sizes are {sorted(SIZES)}")
        widths, blocks = SIZES[float(size)]
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24)
        c = 24
        for i, (w, n) in enumerate(zip(widths[:3], blocks), start=1):
            self.add_module(f"layer{i}", nn.Sequential(DownUnit(c, w), *[BasicUnit(w) for _ in range(n)]))
            c = w
        self.conv2, self.bn2 = _pw(c, widths[3]), nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))
