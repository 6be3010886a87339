"""The networks a run can train: each declared once.

A *family* is one builder in run/models.py (``BUILDERS``) and the config schema of its keys
(config.py: ``ResNetConfig`` for "resnet"); a *model* is a named choice of those keys, offered as
``model=NAME``. Everything that names a model (the config options, the builder and init rule
task.py uses, the parameter the bit change touches, the cost model in presets.py) reads ``MODELS``.

Adding a model of an existing family is one entry below. Adding a family is a schema in
config.py, a builder (and, if it needs one, an init rule) in run/models.py, and its entries here.
The keys of ``cfg.model`` are the entry's name and options: they make the run id, while the
family, init rule and bit-change parameter are looked up here by name and are not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..config import ConfigError, ModelConfig, ResNetConfig

#: family -> the schema of its ``model.*`` keys (the builder of the same name is in run/models.py)
FAMILIES: dict[str, type[ModelConfig]] = {
    "resnet": ResNetConfig,
}


@dataclass(frozen=True)
class Model:
    name: str  # the option model=NAME, and cfg.model.name (the run id's model part)
    family: str  # a FAMILIES key: the schema of cfg.model and the builder in run/models.py
    options: Mapping[str, Any]  # the family's keys of cfg.model (resnet: widths, blocks, shortcut)
    init: str  # the init rule: run/models.py INIT_RULES (draws only from the init stream)
    bitflip: str  # the parameter (a name in model.named_parameters()) the one-ulp bit change moves
    # (convolution MACs of one 32x32 forward pass, classifier inputs), counted with forward hooks on
    # run/models.build_model: the cost model of presets.py; None = not counted (no cost estimate)
    macs: Optional[tuple[int, int]]
    doc: str  # one line: what the network is (docs/configuration.md tables every model)


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("resnet14", "resnet", {"widths": (16, 32, 64), "blocks": (2, 2, 2), "shortcut": "A"},
          "kaiming_zero_residual", "conv1.weight", (26_394_624, 64),
          "the paper's ResNet-14 (CIFAR style): 3x3 stem -> 16, three stages of 2 basic blocks, 16/32/64 "
          "channels, option-A shortcuts (stride-2 subsample + BN + zero channels); ~0.17M parameters"),
    Model("resnet18", "resnet", {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "shortcut": "B"},
          "kaiming_zero_residual", "conv1.weight", (555_417_600, 512),
          "ResNet-18, CIFAR style (3x3 stem, no max-pool): 64/128/256/512 channels, 2-2-2-2 basic blocks, "
          "1x1-conv + BN shortcuts where the shape changes; ~11M parameters"),
    Model("resnet34", "resnet", {"widths": (64, 128, 256, 512), "blocks": (3, 4, 6, 3), "shortcut": "B"},
          "kaiming_zero_residual", "conv1.weight", (1_159_397_376, 512),
          "ResNet-34, CIFAR style (the report's Table 1): 64/128/256/512 channels, 3-4-6-3 basic blocks, "
          "1x1-conv + BN shortcuts where the shape changes; ~21M parameters"),
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
