"""The state of every run of a sweep: DONE files, squeue, sacct and run.json heartbeats.

``python -m nondet_hpc.status`` (:mod:`.status`) prints what :func:`sweep_status` returns. DONE
decides success; then squeue (queued / running / requeued), then sacct (final state, exit code,
the requeue history), then run.json (epoch k of N, ETA). When accounting is unavailable (or
slow) squeue and the run folders are used instead; every SLURM command has a timeout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from .. import safeio
from ..rundir import RUNS, is_done, list_runs, read_run_json
from ..sweep.manifest import ManifestError, latest_job, load_manifest, now_iso, read_salvaged
from .client import (ACTIVE_STATES, REQUEUE_STATES, RUNNING_STATES, JobInfo, SlurmError, current_user,
                     query_sacct, query_squeue)

# what python -m nondet_hpc.status counts
STATES = ("pending", "running", "requeued", "done", "failed", "unsubmitted", "unknown")


@dataclasses.dataclass
class RunStatus:
    run_id: str
    run_dir: str
    state: str  # one of STATES
    job_id: str = ""
    slurm_state: str = ""
    exit_code: str = ""
    reason: str = ""
    restarts: int = 0
    epoch: int | None = None
    epochs: int | None = None
    progress: float | None = None
    eta_s: float | None = None
    heartbeat_age_s: float | None = None
    run_state: str = ""  # run.json "state"
    error: str = ""
    log_out: str = ""
    log_err: str = ""
    log_tail: list[str] = dataclasses.field(default_factory=list)
    note: str = ""


def heartbeat_progress(hb: Mapping[str, Any]) -> float | None:
    """Fraction of training done from run.json's heartbeat: optimizer steps done / total steps
    (``step``/``steps``), else epochs done / epochs."""
    try:
        if hb.get("step") is not None and hb.get("steps"):
            return max(0.0, min(1.0, float(hb["step"]) / float(hb["steps"])))
        if hb.get("epoch") is not None and hb.get("epochs"):
            return max(0.0, min(1.0, float(hb["epoch"]) / float(hb["epochs"])))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def apply_heartbeat(st: RunStatus, hb: Mapping[str, Any], now: float, stale_s: float | None = None) -> None:
    """Epoch k/N, progress, heartbeat age and ETA of a running run from its heartbeat.

    The ETA extrapolates the elapsed training time by the fraction done, minus the time since
    the heartbeat was written. ``stale_s``: note a heartbeat older than this.
    """
    bad = [k for k in ("epoch", "epochs", "time", "elapsed_s", "step", "steps")
           if hb.get(k) is not None and _number(hb.get(k)) is None]
    if bad:  # one run's garbage names that run; the others' status is unaffected
        st.note = "run.json heartbeat unreadable: " + ", ".join(f"{k}={hb.get(k)!r}"[:60] for k in bad)
        hb = {k: v for k, v in hb.items() if k not in bad}
    st.epoch, st.epochs = hb.get("epoch"), hb.get("epochs")
    st.progress = heartbeat_progress(hb)
    if hb.get("time"):
        st.heartbeat_age_s = max(0.0, now - float(hb["time"]))
        if stale_s is not None and st.heartbeat_age_s > stale_s:
            st.note = f"no heartbeat for {st.heartbeat_age_s / 60:.0f} min"
    el = hb.get("elapsed_s")
    if st.progress and el:
        eta = float(el) * (1 - st.progress) / st.progress - (st.heartbeat_age_s or 0.0)
        # a heartbeat older than its own ETA (a previous attempt's, right after a requeue, or a
        # slow epoch) says nothing about the time left: no ETA rather than a "0s" that is wrong
        st.eta_s = eta if eta > 0 or st.progress >= 1 else None


def _number(v: Any) -> float | None:
    """``v`` as a finite float, None when it is not a number (bool excluded)."""
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _heartbeat(info: Mapping[str, Any]) -> dict:
    hb = info.get("heartbeat")
    return hb if isinstance(hb, dict) else {}


def _log_tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a log: a regular file only (safeio.tail: a FIFO there never blocks)."""
    return safeio.tail(path).splitlines()[-n:]


