"""The local launcher's order when runs start from a parent (``source.from_epoch=k > 0``).

A run perturbed from epoch k starts from its parent's checkpoint at epoch k (the determinism
control of the same config, nondet_hpc.sweep.parents), so the parents run first: phase 1 holds
every parent (the sweep's own control run of seed 1 where it has one, with the kept checkpoints
added; else a job made from its first child's config) and every job that needs no parent; phase 2
the children, each only if its parent finished with its checkpoints kept. A child of a failed
parent is not started: its JobReturn is a failed run whose error names the parent and why, so the
end-of-sweep list and the exit status show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, open_dict


@dataclass
class Phases:
    """Phase 1's jobs (config, overrides, index in the sweep or None for a parent made here), the
    children of phase 2 (indices), and per parent plan the phase-1 position of its job."""

    first: list[tuple[DictConfig, list[str], Optional[int]]] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    parent_at: dict[int, int] = field(default_factory=dict)  # plan index -> position in ``first``
    plans: list = field(default_factory=list)


def split(configs: Sequence[DictConfig], job_overrides: Sequence[Sequence[str]], next_num: int) -> Phases:
    """The two phases of a sweep; no parents needed: every job in phase 1, none in phase 2.
    ``next_num``: the Hydra job number of the first parent job made here (after the sweep's)."""
    from nondet_hpc.sweep.parents import parent_overrides, plan_parents

    plans = plan_parents(configs)
    out = Phases(plans=plans)
    children = {i for p in plans for i in p.children}
    own = {p.own: n for n, p in enumerate(plans) if p.own is not None}
    made = 0
    for n, p in enumerate(plans):
        if p.own is None:
            cfg = p.config
            with open_dict(cfg):
                cfg.hydra.job.num = next_num + made
                cfg.hydra.job.id = f"parent_{made}"
                cfg.hydra.overrides.task = parent_overrides(p)[:3]
            made += 1
            out.parent_at[n] = len(out.first)
            out.first.append((cfg, parent_overrides(p), None))
    for i, (cfg, ov) in enumerate(zip(configs, job_overrides)):
        if i in children:
            continue
        if i in own:
            out.parent_at[own[i]] = len(out.first)
            cfg = plans[own[i]].config  # the sweep's control run, keeping the checkpoints its children need
        out.first.append((cfg, list(ov), i))
    out.children = sorted(children)
    return out


def _value(ret: Any) -> Any:
    """A JobReturn's value, None for a job that raised (its return_value would re-raise)."""
    from hydra.core.utils import JobStatus

    return ret.return_value if ret is not None and ret.status == JobStatus.COMPLETED else None


def parent_failure(plan: Any, ret: Any, finished: bool) -> str:
    """Why a phase-1 parent job cannot serve its children ("" = it can): not finished, or finished
    (or skipped as DONE) without a full checkpoint at an epoch its children start from."""
    from nondet_hpc import safeio
    from nondet_hpc.rundir import kept_checkpoint

    if ret is None:
        return "it did not run (the sweep was stopped)"
    value = _value(ret)
    if not finished or not isinstance(value, dict):
        error = value.get("error") if isinstance(value, dict) else None
        return f"it failed ({error or 'its job raised: see above'})"
    rd = Path(str(value.get("run_dir", "")))
    missing = [k for k in plan.keep if not safeio.is_regular(kept_checkpoint(rd, k))]
    if missing:
        return (f"it is DONE but kept no full checkpoint at the end of epoch(s) {missing} (it was trained before "
                f"they were asked for): retrain it with force=true record.keep_checkpoints={list(plan.keep)} "
                f"(its old folder goes to runs/.replaced/), or run this sweep in another out_dir")
    return ""


def parent_name(ret: Any, plan: Any = None) -> str:
    """The parent's run id: where its job says it, else the id its config gives (a job refused
    before it trained returns none), else what it is."""
    value = _value(ret)
    rid = value.get("run_id") if isinstance(value, dict) else None
    if not rid and plan is not None:
        rid = _planned_id(plan.config)
    return str(rid) if rid else "(the determinism control of the same config: source=none, seed=1)"


def _planned_id(cfg: Any) -> str:
    """The run id the job of ``cfg`` computes (threads and inputs resolved as the run resolves them);
    "" when it cannot be known here (an input that does not resolve)."""
    import copy

    from nondet_hpc.config import ConfigError, threads_for
    from nondet_hpc.registry.inputs import resolve_inputs
    from nondet_hpc.rundir import run_id

    job = copy.deepcopy(cfg)
    try:
        if int(job.train.threads) <= 0:
            import torch  # the worker resolves train.threads=0 to torch's pool size, as here

            job.train.threads = threads_for(int(job.train.threads), local_default=torch.get_num_threads())
        resolve_inputs(job)
        return run_id(job)
    except (ConfigError, ValueError, OSError):
        return ""


def orphans(ph: Phases, got: Sequence[Any], configs: Sequence[DictConfig], finished: Any) -> dict[int, str]:
    """The children whose parent cannot serve them (index -> the error their run reports), from the
    phase-1 results ``got``; ``finished(ret)``: whether a job ran to its end."""
    out = {}
    for n, plan in enumerate(ph.plans):
        ret = got[ph.parent_at[n]]
        why = parent_failure(plan, ret, finished(ret))
        for i in plan.children if why else ():
            out[i] = (f"not run: its parent run {parent_name(ret, plan)}, whose first {configs[i].source.from_epoch} "
                      f"epoch(s) this run starts from, cannot serve it: {why}. Fix the parent, then rerun the same "
                      f"command: finished runs are skipped.")
    return out
