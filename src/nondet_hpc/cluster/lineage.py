"""The parents of a SLURM sweep whose runs start from epoch k of a parent (``source.from_epoch=k > 0``).

Which config is whose parent is said once, by :mod:`nondet_hpc.sweep.parents`; this module turns
that into what :mod:`.submit` queues. The parents a sweep needs join its runs (the sweep's own
control run of seed 1 where it has one, keeping the checkpoints its children start from; else a
parent run made from its first child's config). A parent that is DONE with every checkpoint its
children need gets no job, and its children no dependency; a parent to train is queued first, in
an array of its own (role ``parents``), and the arrays of its children (role ``children``) wait
for it: ``--dependency=afterok:<parent array>`` and ``--kill-on-invalid-dep=yes``, so a failed
parent ends its children's jobs instead of leaving them pending for ever. A parent still queued
or running from an earlier submission is waited for by its job id. A parent that is DONE without
a checkpoint a child needs is refused before anything is queued: a completed run is never
overwritten behind the user's back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

from .. import safeio
from ..rundir import kept_checkpoint
from ..sweep.identity import PlannedRun, plan_run
from ..sweep.manifest import latest_job
from ..sweep.parents import from_epoch, parent_overrides, plan_parents
from .client import SubmissionError

#: what sweep.json's arrays say they hold (``role``); an array without one holds runs that need no parent
PARENTS, CHILDREN = "parents", "children"


@dataclasses.dataclass
class Lineage:
    """The runs of a sweep with their parents: ``runs`` (the sweep's, each parent of the sweep
    keeping its children's checkpoints, then the parents made here), each child's parent
    (run id -> run id), and the epochs each parent keeps for its children."""

    runs: list[PlannedRun]
    parent_of: dict[str, str] = dataclasses.field(default_factory=dict)
    keep: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    made: set[str] = dataclasses.field(default_factory=set)  # parents that are no run of the sweep itself

    def role(self, run_id: str) -> str | None:
        return PARENTS if run_id in self.keep else CHILDREN if run_id in self.parent_of else None

    def needed(self, todo: Sequence[PlannedRun]) -> set[str]:
        """The parents some run to submit starts from."""
        return {self.parent_of[r.run_id] for r in todo if r.run_id in self.parent_of}


def _family(run: PlannedRun) -> str:
    """Equal for runs that differ only in their source and seed: what a parent's config does not
    keep of its child's (:func:`nondet_hpc.sweep.parents.parent_config` sets both), so the runs of one
    family share one parent. Only a shortcut: which parent it is, plan_parents says."""
    return json.dumps({k: v for k, v in run.flat.items() if k != "seed" and k.split(".")[0] != "source"},
                      sort_keys=True, default=str)


def plan_lineage(runs: Sequence[PlannedRun], ignore_keys: Sequence[str] = ()) -> Lineage:
    """The sweep's runs and the parents they need (:func:`nondet_hpc.sweep.parents.plan_parents`,
    asked once per family and epoch: thousands of runs share a few parents)."""
    runs = list(runs)
    ks = [from_epoch(r.config) for r in runs]
    if not any(k > 0 for k in ks):
        return Lineage(runs)
    out = Lineage(runs)
    members: dict[tuple[str, int], list[int]] = {}  # (family, k) -> indices of its children
    for i, (r, k) in enumerate(zip(runs, ks)):
        if k > 0:
            members.setdefault((_family(r), k), []).append(i)
    families = {f for f, _ in members}
    asked = [ix[0] for ix in members.values()]  # one child per family and epoch
    asked += [i for i, (r, k) in enumerate(zip(runs, ks)) if k == 0 and _family(r) in families]
    for plan in plan_parents([runs[i].cfg for i in asked]):
        if plan.own is not None:
            own = runs[asked[plan.own]]
            parent = plan_run(plan.config, own.overrides, ignore_keys, plan_key=own.plan_key)
            runs[asked[plan.own]] = parent
        else:
            parent = plan_run(plan.config, parent_overrides(plan)[:3], ignore_keys)
            if parent.run_id not in {r.run_id for r in runs}:
                runs.append(parent)
            out.made.add(parent.run_id)
        out.keep[parent.run_id] = sorted({*out.keep.get(parent.run_id, []), *plan.keep})
        for j in plan.children:
            rep = asked[j]
            for i in members[(_family(runs[rep]), ks[rep])]:
                out.parent_of[runs[i].run_id] = parent.run_id
    return out


def missing_checkpoints(lineage: Lineage, done: Sequence[PlannedRun], active: Sequence[PlannedRun],
                        todo: Sequence[PlannedRun], manifest: Mapping) -> None:
    """Refuse (:class:`SubmissionError`, before anything is queued) when a run to submit starts from
    an epoch its parent does not keep: a DONE parent without that checkpoint, or a parent queued by
    an earlier submission whose job was not asked to keep it (sweep.json ``keep_checkpoints``).
    That run would fail on its node."""
    done_ids, queued = {r.run_id: r for r in done}, {r.run_id: r for r in active}
    lacking: dict[str, set[int]] = {}
    for r in todo:
        pid, k = lineage.parent_of.get(r.run_id), from_epoch(r.config)
        if pid in done_ids and not safeio.is_regular(kept_checkpoint(done_ids[pid].run_dir, k)):
            lacking.setdefault(pid, set()).add(k)
        elif pid in queued and k not in ((manifest["runs"].get(pid) or {}).get("keep_checkpoints") or []):
            lacking.setdefault(pid, set()).add(k)
    if not lacking:
        return
    lines = []
    for pid, ks in lacking.items():
        keep = ",".join(map(str, lineage.keep[pid]))
        retrain = (f"the sweep's command with source=none seed=1 source.from_epoch=0 force=true "
                   f"record.keep_checkpoints=[{keep}] (its old folder goes to runs/.replaced/), then rerun this command")
        if pid in done_ids:
            lines.append(f"  parent run {pid} ({done_ids[pid].run_dir}) is DONE but kept no full checkpoint at the end "
                         f"of epoch(s) {sorted(ks)} (it was trained before they were asked for); its results are left "
                         f"as they are. Retrain it keeping them: {retrain}; or run this sweep in another out_dir.")
        else:
            job = latest_job(manifest["runs"].get(pid)) or {}
            lines.append(f"  parent run {pid} is queued or running (job {job.get('job_id', '?')}), submitted before "
                         f"runs starting from its epoch(s) {sorted(ks)} were asked for, so it keeps no checkpoint "
                         f"there. Cancel it before it starts (scancel {job.get('job_id', 'JOBID')}) and rerun this "
                         f"command, which queues it keeping them; or let it finish, then retrain it: {retrain}.")
    raise SubmissionError("runs perturbed from a later epoch start from their parent's checkpoint at that epoch, "
                          "and it will not exist:\n" + "\n".join(lines) + "\nNothing was submitted.")


def order(lineage: Lineage, todo: list[PlannedRun]) -> list[PlannedRun]:
    """Parents first, then the runs that need none, then the children (what fits under a submit
    limit is taken from the front). Parents made here only when a run to submit needs them."""
    needed = lineage.needed(todo)
    parents = [r for r in todo if r.run_id in lineage.keep and (r.run_id in needed or r.run_id not in lineage.made)]
    plain = [r for r in todo if lineage.role(r.run_id) is None]
    children = [r for r in todo if r.run_id in lineage.parent_of and r.run_id not in lineage.keep]
    return parents + plain + children


def hold_orphans(lineage: Lineage, todo: list[PlannedRun], over_limit: list[PlannedRun],
                 ready: set[str]) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """Children whose parent is neither ``ready`` (done or queued) nor submitted now wait with the
    runs over the submit limit (a child queued without its parent would fail)."""
    now = {r.run_id for r in todo} | set(ready)
    orphans = [r for r in todo if r.run_id in lineage.parent_of and lineage.parent_of[r.run_id] not in now]
    if not orphans:
        return todo, over_limit
    ids = {r.run_id for r in orphans}
    return [r for r in todo if r.run_id not in ids], over_limit + orphans


def parent_dependency(lineage: Lineage, children: Sequence[PlannedRun], parent_arrays: Mapping[str, str],
                      active: Sequence[PlannedRun], manifest: Mapping) -> str | None:
    """``afterok`` on the jobs of the children's parents still to finish: the array of this
    submission's parents, the job (``A_i``) of a parent queued by an earlier one; None when every
    parent is DONE."""
    queued = {r.run_id for r in active}
    waits = []
    for pid in dict.fromkeys(lineage.parent_of[r.run_id] for r in children):
        if pid in parent_arrays:
            waits.append(parent_arrays[pid])
        elif pid in queued:
            job = latest_job(manifest["runs"].get(pid))
            if job:
                waits.append(job["job_id"])
    return "afterok:" + ":".join(dict.fromkeys(waits)) if waits else None


def record(lineage: Lineage, manifest: dict, todo: Sequence[PlannedRun]) -> None:
    """Each child's parent (``runs[child].parent``) in sweep.json, and the epochs a parent submitted
    now keeps (``runs[parent].keep_checkpoints``: what a later submission's children may start from)."""
    for child, parent in lineage.parent_of.items():
        if child in manifest["runs"]:
            manifest["runs"][child]["parent"] = parent
    for r in todo:
        if r.run_id in lineage.keep and r.run_id in manifest["runs"]:
            manifest["runs"][r.run_id]["keep_checkpoints"] = list(lineage.keep[r.run_id])
