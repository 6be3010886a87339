"""The authors' VGG-11/13/16 for CIFAR (their vgg.py, after kuangliu/pytorch-cifar).

``features``: for each number in the layer list a 3x3 conv with padding 1 and a bias, a BN and a
ReLU; for each "M" a 2x2 max-pool with stride 2; then a 1x1 average pool with stride 1 (the
identity, kept so the module list matches theirs). ``classifier``: one linear layer. Parameter
names are theirs: ``features.{k}.weight/bias`` for convs AND BNs (no "bn" in any name, so their
name rule trains BN scales at the full learning rate; biases at the small one) and
``classifier``. Their bit change: ``features.0.weight``, the first conv's weight.

Input: five max-pools divide each side by 32, so images need sides of at least 32 (a multiple of
32 uses every pixel). The authors hard-code the classifier's input as 512 (32x32 images); here it
is 512 * (H // 32) * (W // 32), the same for CIFAR. Init: PyTorch's defaults (run/zoo/rng.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: Convolution widths and max-pools ("M") of each depth.
LAYERS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _features(plan: list, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_channels
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, item, kernel_size=3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            c = item
    layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, depth: int, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"VGG depth {depth}: valid depths are {sorted(LAYERS)}")
        c, h, w = in_shape
        pools = LAYERS[depth].count("M")
        if h >> pools == 0 or w >> pools == 0:
            raise ValueError(f"VGG-{depth} halves the image {pools} times: it needs sides of at least "
                             f"{1 << pools} pixels, got {h}x{w}")
        self.features = _features(LAYERS[depth], c)
        self.feature_dim = 512 * (h >> pools) * (w >> pools)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
