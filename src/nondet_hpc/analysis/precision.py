"""The precision model of the planner: how the bootstrap SE of an SD (and the CI of an SD ratio)
shrinks with N, and how uncertain a prediction from a pilot is. Pure numpy/scipy, no I/O.

The derivation is in docs/experiments/planning.md and in the docstring of
:mod:`nondet_hpc.analysis.planning`, which reads sweeps and prints plans with these functions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from .. import metrics as M

RATIO_LEVEL = 0.95  # the level of the claim-1 interval the reducer prints (report/claim1.csv)
MIN_MODELS = 5  # fewer models give an SE whose own uncertainty makes any prediction meaningless


def needed_n(n_now: float, now: float, target: float) -> float:
    """The 1/sqrt(N) law solved for N: ``n_now * (now / target)**2`` (not rounded)."""
    return float(n_now) * (float(now) / float(target)) ** 2


def _ceil_n(x: float) -> float:
    # an N is a whole number of models, and 2 is the least an SD needs
    return float(max(2, math.ceil(x - 1e-9))) if math.isfinite(x) else math.inf


# --------------------------------------------------------------------------------------------
# the double bootstrap


def _sd(x: np.ndarray) -> np.ndarray:
    """Population SD over the last axis (the reducer's SD; exact ties give exact 0 here too)."""
    d = x - x[..., :1]
    return np.sqrt(np.mean((d - d.mean(axis=-1, keepdims=True)) ** 2, axis=-1))


def se_star(values: Any, *, n_outer: int = 500, n_inner: int = 200, seed: Any = 0,
            max_elems: int = 2_000_000) -> np.ndarray:
    """Bootstrap SE of the SD, recomputed on ``n_outer`` resamples of ``values`` (inner: ``n_inner``).

    This is the sampling distribution of "SE now" as the bootstrap sees it. Memory stays near
    ``max_elems`` float64s whatever N is (the outer resamples are done in chunks).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    rng = np.random.default_rng(seed)
    out = np.empty(n_outer)
    chunk = max(1, max_elems // max(1, n_inner * n))
    for a in range(0, n_outer, chunk):
        b = min(n_outer, a + chunk)
        outer = v[rng.integers(0, n, size=(b - a, n))]
        inner = rng.integers(0, n, size=(b - a, n_inner, n))
        resampled = np.take_along_axis(outer[:, None, :], inner, axis=2)
        out[a:b] = _sd(resampled).std(axis=1, ddof=1)
    return out


def _ratio_hw(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Half-width of the percentile CI of SD(a*)/SD(b*) for each row of resampled a and b."""
    ra = _sd(np.take_along_axis(a[:, None, :], ia, axis=2))
    rb = _sd(np.take_along_axis(b[:, None, :], ib, axis=2))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(rb > 0, ra / np.where(rb > 0, rb, 1.0), np.inf)  # a zero denominator widens, as in metrics
    alpha = (1 - RATIO_LEVEL) / 2
    lo, hi = np.quantile(r, [alpha, 1 - alpha], axis=1, method="inverted_cdf")
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(hi), (hi - lo) / 2, np.inf)


