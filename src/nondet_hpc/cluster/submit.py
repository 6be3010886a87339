"""Submitting a sweep: what is left to run, arrays chunked to MaxArraySize, the reducer job.

The Hydra launcher (hydra_plugins.nondet_hpc_launcher) composes one config per run and calls
:func:`submit_sweep`, which returns as soon as sbatch has accepted the jobs; nothing here waits
for a job. sweep.json (:mod:`nondet_hpc.sweep.manifest`) is written before the first sbatch and
after every step, so a refusal half-way leaves a record of what was queued. Success of a run is
its DONE file, never SLURM's exit state. The job pickles are written by :mod:`.pickles`, the
sbatch calls made by :mod:`.arrays`, each identifiable by its submission token (:mod:`.tokens`:
an sbatch that answers late is looked up, never lost, and a rerun looks up what never answered
before it submits anything). Nothing is submitted into a folder others could write
(:mod:`nondet_hpc.sweep.trust`), and arrays queued without their reducer get one. Runs perturbed
from epoch k (``source.from_epoch``) come with their parents (:mod:`.lineage`: the parents' array
first, the children's ``afterok`` behind it); a sweep with ``barriers.pairs`` > 0 gets a barrier job
between the arrays and the reducer (:mod:`.barrier_job`).
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
                              submission_folders, sweep_lock)
from ..sweep.trust import check_sweep_folder, owner_only_umask
from . import fields
from . import lineage
from .arrays import Launch, check_reducer_place, submit_arrays, submit_reducer
from .barrier_job import submit_barriers, sweep_barriers
from .client import ACTIVE_STATES, DEFAULT_TIMEOUT_S, SlurmError, SubmissionError, current_user, query_squeue, \
    require_sbatch, submit_limit
from .pack import check_packing
from .params import cpu_sharing
from .pickles import private_folder
from .tokens import resolve, unanswered


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
    notes: list[str] = dataclasses.field(default_factory=list)  # late answers found, CPU sharing, ...
    barriers: dict | None = None  # the barrier job (cluster/barrier_job.py), when the sweep asks for barriers
    parents: dict[str, str] = dataclasses.field(default_factory=dict)  # child run id -> parent run id

    def job_ids(self) -> list[str]:
        ids = [a["job_id"] for a in self.arrays]
        if self.barriers:
            ids.append(self.barriers["job_id"])
        if self.reducer:
            ids.append(self.reducer["job_id"])
        return ids


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


def _triage(launch: Launch, runs: list[PlannedRun]) -> tuple[list[PlannedRun], list[PlannedRun], list[PlannedRun]]:
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
        launch = Launch(sweep_dir, dict(params), _submitit_folder(sweep_dir, params),
                        float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S), current_user(), manifest)
        if unanswered(manifest):
            return None  # an sbatch call to look up first: the full path does
        done, active, todo = _triage(launch, unique)  # type: ignore[arg-type] - KnownRun has what it reads
        want_reducer = bool(fields.value(dict(params.get("reducer") or {}), "enabled", reducer=True))
        if todo or _reducer_missing(launch, want_reducer):
            return None
    return SubmissionResult(sweep_dir, None, [], [r.run_id for r in done], [r.run_id for r in active], [], [], None,
                            duplicates)


def _submitit_folder(sweep_dir: Path, params: Mapping[str, Any]) -> Path:
    return Path(str(params.get("submitit_folder") or sweep_dir / "slurm")).absolute()


def _within_submit_limit(launch: Launch, todo: list[PlannedRun],
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
    # the reducer and the barrier job (cluster/barrier_job.py) count one job each
    room = limit - in_queue - (1 if want_reducer else 0) - (1 if sweep_barriers(todo) else 0)
    if room <= 0:
        raise SubmissionError(
            f"your submit limit is {limit} jobs (MaxSubmitJobs; array tasks count one each) and "
            f"{in_queue} of your jobs are queued already: no room for the {len(todo)} runs of "
            f"this sweep. Rerun the same command when jobs have finished (it submits only "
            f"what is missing), or set hydra.launcher.max_submit.")
    return todo[:room], todo[room:]


def _new_record(launch: Launch, runs: list[PlannedRun], todo: list[PlannedRun], skipped: dict[str, list[str]],
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


def _reducer_missing(launch: Launch, want_reducer: bool) -> bool:
    """Arrays of this sweep still queued or running and no reducer job of it behind them (its sbatch
    failed or never answered): the reducer must follow its arrays, so one is queued now."""
    if not want_reducer:
        return False
    arrays, reducers = set(), set()
    for s in launch.manifest["submissions"]:
        arrays |= {(a["job_id"], s.get("folder")) for a in s.get("arrays", [])}
        if s.get("reducer"):
            reducers.add((s["reducer"]["job_id"], s.get("folder")))
    alive = [(k.split("_")[0], j) for k, j in launch.queue.items() if j.state in ACTIVE_STATES]
    return (any(j.belongs_to(f) for a, f in arrays for k, j in alive if k == a)
            and not any(j.belongs_to(f) for r, f in reducers for k, j in alive if k == r))


def _open(sweep_dir: Path, params: Mapping[str, Any], manifest: dict) -> Launch:
    """A Launch of this folder; sbatch calls of earlier launches whose answer never came are
    looked up first (:func:`.tokens.resolve`) and what was found is recorded."""
    launch = Launch(sweep_dir, dict(params), _submitit_folder(sweep_dir, params),
                    float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S), current_user(), manifest)
    found = resolve(manifest, launch.user, launch.timeout)
    if found:
        launch.notes += found
        launch.save()
    return launch


def _checked_folder(sweep_dir: str | os.PathLike, params: Mapping[str, Any]) -> Path:
    """The sweep folder (made when missing), refused when others could change what its jobs run."""
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    check_sweep_folder(sweep_dir, _submitit_folder(sweep_dir, params),
                       trust_group=bool(fields.value(params, "trust_group")))
    return sweep_dir


def submit_sweep(sweep_dir: str | os.PathLike, planned: Sequence[PlannedRun], params: Mapping[str, Any],
                 *, argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> SubmissionResult:
    """Submit the runs of a sweep that are neither done nor queued/running; record everything.

    ``params`` is the launcher config (see hydra_plugins.nondet_hpc_launcher.config). Returns
    after sbatch has accepted the arrays and the reducer job; never waits for a job. Refused
    (:class:`nondet_hpc.sweep.trust.TrustError`) before anything is read or queued when others
    could change what the jobs run; what it creates is the user's alone (:func:`owner_only_umask`).
    """
    params = dict(params)
    params["runs_per_task"], params["mps"] = check_packing(params)
    require_sbatch()
    with owner_only_umask(bool(fields.value(params, "trust_group"))):
        sweep_dir = _checked_folder(sweep_dir, params)
        with sweep_lock(sweep_dir):
            return _submit(sweep_dir, planned, params, argv, echo)


def _submit(sweep_dir: Path, planned: Sequence[PlannedRun], params: dict[str, Any], argv: Sequence[str] | None,
            echo: Callable[[str], None]) -> SubmissionResult:
    runs, duplicates = _unique(planned)
    family = lineage.plan_lineage(runs, list(params.get("ignore_keys") or []))
    runs = family.runs  # with the parents the runs perturbed later start from
    want_reducer = bool(fields.value(dict(params.get("reducer") or {}), "enabled", reducer=True))
    run_keys, ignore_keys = list(params.get("run_keys") or []), list(params.get("ignore_keys") or [])
    recorded = load_manifest(sweep_dir)
    if recorded is None:
        # no sweep.json: run folders of the local launcher follow the same rules (their run.json)
        local = manifest_from_runs([r.run_dir.parent.parent for r in runs], ignore_keys)
        if local:
            check_compatible(local, runs, run_keys, ignore_keys)
    launch = _open(sweep_dir, params, recorded or new_manifest(sweep_dir))
    check_compatible(launch.manifest, runs, run_keys, ignore_keys)
    done, active, todo = _triage(launch, runs)
    lineage.missing_checkpoints(family, done, active, todo, launch.manifest)
    todo, over_limit = _within_submit_limit(launch, lineage.order(family, todo), want_reducer)
    todo, over_limit = lineage.hold_orphans(family, todo, over_limit, {r.run_id for r in done + active})
    skipped = {"done": [r.run_id for r in done], "active": [r.run_id for r in active],
               "over_limit": [r.run_id for r in over_limit], "duplicates": duplicates}
    launch.record = _new_record(launch, runs, todo, skipped, argv)
    _record_runs(launch.manifest, runs)
    lineage.record(family, launch.manifest, todo)
    result = SubmissionResult(sweep_dir, None, [], skipped["done"], skipped["active"], skipped["over_limit"],
                              [], None, duplicates, notes=launch.notes, parents=dict(family.parent_of))
    if not todo:
        if _reducer_missing(launch, want_reducer):
            _reducer_alone(launch, result)
        launch.save()  # runs recorded, no submission record unless a reducer was missing
        return result
    sharing = cpu_sharing(params)
    if sharing:
        launch.record["cpu_sharing"] = sharing
        launch.notes.append(f"note: {sharing}")
    private_folder(launch.folder)
    launch.manifest["submissions"].append(launch.record)
    launch.save()  # sweep.json exists before anything is submitted
    result.submission = launch.record["n"]
    if want_reducer:
        check_reducer_place(launch)
    _queue_runs(launch, family, todo, active, result, echo)
    result.barriers = _queue_barriers(launch, todo)
    if want_reducer:
        result.reducer = submit_reducer(launch)
        result.superseded = launch.record.get("superseded_reducers", [])
    launch.record["status"] = "submitted"
    launch.save()
    return result


def _queue_runs(launch: Launch, family: lineage.Lineage, todo: list[PlannedRun], active: list[PlannedRun],
                result: SubmissionResult, echo: Callable[[str], None]) -> None:
    """The arrays: the parents first (role parents), the runs that need no parent, then the children
    (role children), which wait for their parents (afterok, killed when a parent fails)."""
    groups: dict[str | None, list[PlannedRun]] = {lineage.PARENTS: [], None: [], lineage.CHILDREN: []}
    for r in todo:
        groups[family.role(r.run_id)].append(r)
    parent_arrays: dict[str, str] = {}
    base = 0
    for role, group in groups.items():
        if not group:
            continue
        dependency = (lineage.parent_dependency(family, group, parent_arrays, active, launch.manifest)
                      if role == lineage.CHILDREN else None)
        start = len(result.arrays)
        submit_arrays(launch, group, result.submitted, result.arrays, echo, dependency=dependency, role=role, base=base)
        base += len(group)
        if role == lineage.PARENTS:
            parent_arrays = {rid: a["job_id"] for a in result.arrays[start:] for task in a["tasks"] for rid in task}


def _queue_barriers(launch: Launch, todo: list[PlannedRun]) -> dict | None:
    """The barrier job behind the arrays when the sweep asks for barriers (``barriers.pairs`` > 0);
    a refusal is noted (the reducer is still queued: its report then lacks the barriers)."""
    settings = sweep_barriers(todo)
    if settings is None:
        return None
    try:
        return submit_barriers(launch, settings)
    except SlurmError as e:
        launch.record["barriers_error"] = str(e)
        launch.notes.append(f"the barrier job was not queued ({e}); compute the barriers after the runs with "
                            f"python -m nondet_hpc.barriers {shlex.quote(str(launch.sweep_dir))} --pairs "
                            f"{settings['pairs']}, then python -m nondet_hpc.reduce again")
        launch.save()
        return None


def _reducer_alone(launch: Launch, result: SubmissionResult) -> None:
    """A submission of a reducer job and no runs (its record is ``launch.record``)."""
    private_folder(launch.folder)
    launch.record.update(runs=[], run_values={}, base_config={}, varying_keys=[])
    launch.manifest["submissions"].append(launch.record)
    launch.save()
    result.submission = launch.record["n"]
    result.reducer = submit_reducer(launch)
    result.superseded = launch.record.get("superseded_reducers", [])
    launch.record["status"] = "submitted"
    launch.save()


def submit_reducer_only(sweep_dir: str | os.PathLike, params: Mapping[str, Any], *,
                        argv: Sequence[str] | None = None) -> SubmissionResult | None:
    """Queue a reducer job and no runs (a study whose reducer was lost between waves: the new one
    decides the wave, cluster/advance.py); None when a reducer of this sweep is still queued/running.
    It waits (afterany) for every array of the sweep SLURM still lists."""
    params = dict(params)
    require_sbatch()
    with owner_only_umask(bool(fields.value(params, "trust_group"))):
        sweep_dir = _checked_folder(sweep_dir, params)
        with sweep_lock(sweep_dir):
            recorded = load_manifest(sweep_dir)
            if recorded is None:
                return None
            launch = _open(sweep_dir, params, recorded)
            launch.queue = query_squeue(launch.user, launch.timeout)
            for sub in recorded["submissions"]:
                q = launch.queue.get((sub.get("reducer") or {}).get("job_id", ""))
                if q and q.state in ACTIVE_STATES and q.belongs_to(sub.get("folder")):
                    return None
            launch.record = _new_record(launch, [], [], {"done": [], "active": [], "over_limit": [],
                                                         "duplicates": []}, argv)
            result = SubmissionResult(sweep_dir, None, [], [], [], [], [], None, notes=launch.notes)
            _reducer_alone(launch, result)
    return result


def describe_submission(res: SubmissionResult, params: Mapping[str, Any]) -> str:
    """What the launcher prints: job ids, the sweep folder and the commands to follow it."""
    sd = shlex.quote(str(res.sweep_dir))
    n_all = len(res.submitted) + len(res.done) + len(res.active) + len(res.over_limit)
    lines = [f"nondet_hpc: sweep {res.sweep_dir}: {n_all} runs: {len(res.done)} done, "
             f"{len(res.active)} queued/running, {len(res.submitted)} submitted now"]
    if res.duplicates:
        lines.append(f"  {len(res.duplicates)} overrides named a run already in this sweep (ignored)")
    lines += [f"  {note}" for note in res.notes]
    part = params.get("partition") or "(default partition)"
    for a in res.arrays:
        dep = f", after {a['dependency']}" if a.get("dependency") else ""
        # a cap is news only when it holds tasks back (not for a 1-task chunk, or a cap >= size)
        cap = f", at most {a['parallelism']} at once" if a["parallelism"] < a["size"] else ""
        k = int(a.get("runs_per_task", 1))
        packed = f" of {k} runs each" if k > 1 else ""
        last = a["offset"] + a.get("n_runs", a["size"]) - 1
        runs = f"run {a['offset']}" if last == a["offset"] else f"runs {a['offset']}-{last}"
        role = {lineage.PARENTS: ": the parent runs, first", lineage.CHILDREN: ": runs that start from their "
                "parent's checkpoint (cancelled by SLURM if a parent fails)"}.get(a.get("role"), "")
        lines.append(f"  array job {a['job_id']}: {a['size']} task{'s' if a['size'] != 1 else ''}{packed} ({runs} of "
                     f"submission {res.submission}{cap}), partition {part}{dep}{role}")
    if res.barriers:
        bdep = f" ({res.barriers['dependency']})" if res.barriers.get("dependency") else ""
        lines.append(f"  barrier job {res.barriers['job_id']}{bdep}, partition {part}: {res.barriers['command']}")
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
