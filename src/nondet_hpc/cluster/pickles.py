"""The job pickles of a sweep: what each job executes, written where submitit's job side loads it.

An array task's pickle holds its one run (:class:`.jobs.RunJob`) or its K runs (:class:`.pack.PackJob`),
the reducer's a :class:`.jobs.ReduceJob`. Each is written under a temporary name before sbatch and
renamed to ``<job id>_submitted.pkl`` (submitit's ``JobPaths``) once SLURM gave the id. The folder
holding them must be private: submitit unpickles them with full pickle on the node.
"""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..sweep.identity import PlannedRun
from . import fields
from .client import SubmissionError
from .jobs import RunJob
from .pack import PackJob

TEMPORARY = ".tmp_*.pkl"  # a job pickle before SLURM gave its job an id


def private_folder(folder: Path, echo: Callable[[str], None]) -> None:
    """The job pickles' folder: created 0o700; refused when anyone may write it.

    submitit's job side unpickles ``<job id>_submitted.pkl`` from it with full pickle, so whoever
    can write there can run code as the job's user (docs/slurm.md, "Sharing a sweep folder").
    """
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        return
    mode = folder.stat().st_mode
    if mode & 0o002:
        raise SubmissionError(
            f"{folder} is world-writable (mode {mode & 0o777:o}): anyone on the cluster could plant a job pickle "
            f"there and run code as you when the job starts. Make it private (chmod 700 {shlex.quote(str(folder))}, "
            f"or chmod 750 to let your group read the logs) and rerun.")
    if mode & 0o020:
        echo(f"nondet_hpc: warning: {folder} is group-writable (mode {mode & 0o777:o}): every member of its group "
             f"can run code as you through the job pickles there (chmod g-w {shlex.quote(str(folder))} to stop it).")


def task_job(params: Mapping[str, Any], runs: Sequence[PlannedRun]) -> Callable[[], Any]:
    """What one array task executes: its one run (RunJob), or its K runs at once (PackJob)."""
    max_requeue = int(fields.value(params, "max_requeue"))
    # the plain resolved config where the launcher has it (fast to pickle and to load), else the config
    jobs = [RunJob(run.container if run.container is not None else run.cfg, run.run_id, str(run.run_dir),
                   max_requeue) for run in runs]
    if int(params.get("runs_per_task") or 1) == 1:
        return jobs[0]
    return PackJob(jobs, mps=str(fields.value(params, "mps")), max_requeue=max_requeue)


def pickle_job(folder: Path, fn: Callable[[], Any], timeout_min: int, max_requeue: int) -> Path:
    """Pickle a job for submitit's job side under a temporary name (renamed once SLURM gave an id)."""
    import cloudpickle  # submitit's pickler (by reference for importable classes)
    from submitit.core.utils import DelayedSubmission

    tmp = folder / TEMPORARY.replace("*", uuid.uuid4().hex)
    ds = DelayedSubmission(fn)
    ds.set_timeout(timeout_min, max_requeue)
    with tmp.open("wb") as f:
        cloudpickle.dump(ds, f)
    return tmp


def job_pickle_path(folder: Path, job_id: str) -> Path:
    """Where submitit's job side looks for job ``job_id``'s pickle ("A_i" for array tasks)."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id).submitted_pickle


def discard_temporary(folder: Path) -> None:
    """Remove the pickles of jobs sbatch refused (they never got an id)."""
    for tmp in folder.glob(TEMPORARY):
        tmp.unlink(missing_ok=True)