def task_logs(folder: str | os.PathLike, job_id: str) -> tuple[Path, Path]:
    """submitit's log files of a job ("A_i" for array tasks)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def _counts(runs: list[RunStatus]) -> dict[str, int]:
    counts = {s: 0 for s in STATES}
    for r in runs:
        counts[r.state] += 1
    return counts


@dataclasses.dataclass
class _Slurm:
    """What SLURM said about a sweep's jobs; None where the command failed."""

    queue: dict[str, JobInfo] | None
    acct: dict[str, JobInfo] | None
    errors: dict[str, str]


def _ask_slurm(job_ids: list[str], timeout: float | None) -> _Slurm:
    seen = _Slurm(None, None, {})
    if not job_ids:
        return seen
    try:
        seen.queue = query_squeue(current_user(), timeout)
    except SlurmError as e:
        seen.errors["squeue"] = str(e)
    try:
        seen.acct = query_sacct(job_ids, timeout)
    except SlurmError as e:
        seen.errors["sacct"] = str(e)
    return seen


def _classify(st: RunStatus, has_job: bool, q: JobInfo | None, a: JobInfo | None, squeue_answered: bool) -> None:
    """Set ``st.state`` (and a note) from DONE, squeue ``q`` and sacct ``a``."""
    if is_done(Path(st.run_dir)):
        st.state = "done"
    elif not has_job:
        st.state = "unsubmitted"
    elif q and q.state in ACTIVE_STATES:
        if q.state in RUNNING_STATES and st.run_state == "failed":
            # a task of runs_per_task > 1 runs on while one of its runs has failed
            st.state = "failed"
            st.note = "failed while its task runs on (the task's other runs continue)"
        elif q.state in RUNNING_STATES:
            st.state = "running"
        elif q.state in REQUEUE_STATES or st.restarts > 0 or st.run_state == "preempted":
            st.state = "requeued"
        else:
            st.state = "pending"
    elif a and a.state in ACTIVE_STATES and not squeue_answered:
        # squeue failed, accounting says the job is alive
        st.state = ("running" if a.state in RUNNING_STATES else
                    "requeued" if a.state in REQUEUE_STATES or a.restarts else "pending")
    elif a:
        st.state = "failed"
        if a.state == "COMPLETED":
            st.note = "SLURM says COMPLETED but the run has no DONE file"
    elif squeue_answered:
        # in neither squeue nor sacct (accounting off or purged): the job is over
        st.state = "failed"
        st.slurm_state = st.slurm_state or "GONE"
        st.note = "job left the queue without DONE" + (f" (run.json: {st.run_state})" if st.run_state else "")
    else:
        st.state = "unknown"
        st.note = "SLURM did not answer; run.json state: " + (st.run_state or "none")


def _run_status(run_id: str, rec: Mapping, folders: Mapping[Any, Any], default_folder: Path, seen: _Slurm,
                now: float, tail: int, stale_s: float) -> RunStatus:
    st = RunStatus(run_id=run_id, run_dir=rec.get("run_dir", ""), state="unknown")
    info = read_run_json(Path(st.run_dir))[0] or {}
    st.run_state = str(info.get("state", ""))
    job = latest_job(rec)
    q = a = None
    if job:
        st.job_id = job["job_id"]
        out, err = task_logs(folders.get(job.get("submission"), default_folder), job["job_id"])
        st.log_out, st.log_err = str(out), str(err)
        q = (seen.queue or {}).get(st.job_id)
        if q and not q.belongs_to(folders.get(job.get("submission"))):
            q = None  # the id now belongs to someone else's job (cluster reset)
        a = (seen.acct or {}).get(st.job_id)
    if a:
        st.exit_code, st.restarts = a.exit_code, a.restarts
    if q:
        st.slurm_state, st.reason = q.state, q.reason
        st.restarts = max(st.restarts, q.restarts)
    elif a:
        st.slurm_state = a.state
    _classify(st, bool(job), q, a, seen.queue is not None)
    if job and "slot" in job and not st.note:
        st.note = f"run {job['slot'] + 1} of the runs packed in task {job['job_id']}"
    if st.state == "running" or (st.state == "unknown" and st.run_state == "running"):
        hb = _heartbeat(info)
        apply_heartbeat(st, hb, now, stale_s)
        if not _heartbeat_of_this_attempt(info, hb):
            st.eta_s = None  # the previous attempt's heartbeat: the new one has not written its own
    if st.log_out and not (Path(st.log_out).exists() or Path(st.log_err).exists()):
        # the task never started (cancelled while pending, a node that failed first): no logs
        st.log_out = st.log_err = ""
    if st.state == "failed":
        st.error = str(info.get("error", ""))[:2000]
        log = st.log_err if st.log_err and Path(st.log_err).exists() else st.log_out  # stderr_to_stdout
        if log:
            st.log_tail = _log_tail(Path(log), tail)
    return st


