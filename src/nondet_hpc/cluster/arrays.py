"""The sbatch calls of one submission: its arrays (chunked to MaxArraySize) and the reducer job.

:func:`.submit.submit_sweep` decides what to submit and records it; this module queues it. Every
call writes its script and its job pickles first (pickles under names made from the call's
submission token, renamed to submitit's ``<job id>_submitted.pkl`` once SLURM gave the id), and
goes through :func:`.tokens.sbatch_identifiable`, so an sbatch that answers too late is looked up
by its token and recorded, never lost. sweep.json is saved after every call.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from .. import safeio
from ..sweep.identity import PlannedRun
from ..sweep.manifest import write_manifest
from . import fields
from .client import ACTIVE_STATES, JobInfo, SlurmError, SubmissionError, max_array_size, run_command, sbatch
from .jobs import ReduceJob
from .lineage import CHILDREN
from .pickles import adopt_pickles, discard_pickles, pickle_job, task_job
from .script import sbatch_script
from .tokens import LateAnswer, new_token, record_array_jobs, sbatch_identifiable


@dataclasses.dataclass
class Launch:
    """One call of submit_sweep: the folder, settings and the manifest being written."""

    sweep_dir: Path
    params: dict[str, Any]
    folder: Path  # submitit folder: scripts, pickles, logs
    timeout: float
    user: str
    manifest: dict
    queue: dict[str, JobInfo] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # for the summary (late answers, CPU sharing)

    def save(self) -> None:
        write_manifest(self.sweep_dir, self.manifest)


def fail(launch: Launch, status: str, error: str) -> None:
    launch.record["status"] = status
    launch.record["error"] = error
    launch.save()


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(offset, size) of the arrays that hold ``n`` runs, at most ``size`` per array."""
    return [(o, min(size, n - o)) for o in range(0, n, size)]


def check_reducer_place(launch: Launch) -> None:
    """A reducer bound for another partition/account/qos is checked by SLURM (sbatch --test-only)
    before any array is queued, so a typo there never leaves arrays without their reducer."""
    p, r = launch.params, dict(launch.params.get("reducer") or {})
    if not any((r.get(k) or p.get(k)) != p.get(k) for k in ("partition", "account", "qos")):
        return
    script_path = launch.folder / f"sub{launch.record['n']:03d}_reduce.sh"
    safeio.write_bytes(script_path, sbatch_script(p, launch.folder, reducer=True).encode(), root=launch.folder)
    try:
        sbatch(script_path, launch.timeout, test_only=True)
    except SlurmError as e:
        fail(launch, "failed", f"reducer job: {e}")
        raise SubmissionError(f"reducer job (hydra.launcher.reducer.*): {e}") from None


def record_unanswered(launch: Launch, kind: str, e: LateAnswer, job: dict) -> None:
    """An sbatch call whose outcome is unknown: recorded with its token, looked up next time."""
    launch.record.setdefault("unanswered", []).append({"kind": kind, **e.record, "job": job})


def sbatch_recorded(launch: Launch, script_path: Path, job: dict, kind: str, what: str, noun: str,
                    n_tasks: int | None = None) -> str:
    """sbatch a script written with ``job["token"]`` (its pickles named by it) and fill in ``job``'s
    ``job_id`` (and ``late_answer``, noted as "``noun`` ID was found"). An sbatch whose outcome is
    unknown is recorded under ``kind`` for the lookup (its pickles wait for it); a refused one
    discards its pickles; both re-raise."""
    token = job["token"]
    try:
        job_id, late = sbatch_identifiable(script_path, token, launch.timeout, launch.user, what)
    except LateAnswer as e:
        if e.unknown:
            record_unanswered(launch, kind, e, job)
        else:
            discard_pickles(launch.folder, token)
        raise
    except SlurmError:
        discard_pickles(launch.folder, token)
        raise
    adopt_pickles(launch.folder, token, job_id, n_tasks)
    job["job_id"] = job_id
    if late:
        job["late_answer"] = late
        launch.notes.append(f"sbatch answered late ({late['after']}): {noun} {job_id} was found by its "
                            f"submission token {token} and recorded")
    return job_id


