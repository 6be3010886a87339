"""The networks of the registered models (registry/models.py): the run layer's one door to run/zoo.

``model_for_run(cfg, in_shape, num_classes, g)`` builds and initialises the network a run's
config names (any family, model=custom included) and ``bitflip_target(model, cfg)`` finds the
parameter its bit change moves; task.py and evaluate.py use nothing else. The builders live in
run/zoo/ (one module per family; run/zoo/resnet.py holds this package's ResNet class).

The two-step API of version 0.1.0 stays for the "resnet" family (resnet14, resnet18b, resnet34),
which tests and benchmarks use: ``build_model(name, num_classes, in_channels, **options)`` gives
the network with every tensor unset, ``init_weights(model, g)`` fills it from the init stream.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ..config import ConfigError
from ..registry.models import model_entry
from .zoo import bitflip_param, from_config
from .zoo import bitflip_target as _target
from .zoo.resnet import BasicBlock, ResNet, ShortcutA, build_resnet, init_kaiming_zero_residual

__all__ = ["BasicBlock", "ResNet", "ShortcutA", "bitflip_target", "build_model", "init_weights", "model_for_run",
           "model_from_config"]


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def model_for_run(cfg, in_shape: tuple[int, int, int], num_classes: int, g: torch.Generator) -> nn.Module:
    """The network ``cfg.model`` names, for the dataset's image shape and class count, initialised
    from the init stream ``g`` by its registered rule (or built by the researcher's factory)."""
    return from_config(_plain(cfg.model), in_shape, num_classes, g)


def bitflip_target(model: nn.Module, cfg=None) -> torch.Tensor:
    """The parameter the one-ulp bit change moves: ``cfg.source.bitflip_param``, else the one the
    model's registry entry names (model=custom: its first weight in registration order). A name
    the model lacks is refused with the list of its float32 parameters. Without ``cfg``: the
    entry of ``model.name`` (a ``build_model`` network)."""
    if cfg is None:
        return _target(model, model_entry(model.name).bitflip)
    chosen = OmegaConf.select(cfg, "source.bitflip_param") if OmegaConf.is_config(cfg) else None
    return _target(model, bitflip_param(str(cfg.model.name), chosen))


def build_model(name: str, num_classes: int, in_channels: int, **options: Any) -> nn.Module:
    """The "resnet"-family network of registered model ``name``, every tensor still unset (call
    init_weights). ``options``: the family's keys (widths, blocks, shortcut); the entry's where not given."""
    entry = model_entry(name)
    if entry.family != "resnet":
        raise ConfigError(f"build_model builds the 'resnet' family only; {name} is {entry.family!r}: use "
                          f"nondet_hpc.run.zoo.build (it initialises too).")
    spec = {**entry.options, **options}
    model = build_resnet(list(spec["widths"]), list(spec["blocks"]), str(spec.get("shortcut", "A")), num_classes,
                         in_channels, None)
    model.name = name  # type: ignore[attr-defined]
    return model


def model_from_config(cfg) -> nn.Module:
    """``build_model`` of ``cfg.model`` with ``cfg.data``'s classes and channels (uninitialised)."""
    spec = _plain(cfg.model)
    return build_model(spec.pop("name"), cfg.data.num_classes, cfg.data.channels, **spec)


def init_weights(model: nn.Module, g: torch.Generator) -> None:
    """Initialise a ``build_model`` network from the init stream ``g`` (kaiming_zero_residual)."""
    init_kaiming_zero_residual(model, g)
