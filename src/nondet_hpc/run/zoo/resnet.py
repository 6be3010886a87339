"""This package's CIFAR ResNets: the "resnet" family of registry/models.py (resnet14, resnet18b, resnet34).

"resnet" family (docs/study.md, "Training"). ResNet-14: 3x3 stem conv -> 16 + BN + ReLU, three
stages of 2 basic blocks (16/32/64 channels, strides 1/2/2), option-A shortcuts, global average
pool, linear 64 -> classes. ResNet-18/34: the same shape with four stages of 64/128/256/512
channels (2-2-2-2 / 3-4-6-3 blocks) and option-B (1x1 conv + BN) shortcuts, as in the usual CIFAR
ResNets.

Digits (1 x 8 x 8): the stem takes ``in_channels`` = 1 (1*16*9 = 144 stem weights instead of
432); strides 1/2/2 give 8 -> 4 -> 2 pixel feature maps before the global pool, so the network
is otherwise unchanged.

Init rule "kaiming_zero_residual" (``init_kaiming_zero_residual``) draws only from the init
stream's generator: kaiming normal (fan_out, relu) for convs, BN weight 1 / bias 0 except each
block's second BN weight 0, and PyTorch's default init for the linear layer re-drawn from the same
generator.

The network has ``forward_features`` (penultimate features, for CKA) and ``fc`` (the classifier
on them), as every model of the zoo. Parameter names are this package's (``layers.k.shortcut.bn``
where the authors write ``layer{i}.{j}.downsample.1``); run/train.py's ``authors`` rule gives their
name rule's outcome by module (tests/test_zoo_models.py compares it with their names).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ShortcutA(nn.Module):
    """Option A: stride-2 subsample of the input, BN, then zero channels up to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch
        self.bn = nn.BatchNorm2d(in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x[:, :, :: self.stride, :: self.stride])
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # zeros appended on the channel axis


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths: list[int], blocks: list[int], num_classes: int,
                 in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut={shortcut!r}: valid values are 'A' and 'B'")
        if len(widths) != len(blocks):
            raise ValueError(f"model.widths {widths} and model.blocks {blocks} need the same length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)  # the bit-change target (registry)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_ch = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(in_ch, w, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_ch = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)
        self.feature_dim = in_ch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (after the global average pool), for CKA."""
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        # A mean, not adaptive_avg_pool2d: the latter's CUDA backward has no deterministic kernel
        # and would abort every run under torch.use_deterministic_algorithms(True).
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@torch.no_grad()
def init_kaiming_zero_residual(model: nn.Module, g: torch.Generator) -> None:
    """Initialise every parameter and buffer from generator ``g`` (the init stream) alone."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            std = math.sqrt(2.0 / fan_out)  # kaiming normal, mode fan_out, relu gain
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1.0)
            m.bias.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()
        elif isinstance(m, nn.Linear):
            # PyTorch's default Linear init: kaiming_uniform(a=sqrt(5)) on the weight, which is
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 2 * bound - bound)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            m.bn2.weight.zero_()  # each block starts as the identity (zero-init residual)


def build_resnet(widths: list[int], blocks: list[int], shortcut: str, num_classes: int, in_channels: int,
                 g: torch.Generator | None) -> ResNet:
    """A "resnet"-family network, initialised from ``g`` (None: every tensor left unset).

    Built on the meta device, so construction consumes no random numbers from torch's global RNG;
    ``init_kaiming_zero_residual`` then fills every tensor from the init stream, in module order
    (the weights of version 0.1.0, bit for bit).
    """
    with torch.device("meta"):
        model = ResNet(list(widths), list(blocks), num_classes, in_channels, shortcut)
    model = model.to_empty(device="cpu")
    if g is not None:
        init_kaiming_zero_residual(model, g)
    return model
