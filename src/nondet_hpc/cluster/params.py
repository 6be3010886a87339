"""The launcher's settings as the rest of the cluster code reads them: aliases resolved, checked.

Users come from hydra-submitit-launcher, whose ``SlurmQueueConf`` names two of our settings
differently (``name`` = ``job_name``, ``max_num_timeout`` = ``max_requeue``) and has a few
options we render as they do (``comment``, ``cpus_per_gpu``, ``gpus_per_task``, ``mem_per_cpu``,
``mem_per_gpu``, ``stderr_to_stdout``, ``nodes``, ``tasks_per_node``). :func:`normalize` turns a
launcher config into one canonical dict (aliases folded in, the job name defaulted from the sweep
folder) and refuses combinations that cannot mean what the user wants. docs/slurm.md has the
migration table. Torch- and Hydra-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError
from . import fields
#: sbatch options (ours or in additional_parameters) that give a job a GPU
GPU_OPTIONS = ("gres", "gpus", "gpus_per_node", "gpus_per_task", "gpus-per-node", "gpus-per-task", "G")


def default_job_name(sweep_dir: str | Path) -> str:
    """``nondet-<sweep folder name>``: two sweeps of one user are told apart in squeue."""
    return f"nondet-{Path(sweep_dir).name or 'sweep'}"


def normalize(params: Mapping[str, Any], sweep_dir: str | Path) -> dict[str, Any]:
    """Canonical launcher settings: aliases folded into our names, checks applied.

    Raises ConfigError (what was wrong, what is valid, what to do) on a conflict.
    """
    p = dict(params)
    for alias, ours in fields.ALIASES.items():
        value = p.pop(alias, None)
        if value is None:
            continue
        # an alias may replace our field's default, never a value set
        current = fields.value(p, ours)
        if current != fields.default(ours) and current != value:
            raise ConfigError(
                f"hydra.launcher.{alias}={value} and hydra.launcher.{ours}={current} disagree: {alias} is "
                f"hydra-submitit-launcher's name for {ours}. Set only one of them.")
        p[ours] = value
    if not p.get("job_name"):
        p["job_name"] = default_job_name(sweep_dir)
    for key in ("nodes", "tasks_per_node"):
        value = fields.value(p, key)
        if value not in (None, 1):
            raise ConfigError(
                f"hydra.launcher.{key}={value}: one run of nondet_hpc is one process on one node, so 1 is the "
                f"only valid value (each array task trains one model; more tasks would train the same model "
                f"twice). For more runs at once raise array_parallelism; for a faster run give it "
                f"more cpus_per_task or a GPU.")
    per = [k for k in ("mem_per_cpu", "mem_per_gpu") if p.get(k) is not None]
    if (per and p.get("mem_gb") is not None) or len(per) > 1:
        given = ", ".join(f"{k}={p[k]}" for k in ("mem_gb", *per) if p.get(k) is not None)
        raise ConfigError(
            f"hydra.launcher: {given}: sbatch accepts only one of --mem (mem_gb), --mem-per-cpu "
            f"(mem_per_cpu) and --mem-per-gpu (mem_per_gpu). Keep one, set the others to null.")
    return p


def requests_gpu(params: Mapping[str, Any]) -> bool:
    """Whether the training jobs ask SLURM for a GPU (gres gpu, gpus_per_node, gpus_per_task, ...)."""
    extra = dict(params.get("additional_parameters") or {})
    for source in (params, extra):
        for key in GPU_OPTIONS:
            value = source.get(key)
            if value in (None, "", 0, "0", False):
                continue
            if key == "gres" and "gpu" not in str(value):
                continue  # another generic resource (e.g. gres=lustre)
            return True
    return False


def check_device(device: str, params: Mapping[str, Any]) -> None:
    """Refuse ``train.device=cuda`` for jobs that request no GPU: every one of them would fail."""
    if str(device).startswith("cuda") and not requests_gpu(params):
        raise ConfigError(
            f"train.device={device} but the launcher requests no GPU (hydra.launcher.gres, gpus_per_node and "
            f"gpus_per_task are all unset), so SLURM would start every run on a node without one. Ask for a "
            f"GPU (hydra.launcher.gres=gpu:1, or hydra/launcher=slurm_v100), or train on CPU with "
            f"train.device=cpu (train.device=auto uses a GPU where the job gets one).")
