"""Beyond the paper's tables: the N-models ablation and the claim-1 SD ratios (docs/metrics.md).

Both reuse what :func:`nondet_hpc.analysis.stats.reduce_group` computed (pair matrices, per-model
accuracies); nothing is retrained or reread.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .. import metrics as M
from ..registry.metrics import GROUP, MODEL, PAIRWISE, Metric, in_claim, of_kind
from ..registry.sources import ALL, CONTROL, SOURCES
from .groups import Group, differing, family, fmt_value, prune_keys

ABLATION_NS: tuple[int, ...] = (10, 25, 50, 75)
ABLATION_SUBSETS = 200
#: the paper's single sources: claim 1 compares each with all sources together (combinations, the
#: bit change and the determinism control are other questions: claim 2 is the bit change's)
SINGLE_SOURCES: tuple[str, ...] = tuple(s.name for s in SOURCES.values() if s.single)


def claim1_metric() -> Metric:
    """The metric claim 1 is about (the accuracy SD): its per-model values are resampled."""
    (m,) = in_claim(1)
    return m


def claim1_columns() -> list[str]:
    """claim1.csv's columns."""
    return ["group", "reference", "n_models", claim1_metric().key, "sd_ratio", "ci_low", "ci_high"]


def ablation_keys() -> list[str]:
    """ablation.csv's metrics, in the order of metrics.subset_metrics: per-model, pairwise, group."""
    return [m.key for kind in (MODEL, PAIRWISE, GROUP) for m in of_kind(kind)]


def ablation(groups: list[Group], seed: int) -> pd.DataFrame:
    """N-models ablation: every metric on random N-subsets of the runs already there."""
    keys = ablation_keys()
    recs = []
    for g in groups:
        st = g.stats
        if st is None or st.n_models < 2:
            continue
        N = st.n_models
        for n in [k for k in ABLATION_NS if k < N] + [N]:
            if n < N:
                rng = np.random.default_rng([int(seed), g.seed_key, n])
                subsets = np.argsort(rng.random((ABLATION_SUBSETS, N)), axis=1)[:, :n]
            else:
                subsets = np.arange(N)[None]
            res = M.subset_metrics(st, subsets)
            rec: dict[str, Any] = {"group": g.row_name, "source": g.name, "view_id": g.view_id, "n": n,
                                   "n_subsets": subsets.shape[0]}
            for k in keys:  # a pairwise metric the group lacks (no features.npy: CKA) is NaN
                v = res.get(k, np.full(subsets.shape[0], math.nan))
                rec[f"{k}_mean"] = float(v.mean())
                rec[f"{k}_spread"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
            recs.append(rec)
    cols = ["group", "source", "view_id", "n", "n_subsets"] + [f"{k}_{s}" for k in keys for s in ("mean", "spread")]
    return pd.DataFrame(recs, columns=cols)


def families(groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """Single-model groups with >= 2 models (no control) by family, each with its " (key=value)" tag."""
    fams: dict[str, list[Group]] = {}
    for g in groups:
        if g.view_id == "plain" and g.stats is not None and g.stats.n_models >= 2 and g.source_name != CONTROL:
            fams.setdefault(family(g.identity), []).append(g)
    reps = [json.loads(f) for f in fams]
    fam_keys = prune_keys(differing(reps, lambda k: False)) if len(reps) > 1 else []
    out = []
    for fam, gs in fams.items():
        ident = json.loads(fam)
        where = (" (" + ", ".join(f"{k}={fmt_value(ident.get(k, '<unset>'))}" for k in fam_keys) + ")"
                 if fam_keys else "")
        out.append((where, gs))
    return out


def claim1(groups: list[Group], n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Claim 1: does each single source alone give the accuracy SD of all sources together?

    Per family, over its single-source rows (:data:`SINGLE_SOURCES`) and its all-sources row:
    each source's SD ratio to the all-sources row with a bootstrap CI (claim1.csv), and one
    summary line with the equal-variance test over the same groups.
    """
    recs: list[dict[str, Any]] = []
    lines: list[str] = []
    for where, fam in families(groups):
        gs = [g for g in fam if g.source_name in SINGLE_SOURCES or g.source_name == ALL]
        if not gs:
            continue
        mine = _sd_ratios(gs, n_boot, seed)
        recs += mine
        lines.append(_claim1_line(gs, mine, where))
    return pd.DataFrame(recs, columns=claim1_columns()), lines


def _sd_ratios(gs: list[Group], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """claim1.csv rows of one family: each group's acc SD / the all-sources group's, with a 95% CI."""
    m = claim1_metric()
    allg = [g for g in gs if g.source_name == ALL]
    ref = allg[0] if allg else None
    recs = []
    for g in gs:
        if ref is not None and g is not ref:
            r, lo, hi = M.bootstrap_sd_ratio_ci(g.stats.per_model()[m.per_model], ref.stats.per_model()[m.per_model],
                                                n_boot=n_boot, seed=[int(seed), g.seed_key, ref.seed_key])
        else:
            r = lo = hi = math.nan
        recs.append({"group": g.row_name, "reference": ref.row_name if ref else "", "n_models": g.stats.n_models,
                     m.key: g.summary[m.key], "sd_ratio": r, "ci_low": lo, "ci_high": hi})
    return recs


def _claim1_line(gs: list[Group], recs: list[dict[str, Any]], where: str) -> str:
    """The family's summary line: Brown-Forsythe test, then the SD ratios whose CI excludes 1."""
    if len(gs) < 2:
        return f"Claim 1{where}: only one group (single sources, all sources) with >= 2 models; no comparison possible."
    try:
        W, p = M.equal_variance_test([g.stats.per_model()[claim1_metric().per_model] for g in gs])
    except ImportError:
        return f"Claim 1{where}: equal-variance test skipped (scipy is not installed)."
    if not math.isfinite(p):
        verdict = "test undefined (a group has zero spread around its median)"
    elif p >= 0.05:
        verdict = "no evidence at the 5% level that the variances differ"
    else:
        verdict = "the accuracy variances differ at the 5% level"
    ratio_txt = ""
    mine = [x for x in recs if math.isfinite(x["sd_ratio"])]
    if mine:
        outside = [x for x in mine if not (x["ci_low"] <= 1.0 <= x["ci_high"]) and math.isfinite(x["ci_low"])]
        rng = f"{min(x['sd_ratio'] for x in mine):.2f}-{max(x['sd_ratio'] for x in mine):.2f}"
        ratio_txt = (f"; SD / all-sources SD ranges {rng}, "
                     + ("every 95% CI contains 1" if not outside else
                        "95% CI excludes 1 for " + ", ".join(
                            f"{x['group']} ({x['sd_ratio']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}])"
                            for x in outside)))
    return (f"Claim 1{where}: Brown-Forsythe test of equal accuracy variance across {len(gs)} groups "
            f"(single sources and all sources), W={W:.3f}, p={p:.3g}: {verdict}{ratio_txt}.")
