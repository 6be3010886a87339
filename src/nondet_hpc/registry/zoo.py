"""The authors' architectures, each declared once: name, family, shape, init rule, bit-change target.

Torch-free: the config layer, the docs and ``--help`` read this table; run/zoo/build.py maps each
``family`` to the code that builds it. Names are the authors' (their models.py), with two
prefixes where a bare name would be ambiguous here: their ImageNet models are ``imagenet_resnet*``
(as in their models.py), and today's option-B CIFAR ResNet-18 of this package is ``resnet18b``
(not in this table: it keeps its own class in run/models.py) because ``resnet18`` is theirs,
option A.

Fields of an entry:

- ``family``: linear | hidden_fc | hidden_conv | mnist_cnn | cifar_resnet | vgg | shufflenet_v2 |
  torchvision_resnet (run/zoo/build.py FAMILIES).
- ``options``: the family's shape values (widths and blocks, VGG depth, ShuffleNet size, ...).
- ``init``: ``explicit`` = kaiming normal fan_out for convs, BN 1/0, each residual branch's last BN
  scale 0, PyTorch's default for the linear layer, drawn from the init stream; ``torch_default``
  = PyTorch's (or torchvision's) own init, run inside a global-RNG fork seeded by one draw of the
  init stream (run/zoo/rng.py). Either way only the init stream decides the initial weights.
- ``bitflip_param``: the weight the bit change touches: the first layer's weight, by the
  authors' parameter name (their train.py offers conv1.weight, fc.weight, fc1.weight and
  features.0.weight).
- ``dataset`` and ``in_shape``: the data the authors trained it on; ``params``: the parameter count
  there (10 classes; 1000 for ImageNet), checked by tests/test_zoo_models.py against a
  re-implementation of their definitions. Other input shapes change the first or the last
  layer only (see each family's module).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The image shapes [C, H, W] of the authors' datasets.
CIFAR, MNIST, IMAGENET64 = (3, 32, 32), (1, 28, 28), (3, 64, 64)


@dataclass(frozen=True)
class ZooModel:
    name: str  # model=NAME
    family: str  # which builder (run/zoo/build.py FAMILIES)
    options: dict[str, Any] = field(default_factory=dict)  # the family's shape values
    init: str = "torch_default"  # explicit | torch_default (module docstring)
    bitflip_param: str = "conv1.weight"  # the parameter the bit change touches
    dataset: str = "cifar10"  # the authors' dataset for it
    in_shape: tuple[int, int, int] = CIFAR  # [C, H, W] of that dataset (ImageNet: our 64x64 folders)
    num_classes: int = 10  # classes of that dataset
    params: int = 0  # parameter count on that dataset (num_classes outputs)
    doc: str = ""  # one line for --help and the docs


def _resnet(name: str, widths: list[int], blocks: list[int], params: int, doc: str) -> ZooModel:
    return ZooModel(name, "cifar_resnet", {"widths": widths, "blocks": blocks}, "explicit", "conv1.weight",
                    params=params, doc=doc)


_W = [16, 32, 64]

MODELS: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("linearnet", "linear", {}, bitflip_param="fc.weight", params=30_730,
             doc="linear classifier on the flattened image (convex in its weights)"),
    ZooModel("hiddennet1", "hidden_fc", {"hidden": 512}, bitflip_param="fc1.weight", params=1_578_506,
             doc="one hidden fully connected layer of 512 units, ReLU"),
    ZooModel("hiddennet2", "hidden_conv", {"channels": 64}, bitflip_param="conv1.weight", params=168_714,
             doc="one hidden 5x5 stride-2 conv layer of 64 channels, ReLU, linear"),
    _resnet("resnet6", [16], [2], 9_978, "CIFAR ResNet, one stage of 2 blocks (16 channels)"),
    _resnet("resnet10", [16, 32], [2, 2], 42_682, "CIFAR ResNet, 2 stages (16/32 channels)"),
    _resnet("resnet14", _W, [2, 2, 2], 172_602, "CIFAR ResNet-14, option-A shortcuts (the paper's model)"),
    _resnet("resnet14_0125", [2, 4, 8], [2, 2, 2], 2_936, "ResNet-14 at 1/8 width (2/4/8 channels)"),
    _resnet("resnet14_025", [4, 8, 16], [2, 2, 2], 11_190, "ResNet-14 at 1/4 width (4/8/16 channels)"),
    _resnet("resnet14_050", [8, 16, 32], [2, 2, 2], 43_682, "ResNet-14 at 1/2 width (8/16/32 channels)"),
    _resnet("resnet14_2", [32, 64, 128], [2, 2, 2], 686_186, "ResNet-14 at 2x width (32/64/128 channels)"),
    _resnet("resnet14_4", [64, 128, 256], [2, 2, 2], 2_736_330, "ResNet-14 at 4x width (64/128/256 channels)"),
    _resnet("resnet14_8", [128, 256, 512], [2, 2, 2], 10_928_522, "ResNet-14 at 8x width (128/256/512 channels)"),
    _resnet("resnet18", [64, 128, 256, 512], [2, 2, 2, 2], 11_001_034,
            "CIFAR ResNet-18 with option-A shortcuts (the authors'; option B is resnet18b)"),
    _resnet("resnet20", _W, [3, 3, 3], 269_818, "CIFAR ResNet-20 (3 blocks per stage)"),
    _resnet("resnet32", _W, [5, 5, 5], 464_250, "CIFAR ResNet-32 (5 blocks per stage)"),
    _resnet("resnet44", _W, [7, 7, 7], 658_682, "CIFAR ResNet-44 (7 blocks per stage)"),
    _resnet("resnet56", _W, [9, 9, 9], 853_114, "CIFAR ResNet-56 (9 blocks per stage)"),
    _resnet("resnet110", _W, [18, 18, 18], 1_728_058, "CIFAR ResNet-110 (18 blocks per stage)"),
    _resnet("resnet1202", _W, [200, 200, 200], 19_421_370, "CIFAR ResNet-1202 (200 blocks per stage)"),
    ZooModel("vgg11", "vgg", {"depth": 11}, bitflip_param="features.0.weight", params=9_231_114,
             doc="VGG-11 with BN (CIFAR: one linear layer on 512 features)"),
    ZooModel("vgg13", "vgg", {"depth": 13}, bitflip_param="features.0.weight", params=9_416_010,
             doc="VGG-13 with BN (CIFAR)"),
    ZooModel("vgg16", "vgg", {"depth": 16}, bitflip_param="features.0.weight", params=14_728_266,
             doc="VGG-16 with BN (CIFAR)"),
    ZooModel("shufflenet05", "shufflenet_v2", {"size": 0.5}, params=352_042, doc="ShuffleNetV2 0.5x (CIFAR)"),
    ZooModel("shufflenet1", "shufflenet_v2", {"size": 1.0}, params=1_263_854, doc="ShuffleNetV2 1.0x (CIFAR)"),
    ZooModel("mnistlinearnet", "linear", {}, bitflip_param="fc.weight", dataset="mnist", in_shape=MNIST,
             params=7_850, doc="linear classifier on MNIST's 784 pixels"),
    ZooModel("mnisthiddennet1", "hidden_fc", {"hidden": 512}, bitflip_param="fc1.weight", dataset="mnist",
             in_shape=MNIST, params=407_050, doc="MNIST: one hidden fully connected layer of 512 units"),
    ZooModel("mnisthiddennet2", "hidden_conv", {"channels": 64}, bitflip_param="conv1.weight", dataset="mnist",
             in_shape=MNIST, params=127_114, doc="MNIST: one hidden 5x5 stride-2 conv layer of 64 channels"),
    ZooModel("mnistnet", "mnist_cnn", {}, bitflip_param="conv1.weight", dataset="mnist", in_shape=MNIST,
             params=1_199_882, doc="MNIST CNN: two 3x3 convs (32, 64), max-pool, 128 hidden units"),
    ZooModel("imagenet_resnet18", "torchvision_resnet", {"depth": 18}, dataset="imagenet", in_shape=IMAGENET64,
             num_classes=1000, params=11_689_512, doc="torchvision ResNet-18 (64x64 image folders here)"),
    ZooModel("imagenet_resnet34", "torchvision_resnet", {"depth": 34}, dataset="imagenet", in_shape=IMAGENET64,
             num_classes=1000, params=21_797_672, doc="torchvision ResNet-34 (64x64 image folders here)"),
    ZooModel("imagenet_resnet50", "torchvision_resnet", {"depth": 50}, dataset="imagenet", in_shape=IMAGENET64,
             num_classes=1000, params=25_557_032, doc="torchvision ResNet-50 (64x64 image folders here)"),
)}

#: Init rules, by name (ZooModel.init).
INIT_RULES = ("explicit", "torch_default")

#: The researcher's own model: model=custom model.factory=package.module:function (run/zoo/custom.py).
CUSTOM = "custom"
