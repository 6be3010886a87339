"""Structured config of the nondet_hpc SLURM launcher (``hydra/launcher=slurm`` and presets).

Built from the field declarations in :mod:`nondet_hpc.cluster.fields` (each field's type, default
and meaning are written there, once) and registered in Hydra's ConfigStore as
``hydra/launcher/nondet_slurm_schema``; the YAML presets in conf/hydra/launcher/ extend it, so a
misspelt field (``hydra.launcher.partiton=gpu``) fails at composition instead of being ignored.
docs/slurm.md describes every field for users.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

from hydra.core.config_store import ConfigStore

from nondet_hpc.cluster.fields import BARRIER_FIELDS, FIELDS, REDUCER_FIELDS, SLURM_LAUNCHER, Field


def _spec(f: Field) -> tuple[str, Any, Any]:
    """One dataclass field: a list or dict default is built afresh for every config."""
    if isinstance(f.default, (list, dict)):
        default = f.default
        return f.name, f.type, dataclasses.field(default_factory=lambda: copy.deepcopy(default))
    return f.name, f.type, dataclasses.field(default=f.default)


def _dataclass(name: str, fields: Iterable[Field], before: Iterable[tuple[str, Any, Any]] = (),
               after: Iterable[tuple[str, Any, Any]] = ()) -> type:
    return dataclasses.make_dataclass(name, [*before, *map(_spec, fields), *after],
                                      namespace={"__module__": __name__})


#: ``hydra.launcher.reducer``: the job that runs ``python -m nondet_hpc.reduce SWEEP_DIR`` after the arrays
ReducerConf = _dataclass("ReducerConf", REDUCER_FIELDS)
#: ``hydra.launcher.barriers``: the job that runs ``python -m nondet_hpc.barriers SWEEP_DIR`` after the arrays
BarriersConf = _dataclass("BarriersConf", BARRIER_FIELDS)
NondetSlurmLauncherConf = _dataclass(
    "NondetSlurmLauncherConf", FIELDS,
    before=[("_target_", str, dataclasses.field(default=SLURM_LAUNCHER))],
    after=[("reducer", ReducerConf, dataclasses.field(default_factory=ReducerConf)),
           ("barriers", BarriersConf, dataclasses.field(default_factory=BarriersConf))])


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/launcher",
        name="nondet_slurm_schema",
        node=NondetSlurmLauncherConf,
        provider="nondet_hpc",
    )
