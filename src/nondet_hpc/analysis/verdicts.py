"""The three claims of the study judged on one sweep: statistic, 95% CI, N and a plain verdict.

Claim 1: each single source alone gives the accuracy SD of all sources together (the SD ratios of
:func:`nondet_hpc.analysis.claims.claim1`). Claim 2: the random bit change gives as much
variability as all sources (ratios of accuracy SD, disagreement and 1 - correlation, and, where the
runs kept their final weights, of the final parameter distance: the direct evidence). Claim 3:
every TTA / Acc.Ens row reduces variability against its baseline row (both formulas). The rules
that turn an interval into a verdict are in docs/metrics.md ("Claims and verdicts"); they are the
constants below, so the page and the code cannot drift apart silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import metrics as M
from ..registry.metrics import Metric, in_claim
from ..registry.sources import ALL, BITFLIP, CONTROL
from . import resample as RS
from .claims import SINGLE_SOURCES, claim1_metric, families
from .groups import Group
from .planning import needed_n
from .tables import markdown

LEVEL = 0.95  # every interval of the Claims section
RATIO_MARGIN = 1.5  # ratios within [1/1.5, 1.5] count as "the same variability"
REDUCTION_MARGIN = 5.0  # a reduction surely below 5 points of variability reduction is "no reduction"
MIN_MODELS = 10  # fewer models per group: bootstrap intervals too unreliable for any verdict
ALPHA = 0.05  # level of the Brown-Forsythe test reported beside claim 1
CONSISTENT, AGAINST, NOT_ENOUGH = "consistent with", "against", "not enough models"
COLUMNS: list[str] = ["claim", "where", "statistic", "group", "reference", "n_models", "n_reference", "value",
                      "ci_low", "ci_high", "outcome", "n_needed"]


@dataclass
class Stat:
    """One judged statistic: a row of claims.csv."""

    claim: int
    where: str
    statistic: str
    group: str
    reference: str
    n_models: int
    n_reference: int
    value: float
    ci_low: float
    ci_high: float
    outcome: str  # same / differs / unclear (ratios); reduces / no reduction / unclear (claim 3); test
    n_needed: float = math.nan


@dataclass
class Verdict:
    """One claim's verdict for one family of groups (or the whole sweep for claim 3)."""

    claim: int
    where: str
    verdict: str  # CONSISTENT / AGAINST / NOT_ENOUGH / "not measured"
    n_needed: float
    text: str


@dataclass
class Judgement:
    stats: pd.DataFrame
    verdicts: list[Verdict]
    reductions: dict[str, dict[str, tuple[float, float, float, float]]]  # row -> formula -> (value, se, lo, hi)
    resamples: Resamples


class Resamples:
    """Each group's bootstrap resamples over models, computed once per group."""

    def __init__(self, n_boot: int, seed: int) -> None:
        self.n_boot, self.seed = n_boot, seed
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def idx(self, g: Group) -> np.ndarray:
        return RS.draws(g.stats.n_models, self.n_boot, [int(self.seed), g.seed_key, 2])

    def of(self, g: Group) -> dict[str, np.ndarray]:
        if id(g) not in self._cache:
            self._cache[id(g)] = RS.resampled(g.stats, self.idx(g))
        return self._cache[id(g)]


# --------------------------------------------------------------------------------------------
# rules


def ratio_outcome(lo: float, hi: float) -> str:
    """same: the CI lies within [1/margin, margin]; differs: it excludes 1 and is not within; else unclear."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "unclear"
    if 1.0 / RATIO_MARGIN <= lo and hi <= RATIO_MARGIN:
        return "same"
    return "differs" if lo > 1.0 or hi < 1.0 else "unclear"


def reduction_outcome(lo: float, hi: float) -> str:
    """reduces: the CI lies above 0; no reduction: it lies below the margin; else unclear."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "unclear"
    if lo > 0.0:
        return "reduces"
    return "no reduction" if hi < REDUCTION_MARGIN else "unclear"


