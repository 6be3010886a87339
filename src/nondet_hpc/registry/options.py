"""The registries as Hydra config options: ``source=NAME`` and ``model=NAME`` come from here.

Hydra finds config groups in conf/ (data, experiment, variant, hydra/launcher) and in its
ConfigStore; the source and model options are stored there from registry/sources.py and
registry/models.py, so each is declared once and ``--help``, the defaults list and the presets'
``override /model: NAME`` see them as they saw the YAML files they replace. Each option composes
the keys and values its YAML file composed, so run ids are unchanged (tests/test_registry.py).
"""

from __future__ import annotations

from ..config import Config, SourceConfig
from .models import MODELS, config_node
from .sources import SOURCES, Source


def source_node(source: Source) -> SourceConfig:
    """The ``source`` config node of an entry (its name, label, streams and kernel switch)."""
    return SourceConfig(name=source.name, label=source.label, vary=list(source.vary),
                        deterministic_kernels=source.deterministic_kernels)


def register_configs() -> None:
    """Store the root schema (conf/config.yaml names it first in its defaults list) and every
    registered source and model as an option of its group. Call before composing; idempotent."""
    from hydra.core.config_store import ConfigStore  # only the composer needs Hydra

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for source in SOURCES.values():
        cs.store(group="source", name=source.name, node=source_node(source), provider="nondet_hpc")
    for model in MODELS.values():
        node = config_node(model)
        if model.family == "custom":  # model.kwargs takes any keyword argument: model.kwargs.width=64
            from omegaconf import OmegaConf

            node = OmegaConf.structured(node)
            OmegaConf.set_struct(node.kwargs, False)
        cs.store(group="model", name=model.name, node=node, provider="nondet_hpc")
