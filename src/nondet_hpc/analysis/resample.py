"""Bootstrap over models from a group's pair matrices: every metric of a resampled group, no logits reread.

A resample draws N of the group's N models with replacement. Per-model metrics (accuracy SD,
cross-entropy SD) are the population SDs of the drawn values, exactly as
:func:`nondet_hpc.metrics.bootstrap_sd_se` does. Pairwise means (disagreement, correlation,
2-model ensemble gain) average over the pairs of the resample, leaving out the pairs of a model
with a copy of itself: such a pair compares a model with itself (disagreement 0, correlation 1),
which no pair of the real group does, so keeping it would bias every pairwise mean towards "no
variability". With w_i the times model i was drawn and A a pair matrix with a zero diagonal,

    mean over pairs = (w^T A w) / ((sum w)^2 - sum w^2),

the weighted mean over pairs of distinct models. With every w_i = 1 this is the group's own
value (tests/test_claims.py checks it against :func:`nondet_hpc.metrics.group_summary`). Which
SDs are resampled comes from :mod:`nondet_hpc.registry.metrics`; every pair matrix of the group
(``PairwiseStats.pairs``) is resampled, through the same formula as the group's own value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import metrics as M
from ..registry.metrics import model_sds

CHUNK = 2000  # resamples per matrix product: bounds memory at CHUNK x N floats


def draws(n_models: int, n_boot: int, seed: Any) -> np.ndarray:
    """[n_boot, n_models] model indices drawn with replacement from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n_models, size=(n_boot, n_models))


def resampled(stats: M.PairwiseStats, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every SD of per-model values and every pairwise metric of ``stats`` for each row of ``idx``
    ([B, k] model indices, repeats allowed).

    A resample that drew a single model k times has no pair of distinct models: its pairwise
    metrics are NaN (callers drop them and say how many).
    """
    idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
    B = idx.shape[0]
    N, n = stats.n_models, stats.n_examples
    values = stats.per_model()
    out = {m.key: _sd(values[m.per_model][idx]) for m in model_sds()}
    out.update({key: np.empty(B) for key in stats.pairs})
    c = stats.n_correct.astype(np.float64)
    matrices = {key: p.matrix.astype(np.float64) for key, p in stats.pairs.items()}
    for a in range(0, B, CHUNK):
        b = min(B, a + CHUNK)
        W = np.zeros((b - a, N))
        np.add.at(W, (np.arange(b - a)[:, None], idx[a:b]), 1.0)
        S = W.sum(axis=1)
        pairs = S * S - np.einsum("rn,rn->r", W, W)  # ordered pairs of distinct models
        pairs[pairs <= 0] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            # sum over ordered pairs i != j of (c_i + c_j) / 2 = sum_i w_i c_i (S - w_i)
            solo = np.einsum("rn,n,rn->r", W, c, S[:, None] - W)
            for key, p in stats.pairs.items():
                sums = M.PairSums(np.einsum("rn,rn->r", W @ matrices[key], W), pairs, solo, n)
                out[key][a:b] = (p.resampled or p.value)(sums)
    return out


def _sd(values: np.ndarray) -> np.ndarray:
    """Population SD of each row (ddof=0), an exact 0 for equal values."""
    centred = values - values.mean(axis=1, keepdims=True)
    return np.sqrt(np.mean(centred * centred, axis=1))


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite-or-infinite resample values (NaN ones dropped).

    Order statistics (no interpolation), so infinite resamples (a zero denominator) widen the
    interval instead of producing inf - inf = NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size < 2:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap_se(values: np.ndarray) -> float:
    """SD (ddof=1) of the finite resample values: the bootstrap standard error."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per resample: +inf where only the denominator is 0, NaN where both are."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, np.nan))