def _heartbeat_of_this_attempt(info: Mapping[str, Any], hb: Mapping[str, Any]) -> bool:
    """False when run.json says the run is not training now (preempted, before the restart wrote
    ``state: running``) or the heartbeat predates the last resume."""
    if info.get("state") not in (None, "running"):
        return False
    resumed = info.get("resumed_from")
    resumed = _number(resumed.get("time")) if isinstance(resumed, dict) else None
    beat = _number(hb.get("time"))
    return not (resumed and beat and beat < resumed)


def _job_status(manifest: Mapping, sweep_dir: Path, seen: _Slurm, key: str = "reducer") -> dict | None:
    """The newest reducer job (``key="barriers"``: barrier job): its SLURM state, its logs and, for
    the reducer, whether the report exists."""
    subs = [s for s in manifest["submissions"] if s.get(key)]
    if not subs:
        return None
    sub = subs[-1]
    rid = sub[key]["job_id"]
    q = (seen.queue or {}).get(rid)
    if q and not q.belongs_to(sub.get("folder")):
        q = None
    a = (seen.acct or {}).get(rid)
    out, err = task_logs(sub.get("folder", sweep_dir / "slurm"), rid)
    state = q.state if q else a.state if a else "GONE" if seen.queue is not None else "UNKNOWN"
    job = {"job_id": rid, "state": state, "exit_code": a.exit_code if a else "", "log_out": str(out),
           "log_err": str(err)}
    if key == "barriers":
        return {**job, "command": str(sub[key].get("command", "")), "reason": q.reason if q else ""}
    return {**job, "report": str(sweep_dir / "report"), "report_exists": (sweep_dir / "report").is_dir()}


def parent_notes(runs: list[RunStatus], manifest: Mapping) -> None:
    """A run that starts from a parent's checkpoint (sweep.json ``runs[id].parent``) and has not run:
    "waiting for parent run X" while the parent is to finish, "not run: parent X failed" once it
    failed (its job then ends with DependencyNeverSatisfied, or is killed by SLURM for it)."""
    by_id = {r.run_id: r for r in runs}
    for r in runs:
        parent = by_id.get(str((manifest["runs"].get(r.run_id) or {}).get("parent") or ""))
        if parent is None or r.state not in ("pending", "failed") or r.epoch is not None or r.run_state:
            continue  # a child that started (run.json written) failed on its own
        if parent.state == "failed" or r.reason == "DependencyNeverSatisfied":
            why = "failed" if parent.state == "failed" else "did not succeed (SLURM: DependencyNeverSatisfied)"
            r.state = "failed"
            r.note = (f"not run: its parent run {parent.run_id} {why} (job {parent.job_id or '-'}); fix the parent, "
                      f"then rerun the sweep command")
        elif parent.state in ("pending", "running", "requeued") and r.state == "pending":
            r.note = f"waiting for its parent run {parent.run_id} ({parent.state})"


