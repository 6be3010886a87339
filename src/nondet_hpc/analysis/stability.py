"""When does training become stable? The final divergence of runs perturbed at epoch k, against k.

For a perturbed source (the bit change, or a new data order from epoch k on) and each k, the runs
of the group (source, k) end at different models. Their *divergence* is a mean over pairs of
runs of a pairwise quantity: probe (or test) disagreement, relative parameter distance, loss or
error barrier (sweep/barriers.py). This module takes those pairwise values as arrays and gives:

- the mean over pairs at every k, with a bootstrap interval over runs: a resample draws the N
  runs of the group with replacement (w_i = times run i was drawn) and averages the measured
  pairs of distinct runs with weight w_i w_j (a pair of a run with a copy of itself is not a pair;
  the convention of :mod:`.resample`). With every pair measured this is
  ``w^T A w / ((sum w)^2 - sum w^2)``; barriers are measured for some pairs only, and the same
  formula runs over those;
- the ratio to the k = 0 value (resampled independently: other runs), with its interval;
- **stable after**: the first k > 0 whose mean divergence is below ``fraction`` times the k = 0
  value (None: at no k), the same rule on every resample giving its interval (percentiles of
  the first k in the order of the k's, "never" counted as beyond the largest k), and whether the
  divergence stays below the line at every larger k.

Array-only: the reducer (or a test) builds :class:`PairValues` from its matrices and records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ..sweep.parents import row_label  # noqa: F401 - the rows' names, here for the report's readers
from .resample import draws, percentile_ci, ratio

DEFAULT_FRACTION = 0.5
METRICS = {  # key -> (panel title, unit)
    "disagreement": ("disagreement", "%"),
    "distance": ("parameter distance", "% of norm"),
    "barrier_loss": ("loss barrier", "nats"),
    "barrier_error": ("error barrier", "pp"),
}


class StabilityError(ValueError):
    """Inputs the analysis cannot use (no k = 0 group, bad pair indices): the message says which."""


@dataclass(frozen=True)
class PairValues:
    """A pairwise quantity of one group: ``n_runs`` runs, the measured pairs (i[p], j[p]) of
    distinct runs and their values."""

    n_runs: int
    i: np.ndarray
    j: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        i, j, v = (np.asarray(x) for x in (self.i, self.j, self.value))
        if not (i.shape == j.shape == v.shape and i.ndim == 1):
            raise StabilityError("pair indices and values must be 1-D arrays of one length")
        if i.size and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= self.n_runs or np.any(i == j)):
            raise StabilityError(f"pairs must join two distinct runs among 0..{self.n_runs - 1}")

    @classmethod
    def from_matrix(cls, matrix: Any) -> "PairValues":
        """Every pair i < j of a symmetric [N, N] matrix (its diagonal is not used)."""
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise StabilityError(f"a pair matrix is square, got {m.shape}")
        i, j = np.triu_indices(m.shape[0], k=1)
        return cls(m.shape[0], i, j, m[i, j])

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str, float]]) -> "PairValues":
        """Pairs named by run id (a barrier record per pair); runs are those the pairs name."""
        rows = [(str(a), str(b), float(v)) for a, b, v in pairs if a != b]
        ids = sorted({r for a, b, _ in rows for r in (a, b)})
        pos = {r: n for n, r in enumerate(ids)}
        return cls(len(ids), np.array([pos[a] for a, _, _ in rows], dtype=np.int64),
                   np.array([pos[b] for _, b, _ in rows], dtype=np.int64),
                   np.array([v for _, _, v in rows], dtype=np.float64))

    @property
    def n_pairs(self) -> int:
        return int(np.asarray(self.value).size)

    def mean(self) -> float:
        return float(np.mean(self.value)) if self.n_pairs else math.nan

    def resampled_means(self, idx: np.ndarray) -> np.ndarray:
        """float64 [B]: the weighted pair mean of each resample (rows of ``idx``: run indices drawn);
        NaN where no measured pair of distinct runs was drawn."""
        idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
        w = np.zeros((idx.shape[0], self.n_runs))
        np.add.at(w, (np.arange(idx.shape[0])[:, None], idx), 1.0)
        pw = w[:, np.asarray(self.i)] * w[:, np.asarray(self.j)]  # [B, P]
        total = pw.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (pw @ np.asarray(self.value, dtype=np.float64)) / total
        out[total <= 0] = np.nan
        return out


def stable_after(ks: Sequence[int], means: Sequence[float], fraction: float = DEFAULT_FRACTION) -> Optional[int]:
    """The first k > 0 (in increasing order) whose mean is below ``fraction`` x the k = 0 mean."""
    k, m = _sorted(ks, means)
    ref = m[0]
    if not np.isfinite(ref) or ref <= 0:
        return None
    below = np.nonzero((k > 0) & (m < fraction * ref))[0]
    return int(k[below[0]]) if below.size else None


def _sorted(ks: Sequence[int], means: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    k, m = np.asarray(ks, dtype=np.int64), np.asarray(means, dtype=np.float64)
    order = np.argsort(k)
    k, m = k[order], m[order]
    if k.size == 0 or k[0] != 0:
        raise StabilityError(f"the divergence at k = 0 (the perturbation at the start) is needed; k given: "
                             f"{k.tolist()}")
    return k, m


def _first_index(k: np.ndarray, m: np.ndarray, fraction: float) -> np.ndarray:
    """[B]: per resample (columns of m: k in order), the index of the first k > 0 below the line;
    len(k) where none is (or the k = 0 value is not positive)."""
    ref = m[:, :1]
    below = (m < fraction * ref) & (k[None, :] > 0) & (ref > 0)
    return np.where(below.any(axis=1), np.argmax(below, axis=1), len(k))


@dataclass
class Curve:
    """One (source, metric): the table rows and the stable-after result."""

    rows: pd.DataFrame
    stable_k: Optional[int]
    stable_lo: Optional[int]
    stable_hi: Optional[int]  # None: "never" is inside the interval
    never_share: float  # share of resamples where the divergence never falls below the line
    stays_below: Optional[bool]


def stability_curve(points: Mapping[int, PairValues], *, fraction: float = DEFAULT_FRACTION, n_boot: int = 2000,
                    seed: Any = 0, level: float = 0.95) -> Curve:
    """The divergence against k for one source and metric (``points[k]``: the group perturbed at k)."""
    if not 0 < fraction < 1:
        raise StabilityError(f"fraction={fraction}: the stated fraction of the k = 0 value must be in (0, 1)")
    ks = sorted(int(k) for k in points)
    k = np.array(ks, dtype=np.int64)
    means = np.array([points[x].mean() for x in ks])
    _sorted(ks, means)
    seed = list(np.atleast_1d(seed).tolist())
    boot = np.column_stack([points[x].resampled_means(draws(points[x].n_runs, n_boot, seed + [x]))
                            if points[x].n_runs else np.full(n_boot, np.nan) for x in ks])  # [B, K]
    rows = []
    for c, x in enumerate(ks):
        lo, hi = percentile_ci(boot[:, c], level)
        r = ratio(boot[:, c], boot[:, 0])
        rlo, rhi = percentile_ci(r, level)
        rows.append({"k": x, "n_runs": points[x].n_runs, "n_pairs": points[x].n_pairs, "mean": means[c],
                     "ci_lo": lo, "ci_hi": hi, "ratio": float(ratio(means[c:c + 1], means[:1])[0]),
                     "ratio_lo": rlo, "ratio_hi": rhi})
    point = stable_after(ks, means, fraction)
    valid = ~np.isnan(boot).any(axis=1)
    first = _first_index(k, boot[valid], fraction)
    lo_hi = (np.quantile(first, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
             if first.size else [len(k), len(k)])
    as_k = [int(k[int(q)]) if int(q) < len(k) else None for q in lo_hi]
    stays = None if point is None else bool(np.all(means[k >= point] < fraction * means[0]))
    return Curve(pd.DataFrame(rows), point, as_k[0], as_k[1],
                 float(np.mean(first == len(k))) if first.size else math.nan, stays)


def barrier_values(records: Iterable[Any], fingerprints: Optional[Mapping[str, str]] = None
                   ) -> dict[str, dict[str, PairValues]]:
    """``{group_key: {"barrier_loss": PairValues, "barrier_error": PairValues}}`` from the pair
    records of a sweep (sweep/barriers.py ``read_sweep``); a run paired with itself is no pair.

    ``fingerprints`` (run id -> its weights' fingerprint now): records of other weights (a run
    retrained since, or gone) are left out."""
    by_group: dict[str, list[Any]] = {}
    for r in records:
        a, b = r.runs
        if fingerprints is not None and [fingerprints.get(a), fingerprints.get(b)] != list(r.data["fingerprints"]):
            continue
        if a != b:
            by_group.setdefault(r.group_key, []).append(r)
    return {g: {m: PairValues.from_pairs((r.runs[0], r.runs[1], float(r.data[m])) for r in rs)
                for m in ("barrier_loss", "barrier_error")} for g, rs in sorted(by_group.items())}


def barrier_columns(records: Iterable[Any], *, fingerprints: Optional[Mapping[str, str]] = None, n_boot: int = 2000,
                    seed: Any = 0, level: float = 0.95) -> pd.DataFrame:
    """The group table's barrier columns, one row per group key: pairs, runs, the mean loss and
    error barrier and their bootstrap intervals over runs (empty when nothing was measured)."""
    rows = []
    for n, (g, values) in enumerate(barrier_values(records, fingerprints).items()):
        row: dict[str, Any] = {"group_key": g, "barrier_pairs": values["barrier_loss"].n_pairs,
                               "barrier_runs": values["barrier_loss"].n_runs}
        for m, pv in values.items():
            boot = pv.resampled_means(draws(pv.n_runs, n_boot, list(np.atleast_1d(seed)) + [n]))
            row[m], (row[f"{m}_lo"], row[f"{m}_hi"]) = pv.mean(), percentile_ci(boot, level)
        rows.append(row)
    return pd.DataFrame(rows)


def stability_table(data: Mapping[tuple[str, str], Mapping[int, PairValues]], *, fraction: float = DEFAULT_FRACTION,
                    n_boot: int = 2000, seed: Any = 0, level: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every (source, metric, k) row, one summary row per (source, metric)) for ``data[(source,
    metric)][k]``; each curve's bootstrap is seeded by ``seed`` and its position in ``data``."""
    rows, summary = [], []
    for n, ((source, metric), points) in enumerate(sorted(data.items())):
        c = stability_curve(points, fraction=fraction, n_boot=n_boot, seed=list(np.atleast_1d(seed)) + [n],
                            level=level)
        rows.append(c.rows.assign(source=source, metric=metric))
        summary.append({"source": source, "metric": metric, "fraction": fraction, "stable_after": c.stable_k,
                        "stable_lo": c.stable_lo, "stable_hi": c.stable_hi, "never_share": c.never_share,
                        "stays_below": c.stays_below, "k0_mean": float(c.rows["mean"].iloc[0])})
    cols = ["source", "metric", "k", "n_runs", "n_pairs", "mean", "ci_lo", "ci_hi", "ratio", "ratio_lo", "ratio_hi"]
    table = pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)
    return table, pd.DataFrame(summary)


