"""The whole sweep, not only its folders: planned runs (SWEEP_DIR/sweep.json) vs what runs/ holds.

A run that never created its folder (a task cancelled while pending, a node that died before the
job started) is invisible to a scan of runs/. When the sweep has a manifest (hydra/launcher=slurm
writes it), every planned run is matched to its group, and one without a folder becomes a
"never started" entry of excluded.csv with its job id and, where sacct answers within a short
timeout, its SLURM state. The lookup is the caller's (``job_states``: the reducer's command line
and the SLURM reducer job pass the cluster's, :func:`nondet_hpc.cluster.client.job_states`), so
the report needs no SLURM code; without one the state says "SLURM not asked". The reducer may run
on a laptop or a node without accounting, so a missing or silent sacct only changes the state to
"SLURM not reachable".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..rundir import RUNS
from ..sweep.manifest import latest_job, load_manifest
from .scan import Exclusion, Run, rel

NEVER_STARTED = "never started"
DEFAULT_SLURM_TIMEOUT_S = 10.0  # sacct is asked once; a dead controller must not hold the report
NOT_PLANNED = ("duplicate", "identity")  # exclusions that are copies of a run, not runs of their own
#: (job ids, timeout in s) -> (job id -> SLURM state, a note when SLURM did not answer)
JobStates = Callable[[list[str], float], tuple[dict[str, str], str]]


@dataclass
class Accounting:
    """Planned runs per group; empty (``manifest`` False) for a sweep without sweep.json."""

    manifest: bool = False
    problem: str = ""  # sweep.json exists but cannot be read
    planned: dict[str, set[str]] = field(default_factory=dict)  # group_key -> planned run ids
    never_started: dict[str, int] = field(default_factory=dict)  # group_key -> count
    labels: dict[str, str] = field(default_factory=dict)  # group_key -> label, for groups without a row
    slurm_note: str = ""

    def n_planned(self, group_key: str) -> int | None:
        return len(self.planned.get(group_key, ())) if self.manifest else None


def _planned_configs(manifest: Mapping) -> dict[str, dict]:
    """run id -> its flat identity (base_config + run_values of the newest submission naming it)."""
    out: dict[str, dict] = {}
    for sub in manifest.get("submissions") or []:
        if not isinstance(sub, dict):
            continue
        base = sub.get("base_config") if isinstance(sub.get("base_config"), dict) else {}
        for rid, vals in (sub.get("run_values") or {}).items():
            if isinstance(vals, dict):
                out[str(rid)] = {**base, **vals}
    return out


def _canon_identity(flat: Mapping) -> str:
    # run.json's identity is the same identity_items without the seed (run/task.py)
    return json.dumps({k: v for k, v in flat.items() if k != "seed"}, sort_keys=True, default=str)


def _slurm_states(job_ids: list[str], timeout: float, job_states: JobStates | None) -> tuple[dict[str, str], str]:
    """job id -> SLURM state from the caller's lookup, and a note when SLURM was not asked or did not answer."""
    if not job_ids:
        return {}, ""
    if job_states is None:
        return {}, "SLURM not asked"
    return job_states(job_ids, timeout)


