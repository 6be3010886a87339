"""Hydra launcher plugins of nondet_hpc: SLURM arrays (return at once) and local parallel jobs.

Hydra imports every module under the ``hydra_plugins`` namespace package at start-up; importing
this package registers the launcher's structured config (``hydra/launcher=nondet_slurm_schema``,
extended by conf/hydra/launcher/slurm*.yaml) and the local launcher's
(``hydra/launcher/nondet_local_schema``, extended by conf/hydra/launcher/local.yaml). The SLURM
launcher class lives in ``.launcher`` and does the work in :mod:`nondet_hpc.cluster` (submit,
client) and :mod:`nondet_hpc.sweep` (sweep.json, waves); the local one in ``.local``, with the
same sweep layer and no SLURM code.
"""

from .config import NondetSlurmLauncherConf, ReducerConf, register
from .local import NondetLocalLauncherConf, register as register_local

register()
register_local()

__all__ = ["NondetLocalLauncherConf", "NondetSlurmLauncherConf", "ReducerConf"]
