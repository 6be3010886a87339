"""SWEEP_DIR/sweep.json, the sweep manifest: the ONE module that reads and writes it.

Written atomically (rundir.write_text: temp file + fsync + rename) under the sweep's lock
(SWEEP_DIR/.sweep.lock), so two launches of one sweep never interleave and a killed launcher
leaves the old or the new manifest, never half of one. Earlier submissions are never dropped;
every launch that submits appends one submission record::

    {"version": 2, "format": 1, "sweep_dir": ..., "created": ...,
     "runs": {RUN_ID: {"run_dir", "overrides", "config_hash",
                       "jobs": [{"submission", "job_id": "A_i", "array_job_id": "A", "index": i}],
                       "parent": RUN_ID (a run perturbed from epoch k > 0: the run it starts from),
                       "keep_checkpoints": [k...] (a parent: the epochs its submitted job keeps)}},
     "submissions": [{"n", "time", "user", "host", "cwd", "argv", "status", "launcher", "folder",
                      "base_config", "varying_keys", "run_values", "runs": [RUN_ID...],
                      "skipped": {"done", "active", "over_limit", "duplicates"},
                      "arrays": [{"job_id", "offset", "size", "parallelism", "dependency",
                                  "script", "command", "runs_per_task", "n_runs", "tasks",
                                  "role": "parents" | "children" (absent: runs that need no parent)}],
                      "barriers": {"job_id", "dependency", "script", "command", "pairs", "points",
                                   "bn_images"} | null (absent: no barrier job),
                      "reducer": {"job_id", "dependency", "script", "command"} | null,
                      "error": str (when sbatch refused)}],
     "cancellations": [{"time", "job_ids"}],
     "study": {...} (a study grown in waves: :mod:`.waves`)}

Array task ``i`` of an array with ``offset o`` (counted in runs) and ``runs_per_task K`` holds
``submission["runs"][o + i*K : o + (i+1)*K]``, also listed as ``tasks[i]``; with K > 1 the runs
of one task share its job id and their job records carry their ``slot`` in the task. Manifests
written before runs_per_task existed have neither key: one run per task.

Every read checks the file against its schema (:mod:`.schema`, with the version rules: 0.1.0's
files have no ``version`` and load as version 1; an unknown version is refused): a damaged file
raises :class:`ManifestError` naming each bad entry, and :func:`read_salvaged` gives the entries
that can still be used to the commands that act on part of a sweep (status, cancel). The file is
read only as a regular file of bounded size and written without following links (safeio).

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

from .. import safeio
from . import schema

MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
FORMAT = 1  # the layout's name in 0.1.0; the schema's version is schema.VERSION


class SweepError(RuntimeError):
    """A sweep folder cannot be used now (its lock is held by another launch)."""


class ManifestError(SweepError, ValueError):
    """sweep.json cannot be used as it is: the message names the file and every damaged entry."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = Path(path), list(problems)
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        super().__init__(f"{path} is damaged: {shown}")


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def jsonable(obj: Any) -> Any:
    """``obj`` as sweep.json stores it (what json cannot hold becomes its str)."""
    return json.loads(json.dumps(obj, default=str))


def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / MANIFEST


def _read(path: Path) -> Any:
    try:
        return safeio.load_json(path)
    except safeio.RefusedFile as e:
        raise ManifestError(path, [e.why]) from None


def load_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    """sweep.json of a sweep folder, checked against its schema; None when there is none.

    Raises :class:`ManifestError` (a ValueError) naming every entry that does not match.
    """
    path = manifest_path(sweep_dir)
    if not os.path.lexists(path):
        return None
    data = _read(path)
    bad = schema.problems(data)
    if bad:
        raise ManifestError(path, bad)
    return data


def read_salvaged(sweep_dir: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """(sweep.json with its damaged entries left out, what was left out): for status and cancel,
    which act on what can be read and say what could not. (None, []) without a sweep.json;
    (None, [why]) when nothing of it can be used."""
    path = manifest_path(sweep_dir)
    if not os.path.lexists(path):
        return None, []
    try:
        data = _read(path)
    except ManifestError as e:
        return None, e.problems
    return schema.salvage(data)


def new_manifest(sweep_dir: str | os.PathLike) -> dict:
    return {"version": schema.VERSION, "format": FORMAT, "sweep_dir": str(Path(sweep_dir).resolve()), "created": now_iso(),
            "runs": {}, "submissions": [], "cancellations": []}


def write_manifest(sweep_dir: str | os.PathLike, data: Mapping) -> Path:
    """Atomic write (safeio: temp file + rename, no link followed); indent 1 keeps 1000s of runs
    compact. Written as this version's schema (a 0.1.0 file rewritten gains ``"version": 2``); a
    manifest that does not match it is never written."""
    path = manifest_path(sweep_dir)
    out = {"version": schema.VERSION, **{k: v for k, v in data.items() if k != "version"}}
    bad = schema.problems(json.loads(json.dumps(out, default=str)))
    if bad:
        raise ManifestError(path, ["refusing to write entries that do not match the schema", *bad])
    safeio.write_bytes(path, (json.dumps(out, indent=1, sort_keys=False, default=str) + "\n").encode(),
                       root=Path(sweep_dir))
    return path


@contextlib.contextmanager
def sweep_lock(sweep_dir: str | os.PathLike, timeout: float = 120.0) -> Iterator[None]:
    """Exclusive lock of a sweep folder (two launches of one sweep never interleave)."""
    path = Path(sweep_dir) / LOCK
    os.makedirs(path.parent, exist_ok=True)  # the sweep folder itself: the user's choice of path
    with safeio.file_lock(path, lambda: SweepError(f"{path} is locked by another submission for {timeout:g} s"),
                          timeout=timeout, root=Path(sweep_dir)):
        yield


def latest_job(run_rec: Mapping | None) -> dict | None:
    """The newest job recorded for a run (its manifest entry), or None."""
    if not run_rec or not run_rec.get("jobs"):
        return None
    return run_rec["jobs"][-1]


def submission_folders(manifest: Mapping) -> dict[int, str | None]:
    """Submission number -> the submitit folder its jobs write logs and pickles to."""
    return {s["n"]: s.get("folder") for s in manifest["submissions"]}
