"""A sweep grown in waves until its precision target is met: the stop rule and its record.

``study.target.acc_sd_se=0.02 study.wave=10 study.max_models=100``: the launcher runs the first
``wave`` seeds of each group (the seeds in the sweep's order) and records the stop rule in
sweep.json (``"study"``) BEFORE anything runs. After each wave the precision of each group is
measured (the bootstrap SE of its SD, the reducer's own number, :func:`precision`) and
:func:`decide_wave` records the next seeds of the groups that have not met the target and are
below the maximum. Who runs them is the caller's: the SLURM reducer job submits them
(:mod:`nondet_hpc.cluster.advance`), the local launcher runs them itself. This module decides;
it never submits, and it needs no SLURM.

The reducer job has no Hydra context, so sweep.json holds per group everything needed to build
the next seeds' configs: the group's resolved config as plain data (its first run's) and the seed
key; :func:`.identity.plan_run` makes the run id exactly as the launcher does.

Safety: the decision is taken under the sweep lock, and a wave is recorded (seeds and all) before
it is submitted, so a second reducer run (or a rerun of the sweep command) never submits a seed
twice. A failed submission stops the study with its message in sweep.json; rerunning the sweep
command continues it. Record in sweep.json::

    "study": {"rule": {"targets": {...}, "wave": W, "max_models": M}, "status": "running|done|stopped",
              "stop_reason": str | null, "params": {launcher settings}, "ignore_keys": [...],
              "groups": {LABEL: {"overrides", "seeds", "submitted", "run_ids": {seed: id},
                                 "config", "precision", "n_models", "state"}},
              "waves": [{"n", "time", "by", "groups": {LABEL: [seeds]}, "status", "submission",
                         "decided", "error"}]}
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import metrics as M
from ..config import ConfigError
from ..rundir import RUNS, is_done
from ..safeio import RefusedFile, read_regular, write_bytes
from . import trust
from .identity import PlannedRun, plan_run
from .manifest import jsonable, load_manifest, new_manifest, now_iso, sweep_lock, write_manifest

SEED_KEY = "seed"
#: study target -> per-model column of report/per_model.csv (the planner's names, analysis/planning.py)
TARGET_COLUMNS = {"acc_sd_se": "acc", "ce_sd_se": "ce"}
MIN_WAVE = 2  # an SD needs 2 models

#: What measures a study: (sweep folder, study record) -> {group label: {target: precision now}}.
#: The caller passes it (the reducer's groups live in nondet_hpc.analysis, above this layer).
Measure = Callable[[Path, Mapping], dict[str, dict[str, float]]]


class StudyMismatch(ValueError):
    """The sweep folder holds a study with another stop rule."""


# =============================================================================== the stop rule
def rule_from_config(study: Any) -> dict | None:
    """The stop rule of a ``study`` config node, or None when no target is set (waves off)."""
    if study is None:
        return None
    targets = {k: float(v) for k, v in dict(study.get("target") or {}).items() if v is not None}
    if not targets:
        return None
    for k, v in targets.items():
        if k not in TARGET_COLUMNS:
            raise ConfigError(f"study.target.{k} is not a wave target; valid: "
                              f"{', '.join('study.target.' + t for t in TARGET_COLUMNS)}")
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"study.target.{k}={v}: a target must be a positive number (e.g. 0.02)")
    wave = int(study.get("wave") or 0)
    if wave < MIN_WAVE:
        raise ConfigError(f"study.wave={wave}: a wave must give each group at least {MIN_WAVE} models "
                          "(an SD needs 2; the planner wants 5); set study.wave=10, say")
    mx = study.get("max_models")
    if mx is not None and int(mx) < wave:
        raise ConfigError(f"study.max_models={mx} is below study.wave={wave}: raise max_models or lower the wave")
    return {"targets": targets, "wave": wave, "max_models": None if mx is None else int(mx)}


def split_seed(overrides: Sequence[str]) -> tuple[list[str], int]:
    """(the job's overrides without its seed, the seed); a study needs a swept seed."""
    rest, seed = [], None
    for o in overrides:
        key, sep, value = o.lstrip("+").partition("=")
        if key == SEED_KEY and sep:
            try:
                seed = int(value)
            except ValueError:
                raise ConfigError(f"seed={value}: a study needs integer seeds") from None
        else:
            rest.append(o)
    if seed is None:
        raise ConfigError("study.target is set but the sweep does not vary the seed: sweep it, e.g. "
                          "seed=range(1,101); the waves take its seeds in order")
    return rest, seed


def group_label(rest: Sequence[str]) -> str:
    return " ".join(rest) or "(all)"


def group_jobs(job_overrides: Sequence[Sequence[str]]) -> dict[str, list[tuple[int, list[str]]]]:
    """Group label -> [(seed, the job's overrides)] in the sweep's order, each seed once."""
    out: dict[str, list[tuple[int, list[str]]]] = {}
    split = [split_seed(o) for o in job_overrides]
    # a group is named by what differs between groups (source=init), not by what every job shares
    common = set.intersection(*[set(rest) for rest, _ in split]) if split else set()
    for overrides, (rest, seed) in zip(job_overrides, split):
        jobs = out.setdefault(group_label([o for o in rest if o not in common]), [])
        if all(s != seed for s, _ in jobs):
            jobs.append((seed, list(overrides)))
    return out


# =============================================================================== the launcher's side
def load_study(sweep_dir: str | Path) -> dict | None:
    m = load_manifest(sweep_dir)
    return (m or {}).get("study")


def seeds_to_plan(rule: Mapping, groups: Mapping[str, list[tuple[int, list[str]]]],
                  recorded: Mapping | None) -> dict[str, list[int]]:
    """Which seeds the launcher composes: every seed a recorded wave holds (a rerun resubmits what
    is missing), and the first wave of a group the study does not have yet."""
    if recorded is not None and recorded.get("rule") != dict(rule):
        raise StudyMismatch(
            f"this sweep folder's study has the stop rule {recorded.get('rule')}, fixed before its first wave; "
            f"the command asks for {dict(rule)}. Pass the recorded study.* values to continue it, or use another "
            "out_dir for a new study.")
    out = {}
    for label, jobs in groups.items():
        rec = (recorded or {}).get("groups", {}).get(label)
        out[label] = list(rec["submitted"]) if rec else [s for s, _ in jobs[:rule["wave"]]]
    return out


def record_first_waves(sweep_dir: str | Path, rule: Mapping, groups: Mapping[str, list[tuple[int, list[str]]]],
                       planned: Mapping[str, list[PlannedRun]], params: Mapping[str, Any],
                       ignore_keys: Sequence[str], *, sign: bool = False) -> dict:
    """Write the study (rule, groups, their configs, wave 1 of new groups) to sweep.json, under the
    sweep lock, before anything is submitted; a wave of a rerun is marked submitted again.

    ``sign`` (the SLURM launcher, whose reducer jobs submit the next waves with these settings):
    a signed study must still match its signature, except the launcher settings this command
    records anew (:func:`.trust.verify_study`), and the record is signed again."""
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir) or new_manifest(sweep_dir)
        study = manifest.setdefault("study", {"rule": dict(rule), "status": "running", "stop_reason": None,
                                              "groups": {}, "waves": []})
        if sign and "signature" in study:
            trust.verify_study(study, sweep_dir, renewed=("params.", "ignore_keys"))
        study["params"], study["ignore_keys"] = jsonable(dict(params)), list(ignore_keys)
        new = {}
        for label, jobs in groups.items():
            if label in study["groups"] or not planned.get(label):
                continue
            cap = rule["max_models"] if rule["max_models"] is not None else len(jobs)
            first = planned[label][0]
            seeds = [s for s, _ in jobs][:cap]
            wave = seeds[:rule["wave"]]
            study["groups"][label] = {
                "overrides": split_seed(first.overrides)[0], "seeds": seeds, "submitted": wave,
                "run_ids": {str(s): r.run_id for s, r in zip(wave, planned[label])},
                "config": jsonable(first.container), "precision": {}, "n_models": 0, "state": "growing"}
            new[label] = wave
        if new:
            study["waves"].append({"n": len(study["waves"]) + 1, "time": now_iso(), "by": "launcher",
                                   "groups": new, "status": "recorded", "submission": None, "decided": False})
        elif study["status"] == "stopped" and study["waves"]:
            study["waves"][-1]["status"] = "recorded"  # the rerun submits what it missed
        if study["status"] == "stopped":
            study["status"], study["stop_reason"] = "running", None
        if sign:
            trust.sign_study(study, sweep_dir)
        write_manifest(sweep_dir, manifest)
        return study


