"""Report figures (PNG, matplotlib's Agg canvas; no pyplot, so no global backend state).

Every function takes the reducer's DataFrames and returns PNG bytes, or None when there is
nothing to draw; the reducer writes the bytes atomically. Which metrics are drawn, and their
titles, come from :mod:`nondet_hpc.registry.metrics`.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..registry.metrics import METRICS, PAIRWISE, Metric, model_sds

_MPL = tuple(int(p) for p in matplotlib.__version__.split(".")[:2] if p.isdigit())

__all__ = ["group_metrics_png", "sd_vs_n_png", "accuracy_spread_png", "claim1_png", "reduction_png"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _finite(values: Sequence[float]) -> bool:
    return any(v is not None and np.isfinite(v) for v in values)


def _title(m: Metric) -> str:
    """A panel's title: the metric's label and unit; a similarity is drawn as 1 - value."""
    return ("1 - " if m.similarity else "") + m.label + (f" ({m.unit})" if m.unit else "")


def group_metrics_png(df: pd.DataFrame) -> bytes | None:
    """One horizontal bar panel per metric, one bar per row of the table, bootstrap SE as error bars.

    The panels: the SDs of per-model values and the pairwise metrics. A metric drawn ``beside``
    another marks its panel (the accuracy-SD panel: the SD test-set sampling alone would give).
    """
    rows = df[df["n_models"] >= 2]
    if rows.empty:
        return None
    names = list(rows["group"])
    y = np.arange(len(names))
    panels = [m for m in METRICS.values() if (m.se is not None or m.kind == PAIRWISE) and _finite(rows[m.key])]
    fig = Figure(figsize=(3.2 * len(panels) + 2.5, 0.32 * len(names) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, m in zip(axes, panels):
        vals = rows[m.key].to_numpy(dtype=float)
        if m.similarity:
            # correlations sit at 0.99..1; their distance from 1 is what differs between groups
            vals = 1.0 - vals
        xerr = rows[m.se].to_numpy(dtype=float) if m.se else None
        ax.barh(y, np.nan_to_num(vals), xerr=None if xerr is None else np.nan_to_num(xerr),
                color="#4C72B0", ecolor="black", capsize=2)
        for mark in (r for r in METRICS.values() if r.beside == m.key and r.key in rows):
            ax.scatter(rows[mark.key].to_numpy(dtype=float), y, marker="D", color="#DD8452", s=14,
                       zorder=3, label=mark.label)
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(_title(m), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Variability per group (error bars: bootstrap SE)", fontsize=10)
    return _png(fig)


def sd_vs_n_png(ablation: pd.DataFrame) -> bytes | None:
    """Accuracy SD and CE SD against the number of models, mean +/- spread over random subsets."""
    if ablation.empty:
        return None
    plain = ablation[ablation["view_id"] == "plain"]
    data = plain if plain["group"].nunique() > 0 else ablation
    data = data[data.groupby("group")["n"].transform("nunique") > 1]
    if data.empty:
        return None
    fig = Figure(figsize=(11, 4.2))
    sds = model_sds()
    axes = fig.subplots(1, len(sds))
    for ax, m in zip(axes, sds):
        for name, g in data.groupby("group", sort=False):
            g = g.sort_values("n")
            ax.errorbar(g["n"], g[f"{m.key}_mean"], yerr=g[f"{m.key}_spread"], marker="o", ms=3, capsize=3,
                        label=name)
        ax.set_xlabel("number of models N (random subsets of the runs)")
        ax.set_title(_title(m), fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("N-models ablation: mean and SD over subsamples", fontsize=10)
    return _png(fig)


def accuracy_spread_png(per_model: pd.DataFrame) -> bytes | None:
    """Every model's accuracy, one strip per single-model group, with a box for the quartiles."""
    data = per_model[per_model["view_id"] == "plain"]
    if data.empty:
        return None
    names = list(dict.fromkeys(data["group"]))
    fig = Figure(figsize=(8, 0.4 * len(names) + 1.5))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    series = [data.loc[data["group"] == n, "acc"].to_numpy(dtype=float) for n in names]
    # matplotlib >= 3.10 spells it orientation=, older versions vert= (deprecated since 3.11)
    horizontal = {"orientation": "horizontal"} if _MPL >= (3, 10) else {"vert": False}
    ax.boxplot(series, widths=0.6, showfliers=False, **horizontal)
    for k, s in enumerate(series):
        ax.scatter(s, k + 1 + rng.uniform(-0.18, 0.18, size=s.size), s=6, alpha=0.6, color="#4C72B0")
    ax.set_yticks(np.arange(1, len(names) + 1))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Accuracy of every model (single model, plain view)", fontsize=10)
    return _png(fig)


def claim1_png(claim1: pd.DataFrame) -> bytes | None:
    """Forest plot: each source's accuracy SD / all-sources SD with its bootstrap 95% CI."""
    if claim1.empty or not _finite(claim1["sd_ratio"]):
        return None
    data = claim1[np.isfinite(claim1["sd_ratio"].to_numpy(dtype=float))]
    labels = list(data["group"])
    y = np.arange(len(labels))
    r = data["sd_ratio"].to_numpy(dtype=float)
    lo = data["ci_low"].to_numpy(dtype=float)
    hi = data["ci_high"].to_numpy(dtype=float)
    finite_hi = np.where(np.isfinite(hi), hi, np.nan)
    cap = np.nanmax(np.concatenate([r, finite_hi, [1.5]])) * 1.1
    hi = np.where(np.isfinite(hi), hi, cap)
    fig = Figure(figsize=(7, 0.4 * len(labels) + 1.5))
    ax = fig.subplots()
    ax.errorbar(r, y, xerr=[np.clip(r - lo, 0, None), np.clip(hi - r, 0, None)], fmt="o", capsize=3)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy SD relative to all sources (95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Claim 1: does each source alone give the variability of all sources?", fontsize=10)
    return _png(fig)


def reduction_png(df: pd.DataFrame) -> bytes | None:
    """Variability reduction (%) of every row that has a baseline."""
    data = df[np.isfinite(df["reduction_pct"].to_numpy(dtype=float))]
    data = data[data["group"] != data["baseline"]]
    if data.empty:
        return None
    y = np.arange(len(data))
    vals = data["reduction_pct"].to_numpy(dtype=float)
    fig = Figure(figsize=(7, 0.35 * len(data) + 1.5))
    ax = fig.subplots()
    ax.barh(y, vals, color=np.where(vals >= 0, "#55A868", "#C44E52"))
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(list(data["group"]), fontsize=8)
    ax.invert_yaxis()
    formula = str(data["formula"].iloc[0]) if "formula" in data else ""
    ax.set_xlabel(f"variability reduction vs baseline (%), {formula} formula")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Variability reduction against each row's baseline (see the baseline column)", fontsize=10)
    return _png(fig)