def _need(n: int, halfwidth: float, target: float) -> float:
    """Models per group for the interval to shrink from ``halfwidth`` to ``target`` (1/sqrt(N) law)."""
    if not (math.isfinite(halfwidth) and math.isfinite(target)) or target <= 0:
        return math.inf
    return float(max(MIN_MODELS, math.ceil(needed_n(n, halfwidth, target) - 1e-9)))


def ratio_need(n: int, value: float, lo: float, hi: float) -> float:
    """N at which an unclear ratio's log-scale CI would either fit the margin or exclude 1."""
    if not (lo > 0 and math.isfinite(hi) and value > 0 and math.isfinite(value)):
        return math.inf
    h = (math.log(hi) - math.log(lo)) / 2.0
    d = abs(math.log(value))
    return _need(n, h, max(math.log(RATIO_MARGIN) - d, d))


def reduction_need(n: int, value: float, lo: float, hi: float) -> float:
    """N at which an unclear reduction's CI would lie above 0 or below the margin."""
    if not all(math.isfinite(x) for x in (value, lo, hi)):
        return math.inf
    return _need(n, (hi - lo) / 2.0, max(value, REDUCTION_MARGIN - value))


def _verdict(stats: list[Stat], bad: str, good: str) -> tuple[str, float]:
    """The claim's verdict from its statistics' outcomes (docs/metrics.md, "Claims and verdicts")."""
    judged = [s for s in stats if s.outcome != "test"]
    small = min(min(s.n_models, s.n_reference or s.n_models) for s in judged)
    if any(s.outcome == bad for s in judged) and small >= MIN_MODELS:
        return AGAINST, math.nan
    if all(s.outcome == good for s in judged) and small >= MIN_MODELS:
        return CONSISTENT, math.nan
    needs = [s.n_needed for s in judged if s.outcome == "unclear"]
    if small < MIN_MODELS:  # an unbounded interval from a handful of models predicts nothing yet
        needs = [x for x in needs if math.isfinite(x)]
    return NOT_ENOUGH, max(needs + [float(MIN_MODELS)])


def _need_text(need: float, n: int) -> str:
    if not math.isfinite(need):
        return "need more models (an interval is unbounded, so no N can be predicted)"
    return f"need {'at least' if need == MIN_MODELS and n < MIN_MODELS else 'about'} {int(need)} per group"


# --------------------------------------------------------------------------------------------
# claims


def _ratio_stat(claim: int, where: str, name: str, g: Group, ref: Group, value: float, num: np.ndarray,
                den: np.ndarray) -> Stat:
    lo, hi = RS.percentile_ci(RS.ratio(num, den), LEVEL)
    out = ratio_outcome(lo, hi)
    n = min(g.stats.n_models, ref.stats.n_models)
    return Stat(claim, where, name, g.row_name, ref.row_name, g.stats.n_models, ref.stats.n_models, value, lo, hi,
                out, ratio_need(n, value, lo, hi) if out == "unclear" else math.nan)


def judge_claim1(groups: list[Group], c1: pd.DataFrame) -> tuple[list[Stat], list[Verdict]]:
    """Claim 1 per family from claim1.csv's SD ratios (single sources / all sources) and the test."""
    stats: list[Stat] = []
    verdicts: list[Verdict] = []
    by_name = dict(zip(c1["group"], c1.to_dict("records")))
    for where, gs in families(groups):
        ref = next((g for g in gs if g.source_name == ALL), None)
        singles = [g for g in gs if g.source_name in SINGLE_SOURCES]
        if ref is None or not singles:
            miss = "all-sources group" if ref is None else "single-source group"
            verdicts.append(Verdict(1, where, "not measured", math.nan,
                                    f"Claim 1{where}: not measured: no {miss} with 2 or more models."))
            continue
        mine = []
        name = claim1_metric().name
        for g in singles:
            r = by_name[g.row_name]
            lo, hi = float(r["ci_low"]), float(r["ci_high"])
            out = ratio_outcome(lo, hi)
            n = min(g.stats.n_models, ref.stats.n_models)
            mine.append(Stat(1, where, f"{name} / all-sources {name}", g.row_name, ref.row_name, g.stats.n_models,
                             ref.stats.n_models, float(r["sd_ratio"]), lo, hi, out,
                             ratio_need(n, float(r["sd_ratio"]), lo, hi) if out == "unclear" else math.nan))
        test = _bf_test(singles + [ref], where)
        verdict, need = _verdict(mine, "differs", "same")
        stats += mine + ([test] if test else [])
        verdicts.append(Verdict(1, where, verdict, need, _claim_text(1, where, verdict, need, mine, test)))
    return stats, verdicts