def submit_array(launch: Launch, c: int, runs: list[PlannedRun], offset: int, parallelism: int | None,
                 dependency: str | None, role: str | None = None) -> dict:
    """Write one array's script and pickles, sbatch it, record its tasks in the manifest.

    Task i holds ``runs[i*K:(i+1)*K]`` (K = runs_per_task; the last task may hold fewer). ``role``:
    ``parents`` or ``children`` (:mod:`.lineage`); children are killed when their parent fails."""
    p, folder, sub_n = launch.params, launch.folder, launch.record["n"]
    k = int(p.get("runs_per_task") or 1)
    tasks = [runs[i:i + k] for i in range(0, len(runs), k)]
    token = new_token()
    script_path = folder / f"sub{sub_n:03d}_array{c:02d}.sh"
    script = sbatch_script(p, folder, array_size=len(tasks), parallelism=parallelism, dependency=dependency,
                           token=token, kill_on_invalid_dep=role == CHILDREN)
    safeio.write_bytes(script_path, script.encode(), root=folder)
    max_requeue, timeout_min = int(fields.value(p, "max_requeue")), int(fields.value(p, "timeout_min"))
    for i, task in enumerate(tasks):
        pickle_job(folder, task_job(p, task), timeout_min, max_requeue, name=f"{token}_{i}")
    arr = {"job_id": None, "token": token, "offset": offset, "size": len(tasks),
           "parallelism": parallelism or len(tasks), "dependency": dependency, "script": str(script_path),
           "command": f"sbatch --parsable {script_path}", "runs_per_task": k, "n_runs": len(runs),
           "tasks": [[r.run_id for r in task] for task in tasks]}
    if role:
        arr["role"] = role
    sbatch_recorded(launch, script_path, arr, "array", f"array {c} of submission {sub_n} ({len(runs)} runs)",
                    "array job", n_tasks=len(tasks))
    launch.record["arrays"].append(arr)
    record_array_jobs(launch.manifest, sub_n, arr)
    launch.save()
    return arr