def mark_submitted(sweep_dir: str | Path, submission: int | None, error: str | None = None) -> None:
    """The newest wave was submitted (``submission``) or refused (``error``: the study stops)."""
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir)
        if not manifest or not manifest.get("study", {}).get("waves"):
            return
        study = manifest["study"]
        wave = study["waves"][-1]
        if error is None:
            wave["status"] = "submitted"
            if submission is not None:
                wave["submission"] = submission
        else:
            wave.update(status="failed", error=error)
            study["status"] = "stopped"
            study["stop_reason"] = (f"submission of wave {wave['n']} failed: {error}. Rerun the same sweep command "
                                    "to continue (it submits only the seeds not yet done or queued)")
        write_manifest(sweep_dir, manifest)
    refresh_report(sweep_dir)


# =============================================================================== deciding a wave
def precision(study: Mapping, groups: Iterable[Any]) -> dict[str, dict[str, float]]:
    """Group label -> {target: precision now}: the bootstrap SE of the SD, as the reducer computes it
    (analysis/planning.py: same resamples, same seed), the worst over the group's views.

    ``groups``: the reducer's per-model groups of the sweep (``analysis.planning.sweep_groups``:
    each has a ``frame`` with run_id, acc and ce columns, and the ``seed_key`` of its bootstrap).
    """
    owner = {rid: label for label, g in study["groups"].items() for rid in g["run_ids"].values()}
    out: dict[str, dict[str, float]] = {label: {} for label in study["groups"]}
    for g in groups:
        labels = {owner.get(str(r)) for r in g.frame["run_id"]} - {None}
        for label in labels:
            part = g.frame[[owner.get(str(r)) == label for r in g.frame["run_id"]]]
            for name in study["rule"]["targets"]:
                col = TARGET_COLUMNS[name]
                se = M.bootstrap_sd_se(part[col].to_numpy(float), n_boot=10_000,
                                       seed=[0, g.seed_key] + ([1] if col == "ce" else []))
                out[label][name] = max(out[label].get(name, 0.0), float(se))
    return out