def _bf_test(gs: list[Group], where: str) -> Stat | None:
    """Brown-Forsythe test of equal accuracy variance over the single sources and all sources."""
    try:
        W, p = M.equal_variance_test([g.stats.per_model()[claim1_metric().per_model] for g in gs])
    except (ImportError, ValueError):
        return None
    n = min(g.stats.n_models for g in gs)
    return Stat(1, where, "Brown-Forsythe p (equal variance)", f"{len(gs)} groups (W={W:.3f})", "", n, 0, p, math.nan,
                math.nan, "test")


def judge_claim2(groups: list[Group], res: Resamples) -> tuple[list[Stat], list[Verdict]]:
    """Claim 2 per family: bit change / all sources for acc SD, disagreement and 1 - correlation."""
    stats: list[Stat] = []
    verdicts: list[Verdict] = []
    for where, gs in families(groups):
        bit = next((g for g in gs if g.source_name == BITFLIP), None)
        ref = next((g for g in gs if g.source_name == ALL), None)
        if bit is None or ref is None:
            if bit is not None or ref is not None:  # a family with neither has nothing to say about claim 2
                miss = "all-sources group" if ref is None else "bit-change group"
                verdicts.append(Verdict(2, where, "not measured", math.nan,
                                        f"Claim 2{where}: not measured: no {miss} with 2 or more models."))
            continue
        mine = [_claim2_stat(m, where, bit, ref, res) for m in in_claim(2) if _measured(m, bit, ref)]
        verdict, need = _verdict(mine, "differs", "same")
        stats += mine
        verdicts.append(Verdict(2, where, verdict, need, _claim_text(2, where, verdict, need, mine, None)))
    return stats, verdicts


def _measured(m: Metric, *groups: Group) -> bool:
    """An optional metric (the final parameter distance: weights files) judges a claim only where
    every group has it; the others are measured wherever there are logits."""
    return not m.optional or all(math.isfinite(g.summary.get(m.key, math.nan)) for g in groups)


def _claim2_stat(m: Metric, where: str, bit: Group, ref: Group, res: Resamples) -> Stat:
    """Bit change / all sources for one metric of claim 2, with its 95% CI.

    An SD of per-model values: the two groups' values resampled (:func:`metrics.bootstrap_sd_ratio_ci`);
    a pairwise metric: the ratio of the groups' bootstrap resamples over models, of 1 - value for a
    similarity (1 - r is the variability; r itself sits near 0.87 for every group).
    """
    if m.per_model is not None:
        v = M.bootstrap_sd_ratio_ci(bit.stats.per_model()[m.per_model], ref.stats.per_model()[m.per_model],
                                    n_boot=res.n_boot, seed=[int(res.seed), bit.seed_key, ref.seed_key], level=LEVEL)
        out = ratio_outcome(v[1], v[2])
        n = min(bit.stats.n_models, ref.stats.n_models)
        return Stat(2, where, f"{m.name} ratio", bit.row_name, ref.row_name, bit.stats.n_models, ref.stats.n_models,
                    v[0], v[1], v[2], out, ratio_need(n, *v) if out == "unclear" else math.nan)
    num, den = bit.summary[m.key], ref.summary[m.key]
    rnum, rden = res.of(bit)[m.key], res.of(ref)[m.key]
    if m.similarity:
        return _ratio_stat(2, where, f"(1 - {m.name}) ratio", bit, ref, _div(1.0 - num, 1.0 - den), 1.0 - rnum,
                           1.0 - rden)
    return _ratio_stat(2, where, f"{m.name} ratio", bit, ref, _div(num, den), rnum, rden)


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


