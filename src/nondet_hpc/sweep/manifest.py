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
     "cancellations": [{"time", "job_ids"}]}

Array task ``i`` of an array with ``offset o`` (counted in runs) and ``runs_per_task K`` holds
``submission["runs"][o + i*K : o + (i+1)*K]``, also listed as ``tasks[i]``; with K > 1 the runs
of one task share its job id and their job records carry their ``slot`` in the task. Manifests
written before runs_per_task existed have neither key: one run per task (:func:`task_runs`).

Also here: a run's configuration as the manifest compares it (``PlannedRun``, its config hash)
and the check that a sweep folder never mixes runs of two configurations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .. import rundir
from ..config import identity_items, key_matches
from .client import SlurmError

MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
FORMAT = 1


class SweepConfigMismatch(ValueError):
    """The sweep folder holds runs of another configuration."""


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# =============================================================================== the file
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
    with rundir.file_lock(path, lambda: SlurmError(f"{path} is locked by another submission for {timeout:g} s"),
                          timeout=timeout):
        yield


def latest_job(run_rec: Mapping | None) -> dict | None:
    """The newest job recorded for a run (its manifest entry), or None."""
    if not run_rec or not run_rec.get("jobs"):
        return None
    return run_rec["jobs"][-1]


def task_runs(submission: Mapping, array: Mapping) -> list[list[str]]:
    """The run ids each task of ``array`` holds (task i -> list), for old and new manifests."""
    if array.get("tasks") is not None:
        return [list(t) for t in array["tasks"]]
    k = int(array.get("runs_per_task", 1))
    runs = submission.get("runs", [])
    o, n = int(array["offset"]), int(array.get("n_runs", array["size"] * k))
    mine = runs[o:o + n]
    return [mine[i:i + k] for i in range(0, len(mine), k)]


def submission_folders(manifest: Mapping) -> dict[int, str | None]:
    """Submission number -> the submitit folder its jobs write logs and pickles to."""
    return {s["n"]: s.get("folder") for s in manifest["submissions"]}


# =============================================================================== config identity
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_hash(flat: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    ignore = list(ignore)
    items = {k: v for k, v in flat.items() if not key_matches(k, ignore)}
    return hashlib.sha256(_canonical(items).encode()).hexdigest()[:16]


def varying_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Leaf keys whose value differs between runs (or that only some runs have)."""
    if not flats:
        return []
    keys = set().union(*[set(f) for f in flats])
    out = []
    for k in sorted(keys):
        vals = {_canonical(f.get(k, "<absent>")) for f in flats}
        if len(vals) > 1:
            out.append(k)
    return out


def _explain_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> str:
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if _canonical(a) != _canonical(b):
            lines.append(f"    {k}: {_canonical(a)} (recorded) != {_canonical(b)} (now)")
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


@dataclasses.dataclass
class PlannedRun:
    """One composed job of a sweep: what the launcher hands to ``submit.submit_sweep``.

    ``flat`` is the run's configuration as compared between submissions of one sweep folder: the
    trainer's identity items (``nondet_hpc.config.identity_items``), flattened to dotted keys.
    """

    run_id: str
    run_dir: Path
    overrides: list[str]
    cfg: Any  # resolved job config (DictConfig or dict) without the hydra node
    flat: dict[str, Any]  # flattened plain config (for identity checks)
    config_hash: str = ""
    force: bool = False
    # digest of what decides this job's config (the launcher's composer.plan_key + its own
    # settings); recorded so an identical rerun finds the run without composing it. None: unknown
    plan_key: str | None = None
    # the resolved config as plain data: what the job pickle carries (~100x faster to pickle)
    container: dict | None = None


class _Fields(dict):
    """A resolved container read the way ``rundir.run_id`` reads a config (``cfg.source.name``):
    the run id from the one ``to_container`` a job needs, not from a second one."""

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return _Fields(value) if isinstance(value, dict) else value


def plan_run(cfg: Any, overrides: Sequence[str], ignore_keys: Sequence[str] = (),
             plan_key: str | None = None) -> PlannedRun:
    """Build a PlannedRun from a resolved job config (DictConfig or dict).

    ``ignore_keys``: more keys left out of the config hash; the bookkeeping keys
    (config.BOOKKEEPING_KEYS) are never in a run's identity to begin with.
    """
    from omegaconf import DictConfig, OmegaConf

    dcfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    container = OmegaConf.to_container(dcfg, resolve=True)
    flat = dict(identity_items(container))
    run_id = rundir.run_id(_Fields(container))
    return PlannedRun(run_id=run_id, run_dir=(Path(str(container["out_dir"])) / rundir.RUNS / run_id).absolute(),
                      overrides=list(overrides), cfg=dcfg, flat=flat,
                      config_hash=config_hash(flat, ignore_keys), force=bool(container.get("force", False)),
                      plan_key=plan_key, container=container)


def manifest_from_runs(out_dirs: Iterable[Path], ignore_keys: Sequence[str] = ()) -> dict | None:
    """What run folders written without sweep.json (the local launcher) say, in sweep.json's shape.

    Each run's identity comes from its run.json (``identity`` + ``seed``, as ``task.run`` writes
    them); the runs form one earlier "submission" for :func:`check_compatible`, so a SLURM sweep
    into a local folder follows the same rules as one into a SLURM folder. None: no such run.
    """
    runs: dict[str, dict] = {}
    flats: dict[str, dict] = {}
    folders = []
    for out_dir in dict.fromkeys(Path(d) for d in out_dirs):
        if not (out_dir / rundir.RUNS).is_dir():
            continue
        folders.append(str(out_dir))
        for run in rundir.list_runs(out_dir):
            data, _why = rundir.read_run_json(run)
            if not data or not isinstance(data.get("identity"), dict) or "seed" not in data:
                continue  # never started, or not ours: nothing to compare
            flat = {**data["identity"], "seed": data["seed"]}
            flats[run.name] = flat
            runs[run.name] = {"run_dir": str(run), "config_hash": config_hash(flat, ignore_keys),
                              "jobs": [{"local": True}]}
    if not runs:
        return None
    vary = varying_keys(list(flats.values()))
    first = next(iter(flats.values()))
    label = f"the runs in {', '.join(f + '/runs' for f in folders)} (their run.json; no sweep.json)"
    return {"sweep_dir": ", ".join(folders), "runs": runs, "submissions": [{
        "n": 0, "label": label, "base_config": {k: v for k, v in first.items() if k not in set(vary)},
        "varying_keys": vary, "arrays": [{"local": True}],
        "run_values": {rid: {k: f[k] for k in vary if k in f} for rid, f in flats.items()}}]}


def _threads_hint(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The thread count is part of a run's identity on CPU (it changes results): say how to match."""
    was, now = old.get("train.threads"), new.get("train.threads")
    if was == now or was is None:
        return ""
    if was == 0:
        return ("\n  These runs were made when train.threads=0 was not resolved; it is now resolved to the count "
                "the run uses (on SLURM: cpus_per_task), so they keep their old ids. See docs/troubleshooting.md, "
                "\"train.threads\".")
    return (f"\n  The recorded runs used {was} CPU thread(s): pass train.threads={was} (and, on SLURM, "
            f"hydra.launcher.cpus_per_task={was}) to add runs with the same numerics.")


