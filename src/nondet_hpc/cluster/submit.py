"""Submitting a sweep: what is left to run, arrays chunked to MaxArraySize, the reducer job.

The Hydra launcher (hydra_plugins.nondet_hpc_launcher) composes one config per run and calls
:func:`submit_sweep`, which returns as soon as sbatch has accepted the jobs; nothing here waits
for a job. sweep.json (:mod:`nondet_hpc.sweep.manifest`) is written before the first sbatch and
after every step, so a refusal half-way leaves a record of what was queued. Success of a run is
its DONE file, never SLURM's exit state. The job pickles are written by :mod:`.pickles`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..rundir import is_done
from ..sweep.identity import PlannedRun, check_compatible, manifest_from_runs, varying_keys
from ..sweep.manifest import (jsonable, latest_job, load_manifest, manifest_path, new_manifest, now_iso,
                              submission_folders, sweep_lock, write_manifest)
from . import fields
from .client import (ACTIVE_STATES, DEFAULT_TIMEOUT_S, JobInfo, SlurmError, SubmissionError, current_user,
                     max_array_size, query_squeue, require_sbatch, run_command, sbatch, submit_limit)
from .jobs import ReduceJob
from .pack import check_packing
from .pickles import discard_temporary, job_pickle_path, pickle_job, private_folder, task_job
from .script import sbatch_script


@dataclasses.dataclass
class SubmissionResult:
    sweep_dir: Path
    submission: int | None
    submitted: list[str]  # run ids
    done: list[str]
    active: list[str]
    over_limit: list[str]
    arrays: list[dict]
    reducer: dict | None
    duplicates: list[str] = dataclasses.field(default_factory=list)
    superseded: list[str] = dataclasses.field(default_factory=list)

    def job_ids(self) -> list[str]:
        ids = [a["job_id"] for a in self.arrays]
        if self.reducer:
            ids.append(self.reducer["job_id"])
        return ids


@dataclasses.dataclass
class _Launch:
    """One call of submit_sweep: the folder, settings and the manifest being written."""

    sweep_dir: Path
    params: dict[str, Any]
    folder: Path  # submitit folder: scripts, pickles, logs
    timeout: float
    user: str
    manifest: dict
    queue: dict[str, JobInfo] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self) -> None:
        write_manifest(self.sweep_dir, self.manifest)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(offset, size) of the arrays that hold ``n`` runs, at most ``size`` per array."""
    return [(o, min(size, n - o)) for o in range(0, n, size)]


def _unique(planned: Sequence[PlannedRun]) -> tuple[list[PlannedRun], list[str]]:
    """One run per run id (two overrides may name the same run) and the ids named again."""
    unique: dict[str, PlannedRun] = {}
    duplicates = []
    for run in planned:
        if run.run_id in unique:
            duplicates.append(run.run_id)
        else:
            unique[run.run_id] = run
    return list(unique.values()), duplicates


def _triage(launch: _Launch, runs: list[PlannedRun]) -> tuple[list[PlannedRun], list[PlannedRun], list[PlannedRun]]:
    """Split into done, queued/running (a job of ours SLURM still lists) and to do."""
    manifest = launch.manifest
    recorded = [latest_job(manifest["runs"].get(r.run_id)) for r in runs]
    if any(recorded) or any(s.get("arrays") for s in manifest["submissions"]):
        # raises when SLURM does not answer: better submit nothing than submit twice
        launch.queue = query_squeue(launch.user, launch.timeout)
    folders = submission_folders(manifest)
    done, active, todo = [], [], []
    for run, job in zip(runs, recorded):
        q = launch.queue.get(job["job_id"]) if job else None
        if q and q.state in ACTIVE_STATES and q.belongs_to(folders.get(job.get("submission"))):
            active.append(run)
        elif is_done(run.run_dir) and not run.force:
            done.append(run)
        else:
            todo.append(run)
    return done, active, todo


@dataclasses.dataclass
class KnownRun:
    """A run found in sweep.json by its plan key (not composed): enough to tell done/queued."""

    run_id: str
    run_dir: Path
    force: bool = False


