"""Models a researcher might bring (model=custom model.factory=custom_nets:NAME), for
tests/test_custom_model.py. Plain PyTorch, no nondet_hpc import: what a user's file looks like."""

import torch
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, channels: int, classes: int, width: int, p_drop: float):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(p_drop)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        return self.head(self.drop(x.mean(dim=(2, 3))))


def tiny_cnn(channels: int = 1, classes: int = 10, width: int = 8, p_drop: float = 0.0) -> nn.Module:
    return TinyCNN(channels, classes, width, p_drop)


class Unpooling(nn.Module):
    """Max-unpooling has no deterministic kernel (PyTorch refuses it under deterministic algorithms)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, idx = self.pool(self.conv(x))
        return self.fc(self.unpool(y, idx).mean(dim=(2, 3)))


def unpooling_net(classes: int = 10) -> nn.Module:
    return Unpooling(classes)


def adaptive_net(classes: int = 10) -> nn.Module:
    """AdaptiveAvgPool2d: its CUDA backward has no deterministic kernel (fine on the CPU)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