def sweep_status(sweep_dir: str | os.PathLike, *, timeout: float | None = None, tail: int = 8,
                 stale_s: float = 900.0) -> dict:
    """State of every run of a sweep, from DONE files, squeue, sacct and run.json.

    sacct gives the final state of finished jobs; when accounting is unavailable (or slow), squeue
    and the run folder are used instead. Every SLURM command has a timeout.
    """
    sweep_dir = Path(sweep_dir).absolute()
    damage: dict[str, str] = {}
    try:
        manifest = load_manifest(sweep_dir)
    except ManifestError as e:  # status acts on what can be read, and says what could not
        manifest, lost = read_salvaged(sweep_dir)
        damage["sweep.json"] = _damage_note(e, manifest is not None)
    if manifest is None:
        if (sweep_dir / RUNS).is_dir() or damage:
            out = _local_status(sweep_dir, stale_s)
            out["errors"].update(damage)
            return out
        raise FileNotFoundError(f"{sweep_dir} holds neither sweep.json (written by hydra/launcher=slurm) "
                                "nor runs/: not a sweep folder")
    folders = {s["n"]: s.get("folder", str(sweep_dir / "slurm")) for s in manifest["submissions"]}
    job_ids = [j["job_id"] for r in manifest["runs"].values() for j in r.get("jobs", [])]
    job_ids += [s[key]["job_id"] for s in manifest["submissions"] for key in ("reducer", "barriers") if s.get(key)]
    seen = _ask_slurm(job_ids, timeout)
    now = time.time()
    runs = [_run_status(run_id, rec, folders, sweep_dir / "slurm", seen, now, tail, stale_s)
            for run_id, rec in manifest["runs"].items()]
    parent_notes(runs, manifest)
    if damage and (sweep_dir / RUNS).is_dir():  # runs whose entries were left out: from their folders
        named = set(manifest["runs"])
        runs += [_folder_status(d, now, stale_s) for d in list_runs(sweep_dir) if d.name not in named]
    accounting = ("sacct" if seen.acct is not None else
                  "squeue+run folder" if seen.queue is not None else "run folder")
    return {"sweep_dir": str(sweep_dir), "time": now_iso(), "counts": _counts(runs),
            "runs": [dataclasses.asdict(r) for r in runs], "reducer": _job_status(manifest, sweep_dir, seen),
            "barriers": _job_status(manifest, sweep_dir, seen, "barriers"),
            "submissions": len(manifest["submissions"]), "errors": {**damage, **seen.errors}, "accounting": accounting,
            "study": _study_summary(manifest.get("study")),
            # sbatch calls that never answered (cluster/tokens.py): looked up by the next submission
            "unanswered": [{"submission": s["n"], "kind": u["kind"], "token": u["token"], "time": u.get("time")}
                           for s in manifest["submissions"] for u in s.get("unanswered", [])
                           if u.get("outcome") == "unknown"]}


def _study_summary(study: Mapping | None) -> dict | None:
    """A study grown in waves (sweep/waves.py) without the configs and launcher settings it keeps."""
    if not study:
        return None
    out = {k: v for k, v in study.items() if k not in ("params", "ignore_keys", "groups")}
    out["groups"] = {label: {k: v for k, v in g.items() if k != "config"} for label, g in study["groups"].items()}
    return out


def _damage_note(e: ManifestError, salvaged: bool) -> str:
    shown = "; ".join(e.problems[:6]) + (f"; and {len(e.problems) - 6} more" if len(e.problems) > 6 else "")
    did = ("shown: the runs its readable entries name (their SLURM state), the other run folders from their "
           "run.json; jobs of damaged entries are not asked" if salvaged else
           "nothing of it can be used: shown from the run folders alone, SLURM not asked")
    return f"damaged ({shown}); {did}. Repair or restore {e.path} (see docs/troubleshooting.md)"


def _folder_status(run_dir: Path, now: float, stale_s: float) -> RunStatus:
    """A run's state from its folder alone (DONE, run.json state and heartbeat)."""
    info = read_run_json(run_dir)[0] or {}
    st = RunStatus(run_id=run_dir.name, run_dir=str(run_dir), state="unknown", run_state=str(info.get("state", "")))
    hb = _heartbeat(info)
    if is_done(run_dir):
        st.state = "done"
    elif st.run_state == "running":
        age = now - (_number(hb.get("time")) or _number(info.get("updated")) or 0.0)
        st.state = "running" if age < stale_s else "failed"
        if st.state == "failed":
            st.note = f"run.json says running but nothing was written for {age / 60:.0f} min"
    elif st.run_state in ("failed", "preempted"):
        st.state = "failed"
        st.note = "preempted: rerunning the sweep resumes it" if st.run_state == "preempted" else ""
        st.error = str(info.get("error", ""))[:2000]
    if st.state == "running":
        apply_heartbeat(st, hb, now)  # staleness was judged above: a stale run is failed here
    return st


def _local_status(sweep_dir: Path, stale_s: float) -> dict:
    """Status of a sweep folder without sweep.json (local launcher): from the run folders only."""
    now = time.time()
    runs = [_folder_status(d, now, stale_s) for d in list_runs(sweep_dir)] if (sweep_dir / RUNS).is_dir() else []
    return {"sweep_dir": str(sweep_dir), "time": now_iso(), "counts": _counts(runs),
            "runs": [dataclasses.asdict(r) for r in runs], "reducer": None, "submissions": 0,
            "errors": {}, "accounting": "run folders (no sweep.json: not a SLURM sweep)"}


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
