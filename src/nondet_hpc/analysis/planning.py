"""How many models a study needs: predict N from a pilot sweep's precision (issue 13, part 1).

    python -m nondet_hpc.plan SWEEP_DIR --target acc_sd_se=0.02 [--target ce_sd_se=0.0005]
                                        [--target ratio_ci=0.25] [--level 0.9] [--json]

Input: SWEEP_DIR/report/per_model.csv (the reducer's per-model accuracies and cross-entropies)
and each run's run.json (group key, identity, views, timings). Pure numpy/scipy/pandas: no torch.

The precision model (its functions in analysis/precision.py; derivation in docs/experiments/planning.md):

* The precision of an SD is its bootstrap SE, computed exactly as the reducer computes it
  (population SD, 10,000 resamples, the reducer's generator seed), so "SE now" equals
  report/metrics.csv. For a population SD of N values the delta method gives
  SE ~= SD * sqrt((kurtosis - 1) / (4 N)): for a fixed distribution, SE * sqrt(N) is constant, so
  ``N_needed = N_now * (SE_now / target)**2``.
* The claim target is the half-width of the 95% CI of SD(source) / SD(all sources), the interval
  report/claim1.csv prints. Its square is proportional to the variance of the log ratio,
  ``c_a / N_a + c_b / N_b``; with both groups at a common N' the half-width scales as 1/sqrt(N').
* The uncertainty of N_needed comes from SE_now's own sampling error, measured by a double
  bootstrap: resample the N values, recompute the SE on each resample (inner bootstrap), and form
  a log-scale t interval around the bias-corrected SE (a bootstrap SE from few models is biased
  low, so the interval sits above the plain law's point). N_needed is proportional to SE_now**2,
  so the interval of SE maps to an interval of N.
* The check: subsample n < N models of a group, predict the SE at N from them, and compare with
  the SE that all N models give (``subsample_check``; tests/test_planning.py does it on synthetic
  normal data, the CLI on every group with N >= 10).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..registry.metrics import model_sds
from ..registry.sources import ALL, CONTROL
from ..rundir import RUNS, read_run_json
from .groups import family, seed_key
from .report_files import ReportMismatch, verified
from .tables import read_csv
from .precision import MIN_MODELS, needed_n, plan_ratio, plan_sd_se, se_star, subsample_check

__all__ = ["TARGETS", "PlanError", "parse_target", "needed_n", "se_star", "plan_sd_se", "plan_ratio",
           "subsample_check", "plan_sweep", "format_plan", "main", "sweep_groups"]

RATIO = "ratio_ci"  # the claim-1 target
#: target name -> (per-model column it is about, what it means, unit): the SE column of each SD of
#: per-model values (metrics.csv), and the claim-1 interval
TARGETS: dict[str, tuple[str, str, str]] = {
    **{m.se: (m.per_model, f"bootstrap SE of the {m.label}", m.unit) for m in model_sds()},
    RATIO: ("acc", "half-width of the 95% CI of acc SD(source) / acc SD(all sources)", "ratio"),
}
#: an SD target's extra bootstrap seed entries, as the reducer draws that SD's resamples
_STREAM: dict[str, list[int]] = {m.se: list(m.stream) for m in model_sds()}
CHECK_MIN_N = 10  # the subsampling check needs n = N // 2 >= MIN_MODELS models per subset
DIGITS = "digits"
PER_MODEL = "per_model.csv"


class PlanError(Exception):
    """Wrong input: printed without traceback, exit status 2."""


# --------------------------------------------------------------------------------------------
# targets


def parse_target(text: str) -> tuple[str, float]:
    """``"acc_sd_se=0.02"`` -> ``("acc_sd_se", 0.02)``; anything else is a PlanError naming the valid ones."""
    valid = ", ".join(f"{k}=<positive number> ({v[1]}, {v[2]})" for k, v in TARGETS.items())
    name, sep, value = str(text).partition("=")
    name = name.strip()
    if not sep or name not in TARGETS:
        raise PlanError(f"--target {text!r} is not a target; valid targets: {valid}")
    try:
        x = float(value)
    except ValueError:
        raise PlanError(f"--target {text!r}: {value!r} is not a number; valid targets: {valid}") from None
    if not (math.isfinite(x) and x > 0):
        raise PlanError(f"--target {text!r}: the value must be a positive finite number; valid targets: {valid}")
    return name, x


# --------------------------------------------------------------------------------------------
# a sweep


@dataclass
class _Group:
    row: str  # per_model.csv "group" (the reducer's row name, view included)
    source: str  # the reducer's group name without the view
    view_id: str
    frame: pd.DataFrame
    group_key: str = ""
    identity: dict | None = None
    info: dict | None = None
    seconds: float = math.nan  # median measured seconds per run (train + evaluation)

    @property
    def seed_key(self) -> int:
        # the reducer's bootstrap seed of the row: the same seed makes "SE now" equal to report/metrics.csv
        return seed_key(self.group_key, self.view_id)

    @property
    def family(self) -> str:
        return family(self.identity or {})


def _load(sweep: Path) -> list[_Group]:
    csv = sweep / "report" / PER_MODEL
    if not os.path.lexists(csv):
        where = "is not a sweep folder (no runs/)" if not (sweep / RUNS).is_dir() else "has runs but no report yet"
        raise PlanError(f"{csv} not found: {sweep} {where}. The planner reads the reducer's per-model values; "
                        f"make them with: python -m nondet_hpc.reduce {sweep}")
    try:  # only a report whose parts come from one reduction (report.json) is read
        data = verified(sweep, (PER_MODEL,))[PER_MODEL]
    except ReportMismatch as e:
        raise PlanError(str(e)) from None
    try:
        df = read_csv(data, keep_default_na=False, dtype={"group": str, "source": str, "view_id": str, "run_id": str})
    except (OSError, ValueError) as e:
        raise PlanError(f"{csv} is unreadable ({type(e).__name__}: {e}); rerun python -m nondet_hpc.reduce {sweep}")
    need = {"group", "source", "view_id", "run_id", "acc", "ce"}
    if not need <= set(df.columns):
        raise PlanError(f"{csv} lacks the columns {sorted(need - set(df.columns))}; it was not written by this "
                        f"package's reducer: rerun python -m nondet_hpc.reduce {sweep}")
    if df.empty:
        raise PlanError(f"{csv} has no models; reduce a sweep with finished runs first")
    for col in ("acc", "ce"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            raise PlanError(f"{csv}: row {bad[0] + 2} ({df['run_id'][bad[0]]}) has {col}={df[col][bad[0]]!r}, not a "
                            f"finite number; the file was edited or damaged. Rerun python -m nondet_hpc.reduce {sweep}")
        df[col] = values
    groups = []
    for (row, source, view), part in df.groupby(["group", "source", "view_id"], sort=False):
        g = _Group(str(row), str(source), str(view), part.reset_index(drop=True))
        secs = []
        for rid in part["run_id"]:
            info, _ = read_run_json(sweep / RUNS / str(rid))
            if info is None:
                continue
            if g.info is None:
                g.info, g.identity, g.group_key = info, info.get("identity") or {}, str(info.get("group_key", ""))
            t = info.get("timings") or {}
            if isinstance(t.get("train_s"), (int, float)):
                secs.append(float(t["train_s"]) + float(t.get("eval_s") or 0.0))
        g.seconds = float(np.median(secs)) if secs else math.nan
        groups.append(g)
    return groups


def sweep_groups(sweep: Path) -> list[_Group]:
    """The reducer's groups of a sweep (one per group and view) with their per-model values, its
    bootstrap seed (``seed_key``) and run.json facts: what sweep/waves.py measures between waves."""
    return _load(Path(sweep))


def _cost(g: _Group) -> tuple[float, str, str]:
    """(cost of one model, unit, how it was obtained)."""
    from ..presets import MACS, gpu_hours_per_model

    ident = g.identity or {}
    data = str(ident.get("data.name", ""))
    if data == DIGITS:
        # the V100 cost model is for CIFAR; digits runs are measured, on the CPU they ran on
        threads = (g.info or {}).get("threads")
        return g.seconds, "CPU-s", (f"measured: median train + evaluation seconds of the group's runs"
                                    f"{f' ({threads} threads)' if threads else ''}; digits costs CPU-seconds, "
                                    "not GPU-hours")
    model = str(ident.get("model.name", ""))
    epochs = ident.get("train.epochs")
    if model not in MACS or not isinstance(epochs, (int, float)):
        return math.nan, "V100 GPU-h", f"no cost model for model={model or '?'} epochs={epochs}"
    views = [str(v) for v in ((g.info or {}).get("views") or ["plain"])]
    h = gpu_hours_per_model(model, int(epochs), num_classes=int(ident.get("data.num_classes", 10)),
                            snapshots=int(ident.get("train.snapshots", 1) or 1), views=views)
    return h, "V100 GPU-h", (f"presets cost model: {model}, {int(epochs)} epochs, "
                             f"{int(ident.get('train.snapshots', 1) or 1)} snapshot(s), views {'/'.join(views)}")


def _reference(g: _Group, groups: list[_Group]) -> _Group | None:
    # claim 1 compares each single-model source group with all sources of the same family (reduce._claim1)
    if g.view_id != "plain" or (g.identity or {}).get("source.name") in (ALL, CONTROL):
        return None
    refs = [r for r in groups if r.view_id == "plain" and (r.identity or {}).get("source.name") == ALL
            and r.family == g.family]
    return refs[0] if refs else None


def plan_sweep(sweep_dir: str | Path, targets: Mapping[str, float], *, level: float = 0.9, n_boot: int = 10_000,
               seed: int = 0, n_outer: int = 500, n_inner: int = 200, check: bool = True,
               check_subsets: int = 10) -> dict[str, Any]:
    """The plan of a sweep: per group and target, precision now, N needed with interval, cost; the study."""
    if not targets:
        raise PlanError("no --target given; valid targets: " + ", ".join(f"{k}=<value>" for k in TARGETS))
    if not 0 < level < 1:
        raise PlanError(f"--level must be between 0 and 1, got {level}")
    if n_boot < 2 or n_outer < 20 or n_inner < 20:
        raise PlanError("--n-boot must be >= 2, --n-outer and --n-inner >= 20")
    sweep = Path(sweep_dir)
    groups = _load(sweep)
    notes: list[str] = []
    out_groups = []
    for g in groups:
        unit_cost, unit, how = _cost(g)
        entry: dict[str, Any] = {"group": g.row, "source": g.source, "view_id": g.view_id, "n_now": len(g.frame),
                                 "group_key": g.group_key, "cost_per_model": unit_cost, "cost_unit": unit,
                                 "cost_model": how, "targets": {}, "check": {}}
        if len(g.frame) < MIN_MODELS:
            entry["note"] = f"only {len(g.frame)} models: the planner needs at least {MIN_MODELS} per group"
            out_groups.append(entry)
            continue
        for name, t in targets.items():
            col = TARGETS[name][0]
            base_seed = [int(seed), g.seed_key] + _STREAM.get(name, [])
            if name == RATIO:
                ref = _reference(g, groups)
                if ref is None or len(ref.frame) < MIN_MODELS:
                    continue
                res = plan_ratio(g.frame[col].to_numpy(float), ref.frame[col].to_numpy(float), t, n_boot=n_boot,
                                 seed=[int(seed), g.seed_key, ref.seed_key], level=level, n_outer=n_outer,
                                 n_inner=n_inner)
                res["reference"] = ref.row
            else:
                res = plan_sd_se(g.frame[col].to_numpy(float), t, n_boot=n_boot, seed=base_seed, level=level,
                                 n_outer=n_outer, n_inner=n_inner)
            for k in ("n_needed", "n_low", "n_high"):
                res["cost_" + k[2:]] = res[k] * unit_cost if math.isfinite(unit_cost) else math.nan
            entry["targets"][name] = res
            if check and name != RATIO and len(g.frame) >= CHECK_MIN_N and res["now"] > 0:
                entry["check"][name] = subsample_check(g.frame[col].to_numpy(float), len(g.frame) // 2,
                                                       n_subsets=check_subsets, seed=base_seed, level=level)
        out_groups.append(entry)
    if RATIO in targets and not any(RATIO in e["targets"] for e in out_groups):
        notes.append("ratio_ci: no source group has an all-sources group (source=all, same data/model/epochs) "
                     f"with >= {MIN_MODELS} models beside it; nothing to plan for the claim")
    small = [e["group"] for e in out_groups if e["n_now"] < CHECK_MIN_N and e["n_now"] >= MIN_MODELS]
    if small:
        notes.append(f"pilot groups with fewer than {CHECK_MIN_N} models ({', '.join(small)}): the SE of an SD "
                     "from so few models is itself very uncertain; read the intervals, not the point")
    return {"sweep": str(sweep), "targets": dict(targets), "level": level, "n_boot": n_boot, "seed": seed,
            "groups": out_groups, "study": _study(out_groups, targets), "notes": notes}


def _study(groups: list[dict], targets: Mapping[str, float]) -> dict[str, Any]:
    """The whole study: runs are shared by the views of one source group, so its N is the max over them."""
    by_source: dict[str, list[dict]] = {}
    for e in groups:
        by_source.setdefault(e["group_key"] or e["source"], []).append(e)
    study: dict[str, Any] = {"n_groups": len(by_source),
                             "n_models_now": int(sum(max(e["n_now"] for e in es) for es in by_source.values())),
                             "targets": {}}
    row_key = {e["group"]: e["group_key"] or e["source"] for e in groups}
    for name in targets:
        per = []
        # a ratio's CI narrows only if both groups grow: the all-sources group inherits the largest
        # need of the groups compared with it
        inherited: dict[str, list[dict]] = {}
        for e in groups:
            ref = e["targets"].get(name, {}).get("reference")
            if ref:
                inherited.setdefault(row_key.get(ref, ref), []).append(e["targets"][name])
        for key, es in by_source.items():
            results = [e["targets"][name] for e in es if name in e["targets"]] + inherited.get(key, [])
            if not results:
                continue
            need = {k: max(r[k] for r in results) for k in ("n_needed", "n_low", "n_high")}
            per.append((max(e["n_now"] for e in es), need, es[0]["cost_per_model"], es[0]["cost_unit"]))
        if not per:
            continue
        res: dict[str, Any] = {"worst_now": max(max(e["targets"][name]["now"] for e in es if name in e["targets"])
                                                for es in by_source.values() if any(name in e["targets"] for e in es)),
                               "n_groups": len(per)}
        for k in ("n_needed", "n_low", "n_high"):
            res["common_" + k] = max(p[1][k] for p in per)  # one N for every group: the largest need
            res["models_" + k[2:]] = float(sum(max(p[1][k], p[0]) for p in per))
            cost: dict[str, float] = {}
            for n_now, need, c, unit in per:
                cost[unit] = cost.get(unit, 0.0) + max(need[k], n_now) * c
            res["cost_" + k[2:]] = cost
        res["models_extra"] = float(sum(max(p[1]["n_needed"] - p[0], 0) for p in per))
        extra: dict[str, float] = {}
        for n_now, need, c, unit in per:
            extra[unit] = extra.get(unit, 0.0) + max(need["n_needed"] - n_now, 0) * c
        res["cost_extra"] = extra
        study["targets"][name] = res
    return study


# --------------------------------------------------------------------------------------------
# output


def _n(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else ("inf" if x == math.inf else f"{x:.0f}")


def _g(x: Any, nd: int = 4) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{nd}g}")


def _cost_txt(x: float, unit: str) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"


def _rows(plan: Mapping[str, Any]) -> pd.DataFrame:
    recs = []
    pct = f"{plan['level']:.0%}"
    for e in plan["groups"]:
        if not e["targets"]:
            recs.append({"Group": e["group"], "N now": str(e["n_now"]), "Target": "-", "Now": "-",
                         "N needed": "-", "N bias-corr.": "-", f"{pct} interval": "-",
                         "Cost of N": e.get("note", "no target applies")})
        for name, r in e["targets"].items():
            label = name + (f" vs {r['reference']}" if r.get("reference") else "")
            recs.append({"Group": e["group"], "N now": str(e["n_now"]), "Target": f"{label} <= {_g(r['target'])}",
                         "Now": _g(r["now"]) + (" (met)" if r["met"] else ""), "N needed": _n(r["n_needed"]),
                         "N bias-corr.": _n(r["n_needed_bias_corrected"]), f"{pct} interval": f"[{_n(r['n_low'])}, {_n(r['n_high'])}]",
                         "Cost of N": _cost_txt(r["cost_needed"], e["cost_unit"])})
    return pd.DataFrame(recs, columns=["Group", "N now", "Target", "Now", "N needed", "N bias-corr.", f"{pct} interval",
                                       "Cost of N"])


def _study_lines(plan: Mapping[str, Any]) -> list[str]:
    st = plan["study"]
    pct = f"{plan['level']:.0%}"
    lines = []
    for name, r in st["targets"].items():
        cost = ", ".join(_cost_txt(v, u) for u, v in r["cost_needed"].items())
        lo = ", ".join(_cost_txt(v, u) for u, v in r["cost_low"].items())
        hi = ", ".join(_cost_txt(v, u) for u, v in r["cost_high"].items())
        extra = ", ".join(_cost_txt(v, u) for u, v in r["cost_extra"].items())
        lines.append(f"{name} <= {_g(plan['targets'][name])}: worst group now {_g(r['worst_now'])}; one N for all "
                     f"{r['n_groups']} group(s): {_n(r['common_n_needed'])} ({pct} interval "
                     f"[{_n(r['common_n_low'])}, {_n(r['common_n_high'])}]); each group its own N: "
                     f"{_n(r['models_needed'])} models in all, {_n(r['models_extra'])} more than now, costing {cost} "
                     f"(interval {lo} to {hi}; the extra models {extra}).")
    return lines


def _sections(plan: Mapping[str, Any]) -> list[str]:
    """Whole study, subsampling check and notes, as the CLI prints them."""
    out: list[str] = []
    blocks = [((f"Whole study: {plan['study']['n_groups']} source group(s), {plan['study']['n_models_now']} "
               "models now."), _study_lines(plan)),
              ("Check against subsampling of this sweep:", _check_lines(plan)), ("Notes:", plan["notes"])]
    for title, items in blocks:
        if items:
            out += [title, *[f"  {ln}" for ln in items], ""]
    return out


def _check_lines(plan: Mapping[str, Any]) -> list[str]:
    out = []
    for e in plan["groups"]:
        for name, c in e.get("check", {}).items():
            out.append(f"{e['group']}, {name}: from {c['n_subsets']} random subsets of n={c['n']} the law predicts "
                       f"SE {_g(c['predicted_median'])} at N={c['N']} (5-95% of subsets {_g(c['predicted_low'])}-"
                       f"{_g(c['predicted_high'])}); all {c['N']} models give {_g(c['se_at_N'])}; "
                       f"{c['coverage']:.0%} of the subsets' {c['level']:.0%} intervals cover it")
    return out


def format_plan(plan: Mapping[str, Any]) -> str:
    """The text the CLI prints."""
    pct = f"{plan['level']:.0%}"
    units = sorted({(e["cost_unit"], e["cost_model"]) for e in plan["groups"]})
    lines = [f"Plan for {plan['sweep']} (targets: "
             + ", ".join(f"{k}={_g(v)}" for k, v in plan["targets"].items()) + ")", "",
             _rows(plan).to_string(index=False), "", *_sections(plan),
             "Cost per model: " + "; ".join(f"{u} ({how})" for u, how in units), "",
             (f"'Now' is the bootstrap SE the reducer prints ({plan['n_boot']} resamples, seed {plan['seed']}); "
             f"N needed = N_now x (now / target)^2; the {pct} interval comes from a double bootstrap and is "
             "centred on the bias-corrected value (SEs from few models are biased low; docs/experiments/planning.md).")]
    return "\n".join(lines).rstrip() + "\n"


def _jsonable(x: Any) -> Any:
    # JSON has no inf/nan: null keeps the file valid for every parser
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nondet_hpc.plan",
                                description="Predict how many models per group reach a precision target, and "
                                            "what they cost, from a reduced pilot sweep.")
    p.add_argument("sweep_dir", help="sweep folder whose report/per_model.csv the reducer wrote")
    p.add_argument("--target", action="append", default=[], metavar="NAME=VALUE",
                   help="precision target, repeatable or comma-separated: " + ", ".join(
                       f"{k} ({v[1]}, {v[2]})" for k, v in TARGETS.items()))
    p.add_argument("--level", type=float, default=0.9, help="level of the interval of N needed (default 0.9)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples of 'now' (default 10000, as the reducer)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0, as the reducer)")
    p.add_argument("--n-outer", type=int, default=500, help="outer resamples of the double bootstrap (default 500)")
    p.add_argument("--n-inner", type=int, default=200, help="inner resamples of the double bootstrap (default 200)")
    p.add_argument("--no-check", action="store_true", help="skip the subsampling check of groups with N >= 10")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (null for infinite or undefined)")
    args = p.parse_args(argv)
    try:
        targets: dict[str, float] = {}
        for text in args.target:
            for part in filter(None, (s.strip() for s in text.split(","))):
                name, value = parse_target(part)
                targets[name] = value
        plan = plan_sweep(args.sweep_dir, targets, level=args.level, n_boot=args.n_boot, seed=args.seed,
                          n_outer=args.n_outer, n_inner=args.n_inner, check=not args.no_check)
    except PlanError as e:
        print(f"nondet_hpc.plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_jsonable(plan), indent=2) if args.json else format_plan(plan), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