def judge_claim3(groups: list[Group], df: pd.DataFrame, formula: str, res: Resamples
                 ) -> tuple[list[Stat], list[Verdict], dict[str, dict[str, tuple[float, float, float, float]]]]:
    """Claim 3: each TTA / Acc.Ens row's reduction against its baseline row, bootstrap CI over models.

    When the row and its baseline hold the same runs (a TTA view of the single models) one draw of
    runs serves both (a paired bootstrap); otherwise (Acc.Ens of snapshot-trained runs against
    normally trained ones) the two groups are resampled independently.
    """
    by_row = {g.row_name: g for g in groups}
    stats: list[Stat] = []
    reductions: dict[str, dict[str, tuple[float, float, float, float]]] = {}
    for i, g in enumerate(groups):
        base = by_row.get(str(df.at[i, "baseline"]))
        if (base is None or base is g or g.stats is None or base.stats is None or g.stats.n_models < 2
                or base.stats.n_models < 2 or g.source_name == CONTROL
                or (g.view_id == "plain" and int(g.identity.get("train.snapshots", 1) or 1) == 1)):
            continue
        new = res.of(g)
        pos = {r.run_id: k for k, r in enumerate(base.used)}
        if sorted(pos) == sorted(r.run_id for r in g.used):  # same runs: paired
            perm = np.array([pos[r.run_id] for r in g.used])
            old = RS.resampled(base.stats, perm[res.idx(g)])
        else:
            old = res.of(base)
        reductions[g.row_name] = {}
        for f in M.FORMULAS:
            value = M.variability_reduction(base.summary, g.summary, f)
            boot = np.array([M.variability_reduction({k: old[k][j] for k in M.REDUCTION_KEYS},
                                                     {k: new[k][j] for k in M.REDUCTION_KEYS}, f)
                             for j in range(res.n_boot)])
            lo, hi = RS.percentile_ci(boot, LEVEL)
            reductions[g.row_name][f] = (value, RS.bootstrap_se(boot), lo, hi)
            out = reduction_outcome(lo, hi)
            n = min(g.stats.n_models, base.stats.n_models)
            stats.append(Stat(3, "", f"variability reduction % ({f} formula)", g.row_name, base.row_name,
                              g.stats.n_models, base.stats.n_models, value, lo, hi, out,
                              reduction_need(n, value, lo, hi) if out == "unclear" else math.nan))
    if not stats:
        return [], [], reductions
    # both formulas are in claims.csv; the verdict reads the one the reducer's table uses
    mine = [s for s in stats if s.statistic.endswith(f"({formula} formula)")]
    verdict, need = _verdict(mine, "no reduction", "reduces")
    return stats, [Verdict(3, "", verdict, need, _claim_text(3, "", verdict, need, mine, None))], reductions


# --------------------------------------------------------------------------------------------
# text


def _ci(s: Stat, nd: int) -> str:
    return f"{s.value:.{nd}f} [{s.ci_low:.{nd}f}, {s.ci_high:.{nd}f}]"


_WHAT = {1: "each single source alone gives the accuracy SD of all sources together",
         2: "one ulp of one initial weight gives as much variability as all sources together",
         3: "TTA and accelerated ensembling reduce variability"}