def account(sweep: Path, runs: list[Run], excluded: list[Exclusion], *,
            slurm_timeout: float = DEFAULT_SLURM_TIMEOUT_S, job_states: JobStates | None = None) -> Accounting:
    """Match sweep.json's planned runs to the groups found; add "never started" exclusions.

    Incomplete runs the manifest knows get their job's SLURM state appended to their reason, as
    ``job_states`` gives it within ``slurm_timeout`` seconds (None: SLURM is not asked).
    """
    try:
        manifest = load_manifest(sweep)
    except (OSError, ValueError) as e:
        return Accounting(problem=f"{sweep.name}/sweep.json cannot be read ({type(e).__name__}: {e}); planned "
                                  "runs are not accounted for")
    if manifest is None:
        return Accounting()
    acc = Accounting(manifest=True)
    records = manifest.get("runs") if isinstance(manifest.get("runs"), dict) else {}
    configs = _planned_configs(manifest)
    folder_group = {r.run_id: r.group_key for r in runs}
    folder_group.update({e.run_id: e.group_key for e in excluded
                         if e.group_key and e.category not in NOT_PLANNED and e.run_id not in folder_group})
    by_identity = {_canon_identity(r.identity): (r.group_key, r.label) for r in runs}
    for rid, gk in folder_group.items():
        acc.planned.setdefault(gk, set()).add(rid)
    missing: list[tuple[str, str, str, object]] = []  # (run id, group key, label, seed)
    unnamed = {e.run_id: e for e in excluded if not e.group_key and e.category not in NOT_PLANNED}
    for rid in map(str, records):
        flat = configs.get(rid, {})
        gk, label = by_identity.get(_canon_identity(flat), ("", "")) if flat else ("", "")
        if os.path.lexists(sweep / RUNS / rid):
            gk = folder_group.get(rid) or gk
            if rid in unnamed and gk:  # e.g. an unreadable run.json: the manifest says whose run it is
                unnamed[rid].group_key, unnamed[rid].group = gk, unnamed[rid].group or label
            if gk:
                acc.planned.setdefault(gk, set()).add(rid)
            continue
        label = label or str(flat.get("source.label") or flat.get("source.name") or "?")
        missing.append((rid, gk, label, flat.get("seed")))
        acc.planned.setdefault(gk or f"?{label}", set()).add(rid)
    jobs = {rid: (latest_job(records.get(rid)) or {}).get("job_id", "") for rid in map(str, records)}
    incomplete = [e for e in excluded if e.category == "incomplete" and jobs.get(e.run_id)]
    asked = sorted({jobs[r] for r, *_ in missing if jobs[r]} | {jobs[e.run_id] for e in incomplete})
    states, acc.slurm_note = _slurm_states(asked, slurm_timeout, job_states)

    def job_text(rid: str) -> str:
        jid = jobs.get(rid, "")
        if not jid:
            return "no job recorded (not submitted: over the submit limit? rerun the sweep command)"
        return f"job {jid}: {states.get(jid) or acc.slurm_note or 'unknown to sacct'}"

    for e in incomplete:
        e.reason += f"; {job_text(e.run_id)}"
    for rid, gk, label, seed in missing:
        where = rel(sweep / RUNS / rid, sweep)
        excluded.append(Exclusion(rid, label, "all", NEVER_STARTED,
                                  f"planned in sweep.json (seed {seed}) but {where}/ does not exist; "
                                  f"{job_text(rid)}", gk))
        acc.never_started[gk or f"?{label}"] = acc.never_started.get(gk or f"?{label}", 0) + 1
        acc.labels.setdefault(gk or f"?{label}", label + ("" if gk else " (no run of this config found)"))
    return acc


def summary_lines(acc: Accounting, group_names: Mapping[str, str], done: Mapping[str, int],
                  excluded_runs: Mapping[str, int]) -> list[str]:
    """Per group: planned, done, excluded, never started (the terminal summary and report.md)."""
    if acc.problem:
        return [f"Planned runs: {acc.problem}"]
    if not acc.manifest:
        return []
    total = sum(len(v) for v in acc.planned.values())
    never = sum(acc.never_started.values())
    lines = [f"Planned runs (sweep.json): {total}; never started: {never}"
             + (f"; {acc.slurm_note}" if acc.slurm_note else "")]
    for gk in sorted(acc.planned, key=lambda k: (k not in group_names, list(group_names).index(k)
                                                  if k in group_names else 0, acc.labels.get(k, k))):
        name = group_names.get(gk) or acc.labels.get(gk, gk)
        lines.append(f"  {name}: planned {len(acc.planned[gk])}, done {done.get(gk, 0)}, excluded "
                     f"{excluded_runs.get(gk, 0)}, never started {acc.never_started.get(gk, 0)}")
    return lines
