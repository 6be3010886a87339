"""torchvision's ImageNet ResNet-18/34/50, as the authors use them (their imagenet_models.py).

The authors call ``torchvision.models.resnet18()`` (34, 50) with the defaults: no pretrained
weights, 1000 classes, torchvision's own init (kaiming normal fan_out for convs, BN 1/0, PyTorch's
default for the linear layer, no zero-init of residual BNs), drawn from the global RNG they
seeded with the init seed. Here the same classes are constructed the same way (torchvision's
public ``ResNet`` with its ``BasicBlock``/``Bottleneck`` and the published block counts) inside the
init stream's fork (run/zoo/rng.py), with ``num_classes`` from the dataset.

Two additions, neither changing names, parameters or the initial weights: ``forward_features``
(the pooled features, for CKA), and the pool ``avgpool`` computes a mean over height and width
instead of torchvision's ``AdaptiveAvgPool2d((1, 1))`` (the same numbers to float rounding):
the latter's CUDA backward has no deterministic kernel, so a run with deterministic kernels
(every source but cuDNN) would stop at the first step. Any input of at least 32x32 works; the
package uses them on 64x64 image folders (ImageNet at full scale is out of scope).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

#: depth -> (block type, blocks per stage): torchvision's resnet18/34/50.
ARCHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3])}


class GlobalMean(nn.Module):
    """[N, C, H, W] -> [N, C, 1, 1], the mean over H and W (deterministic backward on CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class TorchvisionResNet(ResNet):
    def __init__(self, depth: int, in_channels: int, num_classes: int):
        if depth not in ARCHS:
            raise ValueError(f"torchvision ResNet depth {depth}: valid depths are {sorted(ARCHS)}")
        block, layers = ARCHS[depth]
        super().__init__(block, layers, num_classes=num_classes)
        if in_channels != 3:  # replaced after torchvision's init: one more draw from the same fork
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.avgpool = GlobalMean()
        self.feature_dim = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
