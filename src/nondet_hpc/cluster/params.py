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

from ..config import ConfigError, threads_for
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
    _check_names(p)
    _check_values(p)
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


#: why a value below a field's minimum is refused, where more than "at least N" helps
WHY_MINIMUM = {
    "timeout_min": "the time limit in minutes; sbatch reads --time=0 as no limit at all, so a run would hold its "
                   "allocation without bound and never get the warning that checkpoints and requeues it. Give a "
                   "limit, e.g. hydra.launcher.timeout_min=60: longer runs requeue and resume from their checkpoint",
    "cpus_per_task": "a task needs at least one CPU",
    "runs_per_task": "the number of runs each array task trains at once (default 1)",
}


def _check_names(p: Mapping[str, Any]) -> None:
    """Every key a field: ``+hydra.launcher.partiton=debug`` gets past Hydra's schema, not past this."""
    for key in p:
        if not fields.is_field(key):
            raise ConfigError(fields.unknown_field(key))
    for node in fields.NODES:
        for key in dict(p.get(node) or {}):
            if not fields.is_field(f"{node}.{key}"):
                raise ConfigError(fields.unknown_field(f"{node}.{key}"))


def _check_values(p: Mapping[str, Any]) -> None:
    """Numbers within their field's bounds, and a time-limit warning that comes before the limit."""
    for node, declared, prefix in ((p, fields.FIELDS, "hydra.launcher."),
                                   (dict(p.get("reducer") or {}), fields.REDUCER_FIELDS, "hydra.launcher.reducer."),
                                   (dict(p.get("barriers") or {}), fields.BARRIER_FIELDS, "hydra.launcher.barriers.")):
        for f in declared:
            value = node.get(f.name)
            if f.minimum is None or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < f.minimum:
                raise ConfigError(f"{prefix}{f.name}={value!r} is invalid: it must be a number >= {f.minimum:g} "
                                  f"({WHY_MINIMUM.get(f.name, f.doc)}).")
    delay, limit = fields.value(p, "signal_delay_s"), fields.value(p, "timeout_min")
    if delay >= limit * 60:
        raise ConfigError(
            f"hydra.launcher.signal_delay_s={delay} is not below the time limit (timeout_min={limit}, {limit * 60} s): "
            f"SLURM would send the checkpoint-and-requeue warning (USR2) as each run starts, and the run would requeue "
            f"until max_requeue without training. Lower signal_delay_s (e.g. {limit * 60 // 2}) or raise timeout_min.")


def cpu_sharing(params: Mapping[str, Any]) -> str | None:
    """What a task with more runs than CPUs does with them (the launcher prints it, sweep.json records
    it); None when each run has CPUs of its own."""
    k, cpus = int(fields.value(params, "runs_per_task")), int(fields.value(params, "cpus_per_task"))
    if k <= cpus:
        return None
    return (f"runs_per_task={k} > cpus_per_task={cpus}: the {k} runs of a task share its {cpus} CPU(s), taking "
            f"turns (slower, not different: a run's results depend on its thread count, not on its neighbours); "
            f"with train.threads=0 each run computes with {threads_for(0, cpus=cpus, runs_per_task=k)} thread(s), "
            f"the count in its run id and run.json. For a CPU per run set hydra.launcher.cpus_per_task={k}.")


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