def nothing_to_submit(sweep_dir: str | os.PathLike, runs: Sequence[KnownRun],
                      params: Mapping[str, Any]) -> SubmissionResult | None:
    """The identical rerun: a result when every run is done or queued/running, else None.

    The launcher calls this with the runs its plan keys found in sweep.json, before composing
    any job config; None sends it down the full path (compose, check, submit what is missing).
    """
    sweep_dir = Path(sweep_dir).absolute()
    unique, duplicates = _unique(runs)  # type: ignore[arg-type] - _unique reads run_id only
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir)
        if manifest is None:
            return None
        launch = _Launch(sweep_dir, dict(params), _submitit_folder(sweep_dir, params),
                         float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S), current_user(), manifest)
        done, active, todo = _triage(launch, unique)  # type: ignore[arg-type] - KnownRun has what it reads
    if todo:
        return None
    return SubmissionResult(sweep_dir, None, [], [r.run_id for r in done], [r.run_id for r in active], [], [], None,
                            duplicates)


def _submitit_folder(sweep_dir: Path, params: Mapping[str, Any]) -> Path:
    return Path(str(params.get("submitit_folder") or sweep_dir / "slurm")).absolute()


def _within_submit_limit(launch: _Launch, todo: list[PlannedRun],
                         want_reducer: bool) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """(what fits under the user's MaxSubmitJobs, what does not); refuses when nothing fits."""
    if not todo:
        return todo, []
    limit = launch.params.get("max_submit")
    if limit is None:
        limit = submit_limit(launch.user, launch.params.get("qos"), launch.timeout)
    if not limit or limit <= 0:
        return todo, []
    in_queue = len({j.job_id for j in query_squeue(launch.user, launch.timeout).values()})
    room = limit - in_queue - (1 if want_reducer else 0)
    if room <= 0:
        raise SubmissionError(
            f"your submit limit is {limit} jobs (MaxSubmitJobs; array tasks count one each) and "
            f"{in_queue} of your jobs are queued already: no room for the {len(todo)} runs of "
            f"this sweep. Rerun the same command when jobs have finished (it submits only "
            f"what is missing), or set hydra.launcher.max_submit.")
    return todo[:room], todo[room:]


def _new_record(launch: _Launch, runs: list[PlannedRun], todo: list[PlannedRun], skipped: dict[str, list[str]],
                argv: Sequence[str] | None) -> dict[str, Any]:
    """The submission record appended to sweep.json before anything is queued."""
    flats = [r.flat for r in runs]
    vary = varying_keys(flats)
    return {
        "n": len(launch.manifest["submissions"]), "time": now_iso(), "user": launch.user,
        "host": socket.gethostname(), "cwd": os.getcwd(), "argv": list(argv if argv is not None else sys.argv),
        "status": "planned", "launcher": jsonable(launch.params), "folder": str(launch.folder),
        "base_config": {k: v for k, v in flats[0].items() if k not in set(vary)} if flats else {},
        "varying_keys": vary,
        "runs": [r.run_id for r in todo],
        "skipped": skipped,
        "arrays": [], "reducer": None,
        # a run's full config = base_config + its run_values (kept small for 1000s of runs)
        "run_values": {r.run_id: {k: r.flat[k] for k in vary if k in r.flat} for r in todo},
    }


def _record_runs(manifest: dict, runs: list[PlannedRun]) -> None:
    for r in runs:
        rec = manifest["runs"].setdefault(r.run_id, {"run_dir": str(r.run_dir), "overrides": r.overrides,
                                                      "config_hash": r.config_hash, "jobs": []})
        rec.update(run_dir=str(r.run_dir), overrides=r.overrides, config_hash=r.config_hash)
        if r.plan_key and not r.force:  # a force run must be composed again (it retrains a DONE run)
            rec["plan_key"] = r.plan_key
        else:
            rec.pop("plan_key", None)


def _fail(launch: _Launch, status: str, error: str) -> None:
    launch.record["status"] = status
    launch.record["error"] = error
    launch.save()


def _check_reducer_place(launch: _Launch) -> None:
    """A reducer bound for another partition/account/qos is checked by SLURM (sbatch --test-only)
    before any array is queued, so a typo there never leaves arrays without their reducer."""
    p, r = launch.params, dict(launch.params.get("reducer") or {})
    if not any((r.get(k) or p.get(k)) != p.get(k) for k in ("partition", "account", "qos")):
        return
    script_path = launch.folder / f"sub{launch.record['n']:03d}_reduce.sh"
    script_path.write_text(sbatch_script(p, launch.folder, reducer=True))
    try:
        sbatch(script_path, launch.timeout, test_only=True)
    except SlurmError as e:
        _fail(launch, "failed", f"reducer job: {e}")
        raise SubmissionError(f"reducer job (hydra.launcher.reducer.*): {e}") from None


