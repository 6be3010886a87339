"""Hydra launcher plugin of nondet_hpc: SLURM arrays through submitit, returns at once.

Hydra imports every module under the ``hydra_plugins`` namespace package at start-up; importing
this package registers the launcher's structured config (``hydra/launcher=nondet_slurm_schema``,
extended by conf/hydra/launcher/slurm*.yaml). The launcher class lives in ``.launcher`` and does
the work in :mod:`nondet_hpc.cluster` (submit, manifest, client).
"""

from .config import NondetSlurmLauncherConf, ReducerConf, register

register()

__all__ = ["NondetSlurmLauncherConf", "ReducerConf"]
