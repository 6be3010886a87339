"""Build any registered model by name, initialised from the init stream; the bit-change and
learning-rate-group rules that go by parameter name.

``build(name, in_shape, num_classes, g)`` looks the name up in nondet_hpc/registry/models.py,
builds its family for the dataset's image shape [C, H, W] and class count, and initialises it from
the init generator ``g`` by the entry's rule (``kaiming_zero_residual`` or ``torch_default``, see
the registry). ``from_config`` does the same for a run's ``cfg.model`` (its options, or the
researcher's factory for model=custom). torch's global RNG state is the same before and after.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ...config import ConfigError
from ...model_factory import CUSTOM_KEYS
from ...registry.models import MODELS, Model
from .cifar_resnet import build_cifar_resnet
from .custom import build_custom, check_output
from .resnet import build_resnet
from .rng import construct
from .shufflenet import ShuffleNetV2
from .small import HiddenConv, HiddenFC, LinearNet, MnistCNN
from .tv_resnet import TorchvisionResNet
from .vgg import VGG

Shape = tuple[int, int, int]
Builder = Callable[[Mapping[str, Any], Shape, int, torch.Generator], nn.Module]


def _forked(make: Callable[[Mapping[str, Any], Shape, int], nn.Module]) -> Builder:
    """A family whose init is PyTorch's default: constructed inside the init stream's fork."""
    return lambda opts, shape, k, g: construct(lambda: make(opts, shape, k), g)


#: family -> builder(options, in_shape, num_classes, init generator) -> initialised module.
FAMILIES: dict[str, Builder] = {
    "linear": _forked(lambda o, s, k: LinearNet(s, k)),
    "hidden_fc": _forked(lambda o, s, k: HiddenFC(s, k, int(o.get("hidden", 512)))),
    "hidden_conv": _forked(lambda o, s, k: HiddenConv(s, k, int(o.get("channels", 64)))),
    "mnist_cnn": _forked(lambda o, s, k: MnistCNN(s, k)),
    "vgg": _forked(lambda o, s, k: VGG(int(o["depth"]), s, k)),
    "shufflenet_v2": _forked(lambda o, s, k: ShuffleNetV2(float(o["size"]), s[0], k)),
    "torchvision_resnet": _forked(lambda o, s, k: TorchvisionResNet(int(o["depth"]), s[0], k)),
    "cifar_resnet": lambda o, s, k, g: build_cifar_resnet(list(o["widths"]), list(o["blocks"]), k, s[0], g),
    "resnet": lambda o, s, k, g: build_resnet(list(o["widths"]), list(o["blocks"]), str(o.get("shortcut", "A")),
                                              k, s[0], g),
}


#: The init rule each family implements (registry/models.py ``Model.init``): the ResNets draw their
#: weights themselves (resnet.init_kaiming_zero_residual); every other family keeps its
#: constructor's defaults, drawn inside the init stream's fork; model=custom is the researcher's.
FAMILY_INIT = {family: "torch_default" for family in FAMILIES} | {
    "cifar_resnet": "kaiming_zero_residual", "resnet": "kaiming_zero_residual", "custom": "factory"}


def entry(name: str) -> Model:
    """The registry entry of ``name``, checked against what its family implements."""
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is not a registered model; valid: {', '.join(MODELS)} (choose with "
                          f"model=NAME; models are declared in registry/models.py).")
    e = MODELS[name]
    if FAMILY_INIT.get(e.family) != e.init:
        raise ConfigError(f"registry entry {name!r}: family {e.family!r} initialises by rule "
                          f"{FAMILY_INIT.get(e.family)!r}, the entry says {e.init!r}; fix registry/models.py.")
    return e


def build(name: str, in_shape: Shape, num_classes: int, g: torch.Generator,
          options: Mapping[str, Any] | None = None) -> nn.Module:
    """Model ``name`` for images ``in_shape`` and ``num_classes`` classes, initialised from ``g``.

    ``options`` override the entry's family options (e.g. other widths for a cifar_resnet).
    """
    e = entry(name)
    if e.family == "custom":
        raise ConfigError("model=custom is built from its factory: use from_config (model.factory=package.module:fn).")
    opts = {**e.options, **(options or {})}
    try:
        return FAMILIES[e.family](opts, tuple(int(v) for v in in_shape), int(num_classes), g)  # type: ignore[arg-type]
    except ValueError as err:  # a shape the family cannot take (e.g. VGG on 8x8 digits)
        raise ConfigError(f"model={name} on images {list(in_shape)}: {err}.") from None


def from_config(model_cfg: Mapping[str, Any], in_shape: Shape, num_classes: int, g: torch.Generator) -> nn.Module:
    """The network ``cfg.model`` describes, for images ``in_shape`` and ``num_classes`` classes,
    initialised from the init stream ``g``: a registered model with the config's options, or
    (model=custom) the researcher's factory, checked to map a batch to [B, num_classes] logits."""
    spec = dict(model_cfg)
    name = str(spec.pop("name"))
    if entry(name).family == "custom":
        model = build_custom(spec.get("factory"), spec.get("kwargs"), g, expect_sha256=spec.get("source_sha256"))
        check_output(model, tuple(int(v) for v in in_shape), int(num_classes))  # type: ignore[arg-type]
        return model
    unknown = set(spec) & set(CUSTOM_KEYS)
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]} is for model=custom only; model={name} is registered.")
    return build(name, in_shape, num_classes, g, spec)


def bitflip_param(model_name: str, chosen: str | None) -> str | None:
    """The parameter name the bit change moves: ``source.bitflip_param`` if set, else the entry's
    (None for model=custom: the first weight in registration order, ``default_bitflip_param``)."""
    return chosen if chosen else entry(model_name).bitflip


def float32_params(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dtype == torch.float32]


def default_bitflip_param(model: nn.Module) -> str:
    """The first weight in registration order (the first layer's, for a plain feed-forward model)."""
    for n, p in model.named_parameters():
        if n.split(".")[-1] == "weight" and p.dtype == torch.float32:
            return n
    names = float32_params(model)
    if not names:
        raise ConfigError("the model has no float32 parameter: the bit change has nothing to change.")
    return names[0]


def bitflip_target(model: nn.Module, name: str | None) -> torch.Tensor:
    """The parameter ``name`` (None: ``default_bitflip_param``), checked to exist and be float32."""
    name = default_bitflip_param(model) if name is None else name
    params = dict(model.named_parameters())
    if name not in params or params[name].dtype != torch.float32:
        why = "does not exist" if name not in params else f"is {params[name].dtype}, not float32"
        raise ConfigError(f"source.bitflip_param={name!r} {why} in this model; its float32 parameters are: "
                          f"{', '.join(float32_params(model))}.")
    return params[name]


def authors_small_lr_names(model: nn.Module) -> set[str]:
    """The authors' learning-rate groups, by name, as their train.py: every parameter whose name
    contains "bias", or both "bn" and "weight", trains at lr * 0.1; all others at the full lr.

    Right for the authors' models (they carry the authors' names, so the outcome is theirs: e.g.
    VGG's BN scales ``features.k.weight`` and a ResNet's shortcut BN ``downsample.1.weight`` get the
    full rate) and for a researcher's model (the rule their code would apply to it). The "resnet"
    family (run/zoo/resnet.py) names its tensors otherwise; train.small_lr_names gives it the same
    outcome by module.
    """
    return {n for n, _ in model.named_parameters() if "bias" in n or ("bn" in n and "weight" in n)}