def decide(study: dict, precision: Mapping[str, Mapping[str, float]]) -> dict[str, list[int]]:
    """Update each group's state from its precision; the next seeds of the groups that go on."""
    rule = study["rule"]
    nxt: dict[str, list[int]] = {}
    for label, g in study["groups"].items():
        now = dict(precision.get(label, {}))
        g["precision"], g["n_models"] = now, len(g["submitted"])
        missing = [t for t in rule["targets"] if t not in now]
        met = not missing and all(now[t] <= v for t, v in rule["targets"].items())
        left = [s for s in g["seeds"] if s not in set(g["submitted"])]
        if met:
            g["state"] = "target met"
        elif not left:
            g["state"] = f"maximum reached ({len(g['submitted'])} models)"
        else:
            g["state"] = "growing"
            nxt[label] = left[:rule["wave"]]
    return nxt


def not_done(sweep_dir: Path, study: Mapping, manifest: Mapping) -> list[str]:
    """The run ids of the study with no DONE file (yet)."""
    out = []
    for g in study["groups"].values():
        for rid in g["run_ids"].values():
            rec = manifest["runs"].get(rid) or {}
            if not is_done(Path(rec.get("run_dir") or sweep_dir / RUNS / rid)):
                out.append(rid)
    return out


def plan_next(study: Mapping, nxt: Mapping[str, list[int]]) -> dict[str, list[PlannedRun]]:
    """The next seeds' PlannedRuns from each group's recorded config: the launcher's plan_run."""
    planned: dict[str, list[PlannedRun]] = {}
    for label, seeds in nxt.items():
        g = study["groups"][label]
        for s in seeds:
            cfg = copy.deepcopy(g["config"])
            cfg[SEED_KEY] = s
            planned.setdefault(label, []).append(
                plan_run(cfg, [*g["overrides"], f"{SEED_KEY}={s}"], study.get("ignore_keys") or []))
    return planned


def stop(study: dict, status: str, reason: str) -> None:
    study["status"], study["stop_reason"] = status, reason


