"""SWEEP_DIR/sweep.json, the sweep manifest: the ONE module that reads and writes it.

Written atomically (rundir.write_text: temp file + fsync + rename) under the sweep's lock
(SWEEP_DIR/.sweep.lock), so two launches of one sweep never interleave and a killed launcher
leaves the old or the new manifest, never half of one. Earlier submissions are never dropped;
every launch that submits appends one submission record::

    {"format": 1, "sweep_dir": ..., "created": ...,
     "runs": {RUN_ID: {"run_dir", "overrides", "config_hash",
                       "jobs": [{"submission", "job_id": "A_i", "array_job_id": "A", "index": i}]}},
     "submissions": [{"n", "time", "user", "host", "cwd", "argv", "status", "launcher", "folder",
                      "base_config", "varying_keys", "run_values", "runs": [RUN_ID...],
                      "skipped": {"done", "active", "over_limit", "duplicates"},
                      "arrays": [{"job_id", "offset", "size", "parallelism", "dependency",
                                  "script", "command", "runs_per_task", "n_runs", "tasks"}],
                      "reducer": {"job_id", "dependency", "script", "command"} | null,
                      "error": str (when sbatch refused)}],
     "cancellations": [{"time", "job_ids"}],
     "study": {...} (a study grown in waves: :mod:`.waves`)}

Array task ``i`` of an array with ``offset o`` (counted in runs) and ``runs_per_task K`` holds
``submission["runs"][o + i*K : o + (i+1)*K]``, also listed as ``tasks[i]``; with K > 1 the runs
of one task share its job id and their job records carry their ``slot`` in the task. Manifests
written before runs_per_task existed have neither key: one run per task.

The file is SLURM-free on purpose: the local launcher records a study grown in waves here too,
and the reducer reads the planned runs; what SLURM adds (job ids, scripts) is only data in it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from .. import rundir

MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
FORMAT = 1


class SweepError(RuntimeError):
    """A sweep folder cannot be used now (its lock is held by another launch)."""


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def jsonable(obj: Any) -> Any:
    """``obj`` as sweep.json stores it (what json cannot hold becomes its str)."""
    return json.loads(json.dumps(obj, default=str))


def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / MANIFEST


def load_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    path = manifest_path(sweep_dir)
    if not path.exists():
        return None
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict) or "runs" not in data or "submissions" not in data:
        raise ValueError(f"{path} is not a nondet_hpc sweep manifest")
    return data


def new_manifest(sweep_dir: str | os.PathLike) -> dict:
    return {"format": FORMAT, "sweep_dir": str(Path(sweep_dir).resolve()), "created": now_iso(),
            "runs": {}, "submissions": [], "cancellations": []}


def write_manifest(sweep_dir: str | os.PathLike, data: Mapping) -> Path:
    """Atomic write (rundir's temp file + rename); indent 1 keeps 1000s of runs compact."""
    path = manifest_path(sweep_dir)
    rundir.write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    return path


@contextlib.contextmanager
def sweep_lock(sweep_dir: str | os.PathLike, timeout: float = 120.0) -> Iterator[None]:
    """Exclusive lock of a sweep folder (two launches of one sweep never interleave)."""
    path = Path(sweep_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with rundir.file_lock(path, lambda: SweepError(f"{path} is locked by another submission for {timeout:g} s"),
                          timeout=timeout):
        yield


def latest_job(run_rec: Mapping | None) -> dict | None:
    """The newest job recorded for a run (its manifest entry), or None."""
    if not run_rec or not run_rec.get("jobs"):
        return None
    return run_rec["jobs"][-1]


def submission_folders(manifest: Mapping) -> dict[int, str | None]:
    """Submission number -> the submitit folder its jobs write logs and pickles to."""
    return {s["n"]: s.get("folder") for s in manifest["submissions"]}