def stability_png(table: pd.DataFrame, summary: pd.DataFrame) -> bytes | None:
    """One panel per metric: mean divergence against k (symmetric-log axis, so k = 0 is on it),
    one line per source with its bootstrap interval, the line at fraction x the k = 0 value
    (dashed) and the stable-after k (a ring)."""
    from matplotlib.figure import Figure

    from .plots import _png

    if table.empty:
        return None
    metrics = [m for m in METRICS if m in set(table["metric"])] + \
        sorted(set(table["metric"]) - set(METRICS))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for source, t in table[table["metric"] == metric].groupby("source", sort=True):
            t = t.sort_values("k")
            err = np.vstack([t["mean"] - t["ci_lo"], t["ci_hi"] - t["mean"]]).clip(min=0)
            line = ax.errorbar(t["k"], t["mean"], yerr=np.nan_to_num(err), marker="o", ms=3, capsize=2,
                               label=source)
            s = summary[(summary["source"] == source) & (summary["metric"] == metric)]
            if not s.empty:
                ax.axhline(float(s["fraction"].iloc[0]) * float(s["k0_mean"].iloc[0]), ls="--", lw=0.8,
                           color=line[0].get_color())
                k = s["stable_after"].iloc[0]
                if k is not None and not pd.isna(k):
                    y = float(t.loc[t["k"] == k, "mean"].iloc[0])
                    ax.plot([k], [y], marker="o", ms=10, mfc="none", color=line[0].get_color())
        title, unit = METRICS.get(metric, (metric, ""))
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("perturbed at epoch k")
        ax.set_title(title + (f" ({unit})" if unit else ""))
        ax.legend(fontsize=7)
    return _png(fig)