def decide_wave(sweep_dir: Path, manifest: dict, by: str, echo: Callable[[str], None],
                measure: Measure) -> tuple[int, dict[str, list[int]], list[PlannedRun]]:
    """Under the sweep lock, the newest wave's runs over: measure, decide, and record the next wave
    (seeds and run ids, before anything runs it). (rc, the next seeds per group, their PlannedRuns);
    no next seeds = the study stopped (rc 1: runs not done) or is done (rc 0)."""
    study = manifest["study"]
    last = study["waves"][-1]
    missing = not_done(sweep_dir, study, manifest)
    if missing:
        stop(study, "stopped", f"wave {last['n']}: {len(missing)} run(s) not done ({', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}); see python -m nondet_hpc.status "
                               f"{sweep_dir}, then rerun the same sweep command to run them again")
        write_manifest(sweep_dir, manifest)
        refresh_report(sweep_dir, study)
        echo(f"nondet_hpc: study stopped: {study['stop_reason']}")
        return 1, {}, []
    nxt = decide(study, measure(sweep_dir, study))
    last["decided"] = True
    if not nxt:
        states = sorted({g["state"] for g in study["groups"].values()})
        stop(study, "done", f"after {len(study['waves'])} wave(s): every group stopped ({'; '.join(states)})")
        write_manifest(sweep_dir, manifest)
        refresh_report(sweep_dir, study)
        echo(f"nondet_hpc: study done: {study['stop_reason']}")
        return 0, {}, []
    by_group = plan_next(study, nxt)
    for label, seeds in nxt.items():
        g = study["groups"][label]
        g["submitted"] = [*g["submitted"], *seeds]
        g["run_ids"].update({str(s): r.run_id for s, r in zip(seeds, by_group[label])})
    study["waves"].append({"n": len(study["waves"]) + 1, "time": now_iso(), "by": by, "groups": nxt,
                           "status": "recorded", "submission": None, "decided": False})
    write_manifest(sweep_dir, manifest)  # recorded before it runs: never run or submitted twice
    refresh_report(sweep_dir, study)
    return 0, nxt, [r for runs in by_group.values() for r in runs]


def decide_local(sweep_dir: str | Path, reducer_error: str | None, measure: Measure, *,
                 by: str = "local launcher", echo: Callable[[str], None] = print) -> dict[str, list[int]]:
    """The local launcher's step between waves (it ran the newest wave and the reducer itself):
    the same measurement and decision as a SLURM reducer job's (:func:`decide_wave`), and the next
    wave recorded in sweep.json; the next seeds per group to run here, {} when the study is over."""
    sweep_dir = Path(sweep_dir).absolute()
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir)
        study = (manifest or {}).get("study")
        if not study or not study["waves"] or study["status"] != "running" or study["waves"][-1].get("decided"):
            return {}
        study["waves"][-1]["status"] = "submitted"  # ran here: "submitted" is the state advance decides
        if reducer_error is not None:
            stop(study, "stopped", f"the reducer failed after wave {len(study['waves'])} ({reducer_error}); fix "
                                   "that and rerun the same sweep command to continue")
            write_manifest(sweep_dir, manifest)
            refresh_report(sweep_dir, study)
            echo(f"nondet_hpc: study stopped: {study['stop_reason']}")
            return {}
        return decide_wave(sweep_dir, manifest, by, echo, measure)[1]


def reducer_failed(sweep_dir: str | Path, reducer_rc: int, echo: Callable[[str], None] = print) -> None:
    """A SLURM reducer job's reducer exited with ``reducer_rc``: a running study stops (the next
    wave would be decided from no numbers); rerunning the sweep command continues it."""
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir)
        study = manifest["study"]
        if study["status"] == "running":
            stop(study, "stopped", f"the reducer exited with {reducer_rc} after wave {len(study['waves'])} (its "
                                   "log says why); fix that and rerun the same sweep command to continue")
            write_manifest(sweep_dir, manifest)
            refresh_report(sweep_dir, study)
            echo(f"nondet_hpc: study stopped: {study['stop_reason']}")


