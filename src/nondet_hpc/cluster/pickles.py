"""The job pickles of a sweep: what each job executes, written where submitit's job side loads it.

An array task's pickle holds its one run (:class:`.jobs.RunJob`) or its K runs (:class:`.pack.PackJob`),
the reducer's a :class:`.jobs.ReduceJob`. Each is written under a temporary name before sbatch and
renamed to ``<job id>_submitted.pkl`` (submitit's ``JobPaths``) once SLURM gave the id. The folder
holding them must be private: submitit unpickles them with full pickle on the node.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import safeio
from ..sweep.identity import PlannedRun
from . import fields
from .jobs import RunJob
from .pack import PackJob

TEMPORARY = ".tmp_*.pkl"  # a job pickle before SLURM gave its job an id


def private_folder(folder: Path) -> None:
    """The job pickles' folder, made 0o700 when missing. submitit's job side unpickles
    ``<job id>_submitted.pkl`` from it with full pickle, so nobody else may write it: the launcher
    checks that before it submits (:func:`nondet_hpc.sweep.trust.check_sweep_folder`)."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)


def task_job(params: Mapping[str, Any], runs: Sequence[PlannedRun]) -> Callable[[], Any]:
    """What one array task executes: its one run (RunJob), or its K runs at once (PackJob)."""
    max_requeue = int(fields.value(params, "max_requeue"))
    # the plain resolved config where the launcher has it (fast to pickle and to load), else the config
    jobs = [RunJob(run.config, run.run_id, str(run.run_dir),
                   max_requeue) for run in runs]
    if int(params.get("runs_per_task") or 1) == 1:
        return jobs[0]
    return PackJob(jobs, mps=str(fields.value(params, "mps")), max_requeue=max_requeue)


def temporary(folder: Path, name: str) -> Path:
    """A job pickle's name before SLURM gave its job an id (``name``: its submission token, and
    ``_i`` for task i of an array)."""
    return folder / TEMPORARY.replace("*", name)


def pickle_job(folder: Path, fn: Callable[[], Any], timeout_min: int, max_requeue: int,
               name: str | None = None) -> Path:
    """Pickle a job for submitit's job side under a temporary name (renamed once SLURM gave an id)."""
    import cloudpickle  # submitit's pickler (by reference for importable classes)
    from submitit.core.utils import DelayedSubmission

    tmp = temporary(folder, name or uuid.uuid4().hex)
    ds = DelayedSubmission(fn)
    ds.set_timeout(timeout_min, max_requeue)
    # never through a link planted in the folder (it is private, but checked again at each write)
    safeio.atomic_write(tmp, lambda f: cloudpickle.dump(ds, f), root=folder)
    return tmp


def job_pickle_path(folder: Path, job_id: str) -> Path:
    """Where submitit's job side looks for job ``job_id``'s pickle ("A_i" for array tasks)."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id).submitted_pickle


def adopt_pickles(folder: Path, token: str, job_id: str, n_tasks: int | None) -> None:
    """The pickles written under a submission token get the names of the job SLURM queued:
    ``<job id>_<i>`` for the ``n_tasks`` tasks of an array, ``<job id>`` for one job (None)."""
    names = [(f"{token}_{i}", f"{job_id}_{i}") for i in range(n_tasks)] if n_tasks is not None else [(token, job_id)]
    for tmp_name, jid in names:
        tmp = temporary(folder, tmp_name)
        if tmp.exists():
            tmp.rename(job_pickle_path(folder, jid))


def discard_pickles(folder: Path, token: str) -> None:
    """Remove the pickles of a job that was not queued (they never got an id)."""
    for tmp in [temporary(folder, token), *folder.glob(TEMPORARY.replace("*", f"{token}_*"))]:
        tmp.unlink(missing_ok=True)
