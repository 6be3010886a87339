"""What the jobs on the compute nodes print about themselves: their SLURM job label and log lines.

Shared by the one-run job (:mod:`.jobs`), the packed task (:mod:`.pack`) and the reducer job's
wave step (:mod:`.advance`); the ``[nondet_hpc.slurm HH:MM:SS]`` prefix is what users grep for in
a job's log, so it stays as it always was.
"""

from __future__ import annotations

import os
import time


def job_label() -> str:
    """``A_i`` for array task i of array A, the job id otherwise, ``?`` outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return os.environ.get("SLURM_JOB_ID", "?")


def log(msg: str) -> None:
    print(f"[nondet_hpc.slurm {time.strftime('%H:%M:%S')}] {msg}", flush=True)