# =============================================================================== showing it
def describe(study: Mapping) -> list[str]:
    """Lines for status and the launcher: the rule, the waves, each group's precision and state."""
    rule = study["rule"]
    tg = ", ".join(f"{k} <= {v:g}" for k, v in rule["targets"].items())
    mx = rule["max_models"] if rule["max_models"] is not None else "all seeds swept"
    lines = [f"study: {study['status']} after {len(study['waves'])} wave(s); stop rule: {tg}, wave {rule['wave']}, "
             f"max {mx} per group"]
    if study.get("stop_reason"):
        lines.append(f"  stop reason: {study['stop_reason']}")
    for w in study["waves"]:
        groups = "; ".join(f"{k} {v[0]}-{v[-1]}" for k, v in w["groups"].items())
        err = f" ERROR {w['error']}" if w.get("error") else ""
        lines.append(f"  wave {w['n']} ({w['by']}, {w['status']}, submission {w.get('submission')}): seeds {groups}{err}")
    for label, g in study["groups"].items():
        prec = ", ".join(f"{k} {v:.4g}" for k, v in g["precision"].items()) or "not measured yet"
        lines.append(f"  group {label}: {len(g['submitted'])} seeds submitted (max {len(g['seeds'])}); "
                     f"{prec}; {g['state']}")
    return lines


REPORT_HEADING = "## Study grown in waves"
REPORT_MD = Path("report") / "report.md"  # where the reducer writes it (nondet_hpc.analysis.reduce)
MAX_REPORT_BYTES = 64 << 20


def state_line(study: Mapping) -> str:
    """The study's state and why, as report.md says it: done or stopped (and why), or growing."""
    if study["status"] in ("done", "stopped"):
        return f"**State: {study['status']}**: {study.get('stop_reason') or 'no reason recorded'}"
    last = study["waves"][-1] if study["waves"] else None
    if last is None:
        return "**State: growing**: no wave recorded yet"
    seeds = "; ".join(f"{k} {v[0]}-{v[-1]}" for k, v in last["groups"].items())
    what = "decided" if last.get("decided") else last["status"]
    return (f"**State: growing**: wave {last['n']} ({seeds}) {what}; this report counts the runs done when it was "
            f"written (python -m nondet_hpc.status shows the newest state)")


def report_section(sweep_dir: str | Path, study: Mapping | None = None) -> list[str]:
    """report.md's "Study grown in waves" section: the state and why it stopped, the stop rule, the
    waves run, and the caveat."""
    if study is None:
        try:
            study = load_study(sweep_dir)
        except (OSError, ValueError):
            return []
    if not study:
        return []
    rule = study["rule"]
    tg = ", ".join(f"`{k}` <= {v:g}" for k, v in rule["targets"].items())
    mx = rule["max_models"] if rule["max_models"] is not None else "every seed swept"
    lines = [REPORT_HEADING, "", state_line(study), "",
             f"Stop rule, fixed in sweep.json before the first wave: each group grows by {rule['wave']} seeds a "
             f"wave until {tg} (the bootstrap SE of the SD over the group's models, as in metrics.csv) or "
             f"{mx} models. Waves run: {len(study['waves'])}. Per group:", ""]
    for label, g in study["groups"].items():
        lines.append(f"- {label}: {len(g['submitted'])} models (seeds {g['submitted'][0]}-{g['submitted'][-1]}); "
                     f"{g['state']}")
    lines += ["",
              "Caveat: when a study stops depends on its data, so N is itself random and a group stopped early may "
              "have an SE that happened to be small. What the package does about it: the stopping rule uses only "
              "the SE of an SD (a precision, not a test), every number here is recomputed by the bootstrap of the "
              "final N models, and no hypothesis test is used to decide when to stop; a p-value or a claim verdict "
              "computed on a sweep stopped this way is conditional on the stop and is not corrected for it.", ""]
    return lines


def refresh_report(sweep_dir: str | Path, study: Mapping | None = None) -> None:
    """Rewrite report.md's study section from the record as it is now. The reducer writes the report
    before the wave is decided (the decision reads what it measured), so without this the report of
    a finished study would still say it grows; nothing to do without a report or a section."""
    path = Path(sweep_dir) / REPORT_MD
    try:
        text = read_regular(path, MAX_REPORT_BYTES).decode()
    except (RefusedFile, UnicodeDecodeError):
        return
    start = text.find("\n" + REPORT_HEADING + "\n")
    if start < 0:
        return
    end = text.find("\n## ", start + len(REPORT_HEADING) + 2)
    section = "\n".join(report_section(sweep_dir, study))
    if not section:
        return
    new = text[:start + 1] + section + (text[end:] if end >= 0 else "")
    if new != text:
        write_bytes(path, new.encode())