def submit_arrays(launch: Launch, todo: list[PlannedRun], submitted: list[str], arrays: list[dict],
                  echo: Callable[[str], None], *, dependency: str | None = None, role: str | None = None,
                  base: int = 0) -> None:
    """Chunk to MaxArraySize; with array_parallelism the chunks run one after another (afterany),
    so the cap holds for the runs of this call. ``submitted`` and ``arrays`` grow with each array.
    ``dependency``: every chunk's (the children's ``afterok`` on their parents, :mod:`.lineage`);
    ``role``: what the arrays hold; ``base``: the offset of ``todo[0]`` in the submission's runs."""
    size = int(launch.params.get("max_array_size") or max_array_size(launch.timeout))
    k = int(launch.params.get("runs_per_task") or 1)
    # MaxArraySize counts tasks; each task holds k runs
    parts = [(o * k, min(n * k, len(todo) - o * k)) for o, n in chunks(-(-len(todo) // k), max(1, size))]
    par = launch.params.get("array_parallelism")
    par = int(par) if par else None
    chain = par is not None and len(parts) > 1 and par < -(-len(todo) // k)
    prev_array = None
    first = len(launch.record["arrays"])  # script names stay unique across the calls of one submission
    try:
        for c, (offset, n) in enumerate(parts):
            deps = [d for d in (dependency, f"afterany:{prev_array}" if chain and prev_array else None) if d]
            arr = submit_array(launch, first + c, todo[offset:offset + n], base + offset, par, ",".join(deps) or None,
                               role)
            arrays.append(arr)
            submitted += [r.run_id for r in todo[offset:offset + n]]
            prev_array = arr["job_id"]
    except SlurmError as e:
        fail(launch, "failed" if not launch.record["arrays"] else "partial", str(e))
        if launch.record["arrays"]:
            echo(f"nondet_hpc: submitted {len(submitted)} runs before SLURM refused the rest; the next run of "
                 "the same command submits the rest and queues the reducer job.")
        raise


def reducer_dependency(launch: Launch) -> tuple[str, list[str]]:
    """afterany on this submission's arrays and barrier job, on the still-queued arrays and barrier
    jobs of earlier ones; and the pending reducers of earlier submissions, which the new one supersedes."""
    deps = [a["job_id"] for a in launch.record["arrays"]]
    if launch.record.get("barriers"):
        deps.append(launch.record["barriers"]["job_id"])
    deps += earlier_barrier_jobs(launch)
    earlier_reducers = []
    for s in launch.manifest["submissions"]:
        if s is launch.record:
            continue
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


def arrays_dependency(launch: Launch) -> str:
    """afterany on this submission's arrays and on the still-queued arrays of earlier ones (what a
    barrier job waits for)."""
    deps = [a["job_id"] for a in launch.record["arrays"]]
    for s in launch.manifest["submissions"]:
        if s is not launch.record:
            deps += [a["job_id"] for a in s.get("arrays", []) if _alive(launch, a["job_id"], s, arrays=True)]
    return ("afterany:" + ":".join(dict.fromkeys(deps))) if deps else ""


def _alive(launch: Launch, job_id: str, sub: dict, *, arrays: bool = False) -> bool:
    """Whether SLURM still lists ``job_id`` (an array: any of its tasks) of submission ``sub`` as queued or running."""
    return any((k.split("_")[0] if arrays else k) == job_id and j.state in ACTIVE_STATES
               and j.belongs_to(sub.get("folder")) for k, j in launch.queue.items())


def earlier_barrier_jobs(launch: Launch) -> list[str]:
    """The barrier jobs of earlier submissions still queued or running: a new barrier job (and the
    reducer) wait for them, so two never compute the same pairs at once."""
    return [s["barriers"]["job_id"] for s in launch.manifest["submissions"] if s is not launch.record
            and s.get("barriers") and _alive(launch, s["barriers"]["job_id"], s)]


def _sbatch_reducer(launch: Launch, dependency: str, script_path: Path) -> tuple[str, str, dict | None]:
    """(job id, token, late answer) of the reducer job: tried again once when a silent sbatch turned
    out not to have queued it (the reducer must follow its arrays)."""
    timeout_min = int(fields.value(dict(launch.params.get("reducer") or {}), "timeout_min", reducer=True))
    what = f"the reducer job of submission {launch.record['n']}"
    for attempt in (1, 2):
        token = new_token()
        script = sbatch_script(launch.params, launch.folder, reducer=True, dependency=dependency, token=token)
        safeio.write_bytes(script_path, script.encode(), root=launch.folder)
        pickle_job(launch.folder, ReduceJob(str(launch.sweep_dir)), timeout_min, 0, name=token)
        job = {"job_id": None, "token": token, "dependency": dependency, "script": str(script_path),
               "command": f"sbatch --parsable {script_path}"}
        try:
            red_id, late = sbatch_identifiable(script_path, token, launch.timeout, launch.user, what)
            return red_id, token, late
        except LateAnswer as e:
            if e.unknown:
                record_unanswered(launch, "reducer", e, job)
            else:
                discard_pickles(launch.folder, token)
                launch.record.setdefault("not_queued", []).append(e.record)
            if e.unknown or attempt == 2:
                raise
        except SlurmError:
            discard_pickles(launch.folder, token)
            raise
    raise AssertionError("unreachable")  # the loop returns or raises


def submit_reducer(launch: Launch) -> dict:
    """Queue the reducer job behind the arrays (:func:`reducer_dependency`); record it; cancel the
    pending reducers it supersedes. Its record (the submission's ``reducer``)."""
    dependency, earlier_reducers = reducer_dependency(launch)
    script_path = launch.folder / f"sub{launch.record['n']:03d}_reduce.sh"
    try:
        red_id, token, late = _sbatch_reducer(launch, dependency, script_path)
    except SlurmError as e:
        fail(launch, "partial" if launch.record["arrays"] else "failed", f"reducer job: {e}")
        raise
    adopt_pickles(launch.folder, token, red_id, None)
    launch.record["reducer"] = {"job_id": red_id, "token": token, "dependency": dependency, "script": str(script_path),
                                "command": f"sbatch --parsable {script_path}"}
    if late:
        launch.record["reducer"]["late_answer"] = late
        launch.notes.append(f"sbatch answered late ({late['after']}): reducer job {red_id} was found by its "
                            f"submission token {token} and recorded")
    if earlier_reducers:
        # superseded: the new reducer waits for everything the old ones waited for
        run_command(["scancel", *earlier_reducers], launch.timeout)
        launch.record["superseded_reducers"] = earlier_reducers
    launch.save()
    return launch.record["reducer"]