_HINT = ("  Use another out_dir for a different configuration (e.g. out_dir=outputs/<name>), or "
         "delete the folder to start afresh.")


def _check_run_hashes(manifest: Mapping, planned: Sequence[PlannedRun]) -> None:
    """A run id already recorded (with jobs) must come with the same config hash."""
    for run in planned:
        rec = manifest["runs"].get(run.run_id)
        if not (rec and rec.get("jobs") and rec.get("config_hash")) or rec["config_hash"] == run.config_hash:
            continue
        old: dict = {}
        for sub in reversed(manifest["submissions"]):
            if run.run_id in sub.get("run_values", {}):
                old = {**sub.get("base_config", {}), **sub["run_values"][run.run_id]}
                break
        detail = _explain_diff(old, run.flat) if old else "    (the recorded config hash differs)"
        raise SweepConfigMismatch(
            f"sweep folder {manifest.get('sweep_dir', '')} already has run {run.run_id} with another "
            f"configuration:\n{detail}\n{_HINT}")


def check_compatible(manifest: Mapping, planned: Sequence[PlannedRun], run_keys: Sequence[str],
                     ignore_keys: Sequence[str]) -> None:
    """Refuse to mix runs of two configurations in one sweep folder.

    Two checks: (1) a run id already recorded must come with the same config hash; (2) the
    base config (everything but the keys this sweep or an earlier one varied, ``run_keys`` and
    ``ignore_keys``) must equal the one recorded by earlier submissions.
    """
    _check_run_hashes(manifest, planned)
    # only submissions that queued something constrain later ones (a refused sbatch ran nothing)
    earlier = [s for s in manifest["submissions"] if s.get("base_config") is not None and s.get("arrays")]
    if not earlier or not planned:
        return
    skip = set(varying_keys([r.flat for r in planned])) | set(ignore_keys) | set(run_keys)
    for s in earlier:
        skip |= set(s.get("varying_keys", []))
    skip_list = sorted(skip)
    new_base = {k: v for k, v in planned[0].flat.items() if not key_matches(k, skip_list)}
    for s in earlier:
        old_base = {k: v for k, v in s["base_config"].items() if not key_matches(k, skip_list)}
        if _canonical(old_base) != _canonical(new_base):
            where = s.get("label") or f"submission {s.get('n')} of {s.get('time')}"
            raise SweepConfigMismatch(
                f"sweep folder {manifest.get('sweep_dir', '')} holds runs of another configuration "
                f"({where}):\n{_explain_diff(old_base, new_base)}{_threads_hint(old_base, new_base)}\n"
                f"  Keys allowed to differ between runs of one sweep folder: {', '.join(run_keys)} "
                f"(hydra.launcher.run_keys) and the keys a sweep varies.\n{_HINT}")