def _ratio_star(num: np.ndarray, den: np.ndarray, *, n_outer: int, n_inner: int, seed: Any,
                max_elems: int = 2_000_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    na, nb = num.size, den.size
    out = np.empty(n_outer)
    chunk = max(1, max_elems // max(1, n_inner * max(na, nb)))
    for s in range(0, n_outer, chunk):
        e = min(n_outer, s + chunk)
        a = num[rng.integers(0, na, size=(e - s, na))]
        b = den[rng.integers(0, nb, size=(e - s, nb))]
        out[s:e] = _ratio_hw(a, b, rng.integers(0, na, size=(e - s, n_inner, na)),
                             rng.integers(0, nb, size=(e - s, n_inner, nb)))
    return out


def _interval(now: float, star: np.ndarray, level: float, df: int) -> tuple[float, float, float]:
    """(bias-corrected value, low, high) of a positive precision measure, on the log scale.

    Centre: ``2 log(now) - median(log star)`` removes the bootstrap's estimate of its own bias
    (small samples give SEs that are too small, and resamples of them smaller still). Width: the
    spread of log(star), measured robustly (interquartile range / 1.349, the SD for a normal
    distribution), times a t quantile with N - 1 degrees of freedom, which widens the interval for
    tiny pilots, where the bootstrap underestimates its own variability. Quartiles, not mean and SD,
    so that a few degenerate resamples (an SE of 0, or an infinite ratio when a resampled all-sources
    SD is 0) neither poison the estimate nor are silently dropped.
    """
    if not (math.isfinite(now) and now > 0):
        return now, math.nan, math.nan
    with np.errstate(divide="ignore"):
        logs = np.log(np.asarray(star, dtype=np.float64))
    q1, med, q3 = np.quantile(logs, [0.25, 0.5, 0.75], method="inverted_cdf")
    if not (np.isfinite(q1) and np.isfinite(q3)):  # over a quarter of resamples degenerate: no interval
        return now, math.nan, math.inf
    centre = 2 * math.log(now) - float(med)
    w = float(q3 - q1) / 1.349
    q = float(stats.t.ppf(0.5 + level / 2, max(1, df)))
    return math.exp(centre), math.exp(centre - q * w), math.exp(centre + q * w)


# --------------------------------------------------------------------------------------------
# one group, one target


def _result(n_now: int, now: float, target: float, n_eff: float, centre: float, lo: float, hi: float,
            level: float) -> dict[str, Any]:
    exact_zero = now == 0.0
    raw = needed_n(n_eff, now, target)
    return {
        "n_now": int(n_now), "now": float(now), "target": float(target), "met": bool(now <= target),
        "n_needed": 2.0 if exact_zero else _ceil_n(raw), "n_needed_raw": raw,
        "n_low": 2.0 if exact_zero else (_ceil_n(needed_n(n_eff, lo, target)) if math.isfinite(lo) else math.nan),
        "n_high": 2.0 if exact_zero else (_ceil_n(needed_n(n_eff, hi, target)) if not math.isnan(hi) else math.nan),
        "n_needed_bias_corrected": 2.0 if exact_zero else (_ceil_n(needed_n(n_eff, centre, target))
                                                           if math.isfinite(centre) else math.nan),
        "now_bias_corrected": centre, "now_low": lo, "now_high": hi, "level": level,
        "note": ("SD exactly 0 (bit-identical models): any N meets the target" if exact_zero else ""),
    }


def plan_sd_se(values: Any, target: float, *, n_boot: int = 10_000, seed: Any = 0, level: float = 0.9,
               n_outer: int = 500, n_inner: int = 200) -> dict[str, Any]:
    """The SE target for one group's per-model values: SE now, N needed and its ``level`` interval."""
    v = np.asarray(values, dtype=np.float64).ravel()
    now = M.bootstrap_sd_se(v, n_boot=n_boot, seed=seed)
    if now == 0.0 or v.size < 2:
        return _result(v.size, now, target, v.size, now, now, now, level)
    star = se_star(v, n_outer=n_outer, n_inner=n_inner, seed=[*np.atleast_1d(seed).tolist(), 77])
    centre, lo, hi = _interval(now, star, level, v.size - 1)
    return _result(v.size, now, target, v.size, centre, lo, hi, level)


def plan_ratio(num: Any, den: Any, target: float, *, n_boot: int = 10_000, seed: Any = 0, level: float = 0.9,
               n_outer: int = 500, n_inner: int = 200) -> dict[str, Any]:
    """The claim target: half-width of the 95% CI of SD(num)/SD(den), and the common N both groups need.

    With N_a != N_b the half-width's square is ``c_a/N_a + c_b/N_b``; each c is estimated from
    that group's relative SE (SE/SD)^2 * N, and the N' at which both groups reach the target is
    ``N_eff * (hw/target)^2`` with ``N_eff = (c_a + c_b) / (c_a/N_a + c_b/N_b)`` (= N when equal).
    """
    a = np.asarray(num, dtype=np.float64).ravel()
    b = np.asarray(den, dtype=np.float64).ravel()
    ratio, lo95, hi95 = M.bootstrap_sd_ratio_ci(a, b, n_boot=n_boot, seed=seed, level=RATIO_LEVEL)
    now = (hi95 - lo95) / 2 if math.isfinite(hi95) and math.isfinite(lo95) else math.inf
    ra = [M.bootstrap_sd_se(x, n_boot=2000, seed=seed) / max(M.population_sd(x), 1e-300) for x in (a, b)]
    ca, cb = ra[0] ** 2 * a.size, ra[1] ** 2 * b.size
    n_eff = (ca + cb) / (ca / a.size + cb / b.size) if ca + cb > 0 else float(min(a.size, b.size))
    if not math.isfinite(now):
        res = _result(min(a.size, b.size), now, target, n_eff, now, math.nan, math.inf, level)
        res["note"] = "the all-sources SD can be 0 in a resample: interval unbounded, N cannot be predicted"
        res["n_needed"] = res["n_low"] = res["n_high"] = math.inf
    else:
        star = _ratio_star(a, b, n_outer=n_outer, n_inner=n_inner, seed=[*np.atleast_1d(seed).tolist(), 78])
        centre, lo, hi = _interval(now, star, level, min(a.size, b.size) - 1)
        res = _result(min(a.size, b.size), now, target, n_eff, centre, lo, hi, level)
    res.update({"ratio": ratio, "ci_low": lo95, "ci_high": hi95, "n_eff": n_eff})
    return res


def subsample_check(values: Any, n: int, *, n_subsets: int = 20, n_boot: int = 2000, seed: Any = 0,
                    level: float = 0.9, n_outer: int = 300, n_inner: int = 150) -> dict[str, Any]:
    """Predict the SE at N = len(values) from random n-subsets and compare with the SE all N give.

    Returns the SE at N, the median predicted SE at N (plain law), and the share of subsets whose
    interval of the predicted SE at N covers the SE at N. The subsets overlap (they come from one
    set of N models), so the spread of the predictions understates that of independent pilots.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    N = v.size
    if not (2 <= n < N):
        raise ValueError(f"subsample size must be between 2 and N - 1 = {N - 1}, got {n}")
    full = M.bootstrap_sd_se(v, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 79])
    preds, covered = [], 0
    f = math.sqrt(n / N)  # SE at N from SE at n, by the 1/sqrt(N) law
    for k in range(n_subsets):
        sub = v[rng.permutation(N)[:n]]
        se = M.bootstrap_sd_se(sub, n_boot=n_boot, seed=[k, 1])
        star = se_star(sub, n_outer=n_outer, n_inner=n_inner, seed=[k, 2])
        _, lo, hi = _interval(se, star, level, n - 1)
        preds.append(se * f)
        covered += int(lo * f <= full <= hi * f) if math.isfinite(lo) else 0
    preds_a = np.array(preds)
    return {"n": int(n), "N": int(N), "n_subsets": int(n_subsets), "se_at_N": full,
            "predicted_median": float(np.median(preds_a)), "predicted_low": float(np.quantile(preds_a, 0.05)),
            "predicted_high": float(np.quantile(preds_a, 0.95)), "coverage": covered / n_subsets, "level": level}