def _claim_text(claim: int, where: str, verdict: str, need: float, stats: list[Stat], test: Stat | None) -> str:
    nd = 1 if claim == 3 else 2
    n = min(min(s.n_models, s.n_reference or s.n_models) for s in stats)
    head = f"Claim {claim}{where} ({_WHAT[claim]}; N >= {n} per group): "
    if verdict == AGAINST:
        bad = [s for s in stats if s.outcome in ("differs", "no reduction")]
        body = f"against claim {claim}: " + "; ".join(f"{s.group} {s.statistic} {_ci(s, nd)}" for s in bad)
    elif verdict == CONSISTENT:
        body = (f"consistent with claim {claim}: every 95% CI " + (
            "lies above 0" if claim == 3 else f"lies within [{1 / RATIO_MARGIN:.2f}, {RATIO_MARGIN:g}]")
            + " (" + "; ".join(f"{s.statistic if claim == 2 else s.group} {_ci(s, nd)}" for s in stats) + ")")
    else:
        why = (f"fewer than {MIN_MODELS} models in a group" if n < MIN_MODELS else
               "; ".join(f"{s.group} {s.statistic} {_ci(s, nd)} is too wide to tell" for s in stats
                         if s.outcome == "unclear"))
        body = f"not enough models: {_need_text(need, n)} ({why})"
    if test is not None:
        body += (f"; Brown-Forsythe p={test.value:.3g} over {test.group}"
                 + (f" (rejects equal variance at {ALPHA:g})" if test.value < ALPHA else ""))
    return head + body + "."


def judge(groups: list[Group], df: pd.DataFrame, c1: pd.DataFrame, formula: str, n_boot: int,
          seed: int) -> Judgement:
    """Every claim the sweep's groups can speak to, in claim order."""
    res = Resamples(n_boot, seed)
    usable = [g for g in groups if g.stats is not None and g.stats.n_models >= 2]
    s1, v1 = judge_claim1(usable, c1)
    s2, v2 = judge_claim2(usable, res)
    s3, v3, red = judge_claim3(groups, df, formula, res)
    table = pd.DataFrame([asdict(s) for s in s1 + s2 + s3], columns=COLUMNS)
    return Judgement(table, v1 + v2 + v3, red, res)


def claims_md(j: Judgement) -> list[str]:
    """report.md's opening "Claims" section: one verdict line per claim, then the statistics."""
    parts = ["## Claims", ""]
    if not j.verdicts:
        return parts + [("No claim can be judged: the sweep has no all-sources, bit-change or TTA / Acc.Ens "
                         "group with 2 or more models."), ""]
    parts += [f"- {v.text}" for v in j.verdicts]
    judged = {v.claim for v in j.verdicts}
    parts += [f"- Claim {c} ({_WHAT[c]}): not measured in this sweep." for c in (1, 2, 3) if c not in judged]
    parts += ["", (f"Rules (docs/metrics.md, 'Claims and verdicts'): 95% bootstrap intervals; a ratio is the "
              f"same when its interval lies within [{1 / RATIO_MARGIN:.2f}, {RATIO_MARGIN:g}] and differs when "
              f"it excludes 1 otherwise; a reduction holds when its interval lies above 0 and is absent when "
              f"it lies below {REDUCTION_MARGIN:g}; fewer than {MIN_MODELS} models per group, or an interval "
              f"too wide to tell, is 'not enough models'."), ""]
    if not j.stats.empty:
        t = pd.DataFrame({
            "claim": j.stats["claim"].astype(str) + j.stats["where"],
            "statistic": j.stats["statistic"], "group": j.stats["group"], "vs": j.stats["reference"],
            "N": [f"{a}" + (f"/{b}" if b else "") for a, b in zip(j.stats["n_models"], j.stats["n_reference"])],
            "value": [_g(v) for v in j.stats["value"]],
            "95% CI": ["" if not math.isfinite(lo) else f"[{_g(lo)}, {_g(hi)}]"
                       for lo, hi in zip(j.stats["ci_low"], j.stats["ci_high"])],
            "outcome": j.stats["outcome"],
            "N needed": ["" if not isinstance(v, float) or math.isnan(v) else ("?" if math.isinf(v) else str(int(v)))
                         for v in j.stats["n_needed"]],
        })
        parts += [markdown(t.astype(str)), ""]
    return parts


def _g(v: Any) -> str:
    x = float(v)
    if not math.isfinite(x):
        return "inf" if x > 0 else "-"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