def _submit_array(launch: _Launch, c: int, runs: list[PlannedRun], offset: int, parallelism: int | None,
                  dependency: str | None) -> dict:
    """Write one array's script and pickles, sbatch it, record its tasks in the manifest.

    Task i holds ``runs[i*K:(i+1)*K]`` (K = runs_per_task; the last task may hold fewer)."""
    p, folder, sub_n = launch.params, launch.folder, launch.record["n"]
    k = int(p.get("runs_per_task") or 1)
    tasks = [runs[i:i + k] for i in range(0, len(runs), k)]
    script_path = folder / f"sub{sub_n:03d}_array{c:02d}.sh"
    script_path.write_text(sbatch_script(p, folder, array_size=len(tasks), parallelism=parallelism,
                                         dependency=dependency))
    max_requeue, timeout_min = int(fields.value(p, "max_requeue")), int(fields.value(p, "timeout_min"))
    tmp_pickles = [pickle_job(folder, task_job(p, task), timeout_min, max_requeue) for task in tasks]
    array_id = sbatch(script_path, launch.timeout)
    for i, tmp in enumerate(tmp_pickles):
        tmp.rename(job_pickle_path(folder, f"{array_id}_{i}"))
    arr = {"job_id": array_id, "offset": offset, "size": len(tasks), "parallelism": parallelism or len(tasks),
           "dependency": dependency, "script": str(script_path), "command": f"sbatch --parsable {script_path}",
           "runs_per_task": k, "n_runs": len(runs), "tasks": [[r.run_id for r in task] for task in tasks]}
    launch.record["arrays"].append(arr)
    for i, task in enumerate(tasks):
        for slot, run in enumerate(task):
            job = {"submission": sub_n, "job_id": f"{array_id}_{i}", "array_job_id": array_id, "index": i}
            if k > 1:
                job["slot"] = slot  # the task's K runs share its job id
            launch.manifest["runs"][run.run_id]["jobs"].append(job)
    launch.save()
    return arr


