"""The authors' CIFAR ResNets (resnet6 ... resnet1202, ResNet-14 at six widths, resnet18), by their names.

Shape (the authors' resnet_cifar.py): a 3x3 stem conv (no bias) to widths[0] channels, BN, ReLU;
one stage per width, each of ``blocks[i]`` basic blocks (3x3 conv, BN, ReLU, 3x3 conv, BN, add,
ReLU), the first block of every stage after the first with stride 2; global average pool; a
linear layer. Depth = 2 * sum(blocks) + 2 (resnet6 = one stage of 2 blocks).

Shortcut "option A" where the shape changes: the input subsampled with stride 2 (the authors use
a 1x1 average pool with stride 2, which takes every second pixel), a BN over its channels, then
zero channels appended up to the block's width. The authors append as many zero channels as
there are input channels, which is the same thing because every stage doubles the width; here
stage widths may only grow. Their parameter names are kept: ``conv1``/``bn1`` (stem),
``layer{i}.{j}.conv1/bn1/conv2/bn2`` (blocks), ``layer{i}.0.downsample.1`` (the shortcut's BN: its
name has no "bn", so their name rule trains its scale at the full learning rate) and ``fc``.

Init (``init_explicit``: the registry's ``kaiming_zero_residual`` rule), drawn from the init
stream alone: kaiming normal (fan_out, ReLU) for every conv, BN scale 1 and shift 0 except each
block's ``bn2`` scale, 0 (every block starts as the identity), and PyTorch's default uniform rule
for ``fc``. It draws in run/zoo/resnet.py's order, so these widths and blocks of [16, 32, 64] x
[2, 2, 2] start from exactly the weights of ``resnet14`` (this package's class) and compute the
same outputs (tests/test_zoo_models.py).

Digits/MNIST (1 channel) take a 1-channel stem; nothing else depends on the image size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import init_kaiming_zero_residual


class Subsample(nn.Module):
    """Every ``stride``-th pixel: what the authors' ``AvgPool2d(1, stride)`` computes (a 1x1 window)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]


class Block(nn.Module):
    """A basic block; ``downsample`` (option A) when the block changes the resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.extra = out_ch - in_ch  # zero channels the shortcut appends
        self.downsample = nn.Sequential(Subsample(stride), nn.BatchNorm2d(in_ch)) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else F.pad(self.downsample(x), (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, widths: list[int], blocks: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} need the same (non-zero) length")
        if any(b < a for a, b in zip(widths, widths[1:])) or min(blocks) < 1:
            raise ValueError(f"widths {widths} may only grow (the option-A shortcut appends zero channels) and "
                             f"every stage needs at least one block: {blocks}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)  # the bit-change target
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.num_stages, in_ch = len(widths), widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [Block(in_ch, w, 1 if i == 0 else 2)] + [Block(w, w, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            in_ch = w
        self.fc = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the global average pool), for CKA."""
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i}")(x)
        # A mean, not adaptive_avg_pool2d: the latter's CUDA backward has no deterministic kernel.
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@torch.no_grad()
def init_explicit(model: CifarResNet, g: torch.Generator) -> None:
    """The kaiming_zero_residual rule (module docstring), from generator ``g`` alone."""
    init_kaiming_zero_residual(model, g)
    for m in model.modules():
        if isinstance(m, Block):
            m.bn2.weight.zero_()


def build_cifar_resnet(widths: list[int], blocks: list[int], num_classes: int, in_channels: int,
                       g: torch.Generator) -> CifarResNet:
    """An initialised network. Built on the meta device, so construction draws no random numbers."""
    with torch.device("meta"):
        model = CifarResNet(list(widths), list(blocks), num_classes, in_channels)
    model = model.to_empty(device="cpu")
    init_explicit(model, g)
    return model
