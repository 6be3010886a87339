"""The networks a run can train: each declared once, from a convex linear model to deep ResNets.

A *family* is one builder (run/zoo/build.py ``FAMILIES``) and the config schema of its keys
(``FAMILIES`` below, schemas in config.py); a *model* is a named choice of those keys, offered as
``model=NAME``. Everything that names a model reads ``MODELS``: the config options
(registry/options.py), the builder and init rule run/zoo uses, the parameter the bit change
touches (run/task.py), the cost model (presets.py), ``--help`` and the docs (docs/models.md).

Adding a model of an existing family is one entry below. Adding a family is a schema in
config.py, a builder in run/zoo/build.py, and its entries here. The keys of ``cfg.model`` are the
entry's name and options: they make the run id, while the family, init rule and bit-change
parameter are looked up here by name and are not part of it.

Names are the authors' (their models.py) except where a bare name would be ambiguous: their
ImageNet ResNets are ``imagenet_resnet*``, and this package's earlier option-B CIFAR ResNet-18 is
``resnet18b`` because ``resnet18`` is theirs (option A, 11,001,034 parameters). ``resnet14`` and
``resnet34`` are this package's classes (run/models.py: the same ids, weights and bits as
before); ``resnet14`` is the authors' ResNet-14 tensor for tensor (tests/test_zoo_models.py).

Fields of an entry (``Model``):

- ``init``: ``kaiming_zero_residual`` = kaiming normal fan_out for convs, BN 1/0, each residual
  branch's last BN scale 0, PyTorch's default rule for the linear layer, drawn from the init
  stream's generator; ``torch_default`` = PyTorch's (or torchvision's) own init, run inside a
  global-RNG fork seeded by one draw of the init stream (run/zoo/rng.py); ``factory`` = the
  researcher's constructor, in that same fork. Either way only the init stream decides the weights.
- ``bitflip``: the weight the one-ulp bit change touches: the first layer's weight, by the
  authors' parameter name (their train.py offers conv1.weight, fc.weight, fc1.weight and
  features.0.weight); ``None`` (model=custom): the first weight in registration order, or
  ``source.bitflip_param``.
- ``dataset``, ``in_shape``, ``num_classes``, ``params``: the data the authors trained it on and
  its parameter count there, checked against a re-implementation of their definitions
  (tests/test_zoo_models.py). Other input shapes change the first or the last layer only.
- ``macs``: (multiply-accumulates of one 3x32x32 forward pass without the classifier, classifier
  inputs), counted with forward hooks (tests/test_experiments.py): the cost model of presets.py,
  which is CIFAR-10's (50,000 images of 32x32); None for the MNIST and ImageNet models (seconds
  on a CPU / not this cost model) and for model=custom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..config import (CifarResNetConfig, ConfigError, CustomConfig, HiddenConvConfig, HiddenFCConfig, ModelConfig,
                      ResNetConfig, ShuffleNetConfig, TorchvisionResNetConfig, VGGConfig)

#: family -> the schema of its ``model.*`` keys (its builder: run/zoo/build.py FAMILIES)
FAMILIES: dict[str, type[ModelConfig]] = {
    "resnet": ResNetConfig,  # this package's CIFAR ResNet class (run/models.py): shortcut A or B
    "cifar_resnet": CifarResNetConfig,  # the authors' CIFAR ResNets, option A (run/zoo/cifar_resnet.py)
    "linear": ModelConfig,
    "hidden_fc": HiddenFCConfig,
    "hidden_conv": HiddenConvConfig,
    "mnist_cnn": ModelConfig,
    "vgg": VGGConfig,
    "shufflenet_v2": ShuffleNetConfig,
    "torchvision_resnet": TorchvisionResNetConfig,
    "custom": CustomConfig,  # the researcher's own nn.Module (run/zoo/custom.py)
}

#: init rule -> what it does (the module docstring); run/zoo/build.py FAMILY_INIT says which
#: family implements which
INIT_RULES: dict[str, str] = {
    "kaiming_zero_residual": "kaiming normal (fan_out) convs, BN 1/0, last BN of each residual branch 0, "
                             "default-rule linear layer, drawn from the init stream",
    "torch_default": "PyTorch's/torchvision's own init, inside a global-RNG fork seeded from the init stream",
    "factory": "the researcher's constructor, inside a global-RNG fork seeded from the init stream",
}

#: The image shapes [C, H, W] of the authors' datasets (ImageNet: the 64x64 image folders used here).
CIFAR, MNIST, IMAGENET64 = (3, 32, 32), (1, 28, 28), (3, 64, 64)
#: The model a researcher brings: model=custom model.factory=package.module:function
CUSTOM = "custom"


@dataclass(frozen=True)
class Model:
    name: str  # the option model=NAME, and cfg.model.name (the run id's model part)
    family: str  # a FAMILIES key: the schema of cfg.model and the builder in run/zoo/build.py
    options: Mapping[str, Any]  # the family's keys of cfg.model (resnet: widths, blocks, shortcut)
    init: str  # an INIT_RULES key (draws only from the init stream)
    bitflip: Optional[str]  # the parameter (a name in model.named_parameters()) the bit change moves
    macs: Optional[tuple[int, int]]  # (body MACs of a 3x32x32 forward, classifier inputs); None: no estimate
    doc: str  # one line: what the network is (docs/models.md, docs/configuration.md, --help)
    dataset: str = "cifar10"  # the authors' dataset for it
    in_shape: tuple[int, int, int] = CIFAR  # [C, H, W] of that dataset
    num_classes: int = 10  # classes of that dataset
    params: int = 0  # parameter count on that dataset (0: not fixed, model=custom)
    group: str = field(default="", compare=False)  # the docs' family heading


def _resnet(name: str, widths: list[int], blocks: list[int], params: int, macs: tuple[int, int], doc: str) -> Model:
    return Model(name, "cifar_resnet", {"widths": tuple(widths), "blocks": tuple(blocks)}, "kaiming_zero_residual",
                 "conv1.weight", macs, doc, params=params, group="CIFAR ResNets (the authors', option A)")


def _small(name: str, family: str, options: dict, bitflip: str, params: int, macs: tuple[int, int] | None, doc: str,
           mnist: bool = False) -> Model:
    return Model(name, family, options, "torch_default", bitflip, macs, doc, dataset="mnist" if mnist else "cifar10",
                 in_shape=MNIST if mnist else CIFAR, params=params,
                 group="MNIST models" if mnist else "Small models: linear, one hidden layer")


_W = (16, 32, 64)
_OURS = "CIFAR ResNets of this package (earlier versions' run ids)"

MODELS: dict[str, Model] = {m.name: m for m in (
    # --- this package's classes: ids, weights and results as in version 0.1.0
    Model("resnet14", "resnet", {"widths": _W, "blocks": (2, 2, 2), "shortcut": "A"},
          "kaiming_zero_residual", "conv1.weight", (26_394_624, 64),
          "the paper's ResNet-14 (CIFAR style): 3x3 stem -> 16, three stages of 2 basic blocks, 16/32/64 "
          "channels, option-A shortcuts (stride-2 subsample + BN + zero channels); ~0.17M parameters",
          params=172_602, group=_OURS),
    Model("resnet18b", "resnet", {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "shortcut": "B"},
          "kaiming_zero_residual", "conv1.weight", (555_417_600, 512),
          "ResNet-18, CIFAR style with option-B shortcuts (1x1 conv + BN where the shape changes): "
          "64/128/256/512 channels, 2-2-2-2 basic blocks; ~11.2M parameters (this package's model=resnet18 "
          "in version 0.1.0; the authors' resnet18 is option A)", params=11_173_962, group=_OURS),
    Model("resnet34", "resnet", {"widths": (64, 128, 256, 512), "blocks": (3, 4, 6, 3), "shortcut": "B"},
          "kaiming_zero_residual", "conv1.weight", (1_159_397_376, 512),
          "ResNet-34, CIFAR style (the report's Table 1): 64/128/256/512 channels, 3-4-6-3 basic blocks, "
          "1x1-conv + BN shortcuts where the shape changes; ~21M parameters", params=21_282_122, group=_OURS),
    # --- the authors' small CIFAR models
    _small("linearnet", "linear", {}, "fc.weight", 30_730, (0, 3072),
           "linear classifier on the flattened image (convex in its weights)"),
    _small("hiddennet1", "hidden_fc", {"hidden": 512}, "fc1.weight", 1_578_506, (1_572_864, 512),
           "one hidden fully connected layer of 512 units, ReLU"),
    _small("hiddennet2", "hidden_conv", {"channels": 64}, "conv1.weight", 168_714, (1_228_800, 16_384),
           "one hidden 5x5 stride-2 conv layer of 64 channels, ReLU, then the linear classifier"),
    # --- the authors' CIFAR ResNets
    _resnet("resnet6", [16], [2], 9_978, (9_879_552, 16), "CIFAR ResNet-6: one stage of 2 blocks (16 channels)"),
    _resnet("resnet10", [16, 32], [2, 2], 42_682, (18_137_088, 32), "CIFAR ResNet-10: 2 stages (16/32 channels)"),
    _resnet("resnet14_0125", [2, 4, 8], [2, 2, 2], 2_936, (460_800, 8), "ResNet-14 at 1/8 width (2/4/8 channels)"),
    _resnet("resnet14_025", [4, 8, 16], [2, 2, 2], 11_190, (1_732_608, 16), "ResNet-14 at 1/4 width (4/8/16)"),
    _resnet("resnet14_050", [8, 16, 32], [2, 2, 2], 43_682, (6_709_248, 32), "ResNet-14 at 1/2 width (8/16/32)"),
    _resnet("resnet14_2", [32, 64, 128], [2, 2, 2], 686_186, (104_693_760, 128),
            "ResNet-14 at 2x width (32/64/128 channels)"),
    _resnet("resnet14_4", [64, 128, 256], [2, 2, 2], 2_736_330, (417_005_568, 256),
            "ResNet-14 at 4x width (64/128/256 channels)"),
    _resnet("resnet14_8", [128, 256, 512], [2, 2, 2], 10_928_522, (1_664_483_328, 512),
            "ResNet-14 at 8x width (128/256/512 channels)"),
    _resnet("resnet18", [64, 128, 256, 512], [2, 2, 2, 2], 11_001_034, (549_126_144, 512),
            "the authors' CIFAR ResNet-18: option-A shortcuts, 64/128/256/512 channels (option B: resnet18b)"),
    _resnet("resnet20", _W, [3, 3, 3], 269_818, (40_550_400, 64), "CIFAR ResNet-20 (3 blocks per stage)"),
    _resnet("resnet32", _W, [5, 5, 5], 464_250, (68_861_952, 64), "CIFAR ResNet-32 (5 blocks per stage)"),
    _resnet("resnet44", _W, [7, 7, 7], 658_682, (97_173_504, 64), "CIFAR ResNet-44 (7 blocks per stage)"),
    _resnet("resnet56", _W, [9, 9, 9], 853_114, (125_485_056, 64), "CIFAR ResNet-56 (9 blocks per stage)"),
    _resnet("resnet110", _W, [18, 18, 18], 1_728_058, (252_887_040, 64), "CIFAR ResNet-110 (18 blocks per stage)"),
    _resnet("resnet1202", _W, [200, 200, 200], 19_421_370, (2_829_238_272, 64),
            "CIFAR ResNet-1202 (200 blocks per stage)"),
    # --- VGG and ShuffleNetV2 (CIFAR)
    Model("vgg11", "vgg", {"depth": 11}, "torch_default", "features.0.weight", (152_764_416, 512),
          "VGG-11 with BN (CIFAR: one linear layer on 512 features)", params=9_231_114, group="VGG and ShuffleNetV2"),
    Model("vgg13", "vgg", {"depth": 13}, "torch_default", "features.0.weight", (228_261_888, 512),
          "VGG-13 with BN (CIFAR)", params=9_416_010, group="VGG and ShuffleNetV2"),
    Model("vgg16", "vgg", {"depth": 16}, "torch_default", "features.0.weight", (313_196_544, 512),
          "VGG-16 with BN (CIFAR)", params=14_728_266, group="VGG and ShuffleNetV2"),
    Model("shufflenet05", "shufflenet_v2", {"size": 0.5}, "torch_default", "conv1.weight", (10_891_776, 1024),
          "ShuffleNetV2 0.5x (CIFAR)", params=352_042, group="VGG and ShuffleNetV2"),
    Model("shufflenet1", "shufflenet_v2", {"size": 1.0}, "torch_default", "conv1.weight", (44_991_872, 1024),
          "ShuffleNetV2 1.0x (CIFAR)", params=1_263_854, group="VGG and ShuffleNetV2"),
    # --- the authors' MNIST models
    _small("mnistlinearnet", "linear", {}, "fc.weight", 7_850, None,
           "linear classifier on MNIST's 784 pixels", mnist=True),
    _small("mnisthiddennet1", "hidden_fc", {"hidden": 512}, "fc1.weight", 407_050, None,
           "MNIST: one hidden fully connected layer of 512 units", mnist=True),
    _small("mnisthiddennet2", "hidden_conv", {"channels": 64}, "conv1.weight", 127_114, None,
           "MNIST: one hidden 5x5 stride-2 conv layer of 64 channels", mnist=True),
    _small("mnistnet", "mnist_cnn", {}, "conv1.weight", 1_199_882, None,
           "MNIST CNN: two 3x3 convs (32, 64), max-pool, 128 hidden units", mnist=True),
    # --- torchvision's ImageNet ResNets (64x64 image folders here; ImageNet at full scale is out of scope)
    *(Model(f"imagenet_resnet{d}", "torchvision_resnet", {"depth": d}, "torch_default", "conv1.weight", macs,
            f"torchvision ResNet-{d} (ImageNet's stem and stages; used on 64x64 image folders here)",
            dataset="imagenet", in_shape=IMAGENET64, num_classes=1000, params=params, group="ImageNet ResNets")
      for d, params, macs in ((18, 11_689_512, None), (34, 21_797_672, None), (50, 25_557_032, None))),
    # --- the researcher's own
    Model(CUSTOM, "custom", {}, "factory", None, None,
          "your own nn.Module: model=custom model.factory=package.module:function model.kwargs={...} "
          "(docs/own_model.md)", dataset="", in_shape=(0, 0, 0), num_classes=0, group="Your own model"),
)}


def model_entry(name: str) -> Model:
    """The registered model called ``name`` (``cfg.model.name``); a ConfigError names the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"model.name={name!r} is not a registered model; valid: {', '.join(MODELS)} "
                          f"(choose with model=NAME; models are declared in registry/models.py).") from None


def config_node(model: Model) -> ModelConfig:
    """The ``model`` config node of an entry: its family's schema holding its name and options."""
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in model.options.items()}
    return FAMILIES[model.family](name=model.name, **options)


def groups() -> dict[str, list[Model]]:
    """The models by the docs' family heading, in registry order (docs/models.md, --help)."""
    out: dict[str, list[Model]] = {}
    for m in MODELS.values():
        out.setdefault(m.group, []).append(m)
    return out