def _submit_arrays(launch: _Launch, todo: list[PlannedRun], result: SubmissionResult,
                   echo: Callable[[str], None]) -> None:
    """Chunk to MaxArraySize; with array_parallelism the chunks run one after another (afterany),
    so the cap holds for the whole sweep."""
    size = int(launch.params.get("max_array_size") or max_array_size(launch.timeout))
    k = int(launch.params.get("runs_per_task") or 1)
    # MaxArraySize counts tasks; each task holds k runs
    parts = [(o * k, min(n * k, len(todo) - o * k)) for o, n in chunks(-(-len(todo) // k), max(1, size))]
    par = launch.params.get("array_parallelism")
    par = int(par) if par else None
    chain = par is not None and len(parts) > 1 and par < -(-len(todo) // k)
    prev_array = None
    try:
        for c, (offset, n) in enumerate(parts):
            dependency = f"afterany:{prev_array}" if chain and prev_array else None
            arr = _submit_array(launch, c, todo[offset:offset + n], offset, par, dependency)
            result.arrays.append(arr)
            result.submitted += [r.run_id for r in todo[offset:offset + n]]
            prev_array = arr["job_id"]
    except SlurmError as e:
        discard_temporary(launch.folder)
        _fail(launch, "failed" if not launch.record["arrays"] else "partial", str(e))
        if launch.record["arrays"]:
            echo(f"nondet_hpc: submitted {len(result.submitted)} runs before SLURM refused the rest; "
                 "no reducer job queued.")
        raise


def _reducer_dependency(launch: _Launch) -> tuple[str, list[str]]:
    """afterany on this submission's arrays and on the still-queued arrays of earlier ones; and the
    pending reducers of earlier submissions, which the new one supersedes."""
    deps = [a["job_id"] for a in launch.record["arrays"]]
    earlier_reducers = []
    for s in launch.manifest["submissions"][:-1]:
        for a in s.get("arrays", []):
            if any(k.split("_")[0] == a["job_id"] and j.state in ACTIVE_STATES and j.belongs_to(s.get("folder"))
                   for k, j in launch.queue.items()):
                deps.append(a["job_id"])
        red = s.get("reducer") or {}
        rq = launch.queue.get(red.get("job_id", ""))
        if rq and rq.state == "PENDING" and rq.belongs_to(s.get("folder")):
            earlier_reducers.append(red["job_id"])
    # no array left to wait for (a reducer-only submission after them all): no dependency
    return ("afterany:" + ":".join(dict.fromkeys(deps))) if deps else "", earlier_reducers


def _submit_reducer(launch: _Launch, result: SubmissionResult) -> None:
    dependency, earlier_reducers = _reducer_dependency(launch)
    script_path = launch.folder / f"sub{launch.record['n']:03d}_reduce.sh"
    script_path.write_text(sbatch_script(launch.params, launch.folder, reducer=True, dependency=dependency))
    timeout_min = int(fields.value(dict(launch.params.get("reducer") or {}), "timeout_min", reducer=True))
    tmp = pickle_job(launch.folder, ReduceJob(str(launch.sweep_dir)), timeout_min, 0)
    try:
        red_id = sbatch(script_path, launch.timeout)
    except SlurmError as e:
        tmp.unlink(missing_ok=True)
        _fail(launch, "partial", f"reducer job: {e}")
        raise
    tmp.rename(job_pickle_path(launch.folder, red_id))
    launch.record["reducer"] = {"job_id": red_id, "dependency": dependency, "script": str(script_path),
                                "command": f"sbatch --parsable {script_path}"}
    result.reducer = launch.record["reducer"]
    if earlier_reducers:
        # superseded: the new reducer waits for everything the old ones waited for
        run_command(["scancel", *earlier_reducers], launch.timeout)
        launch.record["superseded_reducers"] = earlier_reducers
        result.superseded = earlier_reducers


def submit_sweep(sweep_dir: str | os.PathLike, planned: Sequence[PlannedRun], params: Mapping[str, Any],
                 *, argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> SubmissionResult:
    """Submit the runs of a sweep that are neither done nor queued/running; record everything.

    ``params`` is the launcher config (see hydra_plugins.nondet_hpc_launcher.config). Returns
    after sbatch has accepted the arrays and the reducer job; never waits for a job.
    """
    params = dict(params)
    params["runs_per_task"], params["mps"] = check_packing(params)
    require_sbatch()
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs, duplicates = _unique(planned)
    want_reducer = bool(fields.value(dict(params.get("reducer") or {}), "enabled", reducer=True))
    run_keys, ignore_keys = list(params.get("run_keys") or []), list(params.get("ignore_keys") or [])
    with sweep_lock(sweep_dir):
        recorded = load_manifest(sweep_dir)
        if recorded is None:
            # no sweep.json: run folders of the local launcher follow the same rules (their run.json)
            local = manifest_from_runs([r.run_dir.parent.parent for r in runs], ignore_keys)
            if local:
                check_compatible(local, runs, run_keys, ignore_keys)
        launch = _Launch(sweep_dir, params, _submitit_folder(sweep_dir, params),
                         float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S), current_user(),
                         recorded or new_manifest(sweep_dir))
        check_compatible(launch.manifest, runs, run_keys, ignore_keys)
        done, active, todo = _triage(launch, runs)
        todo, over_limit = _within_submit_limit(launch, todo, want_reducer)
        skipped = {"done": [r.run_id for r in done], "active": [r.run_id for r in active],
                   "over_limit": [r.run_id for r in over_limit], "duplicates": duplicates}
        launch.record = _new_record(launch, runs, todo, skipped, argv)
        _record_runs(launch.manifest, runs)
        result = SubmissionResult(sweep_dir, None, [], skipped["done"], skipped["active"], skipped["over_limit"],
                                  [], None, duplicates)
        if not todo:
            launch.save()  # runs recorded, no submission record
            return result
        private_folder(launch.folder, echo)  # before any record: a refusal leaves sweep.json as it was
        launch.manifest["submissions"].append(launch.record)
        launch.save()  # sweep.json exists before anything is submitted
        result.submission = launch.record["n"]
        if want_reducer:
            _check_reducer_place(launch)
        _submit_arrays(launch, todo, result, echo)
        if want_reducer:
            _submit_reducer(launch, result)
        launch.record["status"] = "submitted"
        launch.save()
    return result


def submit_reducer_only(sweep_dir: str | os.PathLike, params: Mapping[str, Any], *,
                        argv: Sequence[str] | None = None) -> SubmissionResult | None:
    """Queue a reducer job and no runs (a study whose reducer was lost between waves: the new one
    decides the wave, cluster/advance.py); None when a reducer of this sweep is still queued/running.
    It waits (afterany) for every array of the sweep SLURM still lists."""
    params = dict(params)
    require_sbatch()
    sweep_dir = Path(sweep_dir).absolute()
    with sweep_lock(sweep_dir):
        recorded = load_manifest(sweep_dir)
        if recorded is None:
            return None
        launch = _Launch(sweep_dir, params, _submitit_folder(sweep_dir, params),
                         float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S), current_user(), recorded)
        launch.queue = query_squeue(launch.user, launch.timeout)
        for sub in recorded["submissions"]:
            q = launch.queue.get((sub.get("reducer") or {}).get("job_id", ""))
            if q and q.state in ACTIVE_STATES and q.belongs_to(sub.get("folder")):
                return None
        launch.record = _new_record(launch, [], [], {"done": [], "active": [], "over_limit": [], "duplicates": []},
                                    argv)
        private_folder(launch.folder, print)
        launch.manifest["submissions"].append(launch.record)
        launch.save()
        result = SubmissionResult(sweep_dir, launch.record["n"], [], [], [], [], [], None)
        _submit_reducer(launch, result)
        launch.record["status"] = "submitted"
        launch.save()
    return result


def describe_submission(res: SubmissionResult, params: Mapping[str, Any]) -> str:
    """What the launcher prints: job ids, the sweep folder and the commands to follow it."""
    sd = shlex.quote(str(res.sweep_dir))
    n_all = len(res.submitted) + len(res.done) + len(res.active) + len(res.over_limit)
    lines = [f"nondet_hpc: sweep {res.sweep_dir}: {n_all} runs: {len(res.done)} done, "
             f"{len(res.active)} queued/running, {len(res.submitted)} submitted now"]
    if res.duplicates:
        lines.append(f"  {len(res.duplicates)} overrides named a run already in this sweep (ignored)")
    part = params.get("partition") or "(default partition)"
    for a in res.arrays:
        dep = f", after {a['dependency']}" if a.get("dependency") else ""
        # a cap is news only when it holds tasks back (not for a 1-task chunk, or a cap >= size)
        cap = f", at most {a['parallelism']} at once" if a["parallelism"] < a["size"] else ""
        k = int(a.get("runs_per_task", 1))
        packed = f" of {k} runs each" if k > 1 else ""
        last = a["offset"] + a.get("n_runs", a["size"]) - 1
        runs = f"run {a['offset']}" if last == a["offset"] else f"runs {a['offset']}-{last}"
        lines.append(f"  array job {a['job_id']}: {a['size']} task{'s' if a['size'] != 1 else ''}{packed} ({runs} of "
                     f"submission {res.submission}{cap}), partition {part}{dep}")
    if res.reducer:
        rpart = (params.get("reducer") or {}).get("partition") or part
        lines.append(f"  reducer job {res.reducer['job_id']} ({res.reducer['dependency']}), partition {rpart}: "
                     f"python -m nondet_hpc.reduce {sd}")
    if res.superseded:
        lines.append(f"  cancelled the pending reducer job(s) {' '.join(res.superseded)} of earlier submissions "
                     "(the new one waits for their arrays too)")
    if res.over_limit:
        lines.append(f"  NOT submitted: {len(res.over_limit)} runs over your submit limit; rerun the same "
                     "command when jobs have finished (it submits only what is missing)")
    if params.get("hold") and res.job_ids():
        lines.append(f"  jobs are HELD: release with  scontrol release {' '.join(res.job_ids())}")
    if not res.arrays:
        lines.append("  nothing to submit" + ("" if res.active else
                     f" (report: python -m nondet_hpc.reduce {sd})"))
    lines.append(f"  manifest: {manifest_path(res.sweep_dir)}")
    lines.append(f"  status:   python -m nondet_hpc.status {sd}")
    lines.append(f"  cancel:   python -m nondet_hpc.cancel {sd}")
    return "\n".join(lines)
