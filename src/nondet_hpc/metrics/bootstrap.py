"""Bootstrap over a group's per-model values: the SE of an SD, the CI of an SD ratio, and the
equal-variance test beside claim 1 (docs/metrics.md, "Per-group metrics" and "Claim 1 test").

Seeded generators (``default_rng(seed)``): the same seed gives the same answer, and values are
drawn in chunks whose stream equals one big draw, so memory stays bounded for 10,000 models.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .formulas import population_sd, sd_rows


def bootstrap_sd_se(values: Any, n_boot: int = 10_000, seed: Any = 0, chunk: int = 2000) -> float:
    """Bootstrap standard error of the population SD (docs/study.md "Metrics").

    Resample the N values with replacement ``n_boot`` times (generator ``default_rng(seed)``, so
    the same seed gives the same answer), take each resample's population SD, and return the SD
    (ddof=1, the usual estimator of a standard error) of those SDs. Exact 0 for equal values.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or n_boot < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    sds = np.empty(n_boot)
    # at most ~2^22 resampled values at once (a few 32 MiB temporaries, 10,000 models or not);
    # consecutive draws give the same stream as one big draw, so the chunk changes no value
    chunk = max(1, min(chunk, 2**22 // v.size))
    for a in range(0, n_boot, chunk):
        b = min(n_boot, a + chunk)
        idx = rng.integers(0, v.size, size=(b - a, v.size))
        sds[a:b] = sd_rows(v[idx])
    return float(sd_rows(sds[None])[0] * math.sqrt(n_boot / (n_boot - 1)))


def bootstrap_sd_ratio_ci(num: Any, den: Any, n_boot: int = 10_000, seed: Any = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """SD(num)/SD(den) with a percentile bootstrap CI; the two samples are resampled independently.

    Used for claim 1: each source's accuracy SD relative to the all-sources group. Returns
    (ratio, low, high); resamples whose denominator SD is 0 give an infinite ratio, kept so that
    the interval honestly widens instead of silently dropping them.
    """
    a = np.asarray(num, dtype=np.float64).ravel()
    b = np.asarray(den, dtype=np.float64).ravel()
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan, math.nan
    sd_b = population_sd(b)
    ratio = population_sd(a) / sd_b if sd_b > 0 else math.inf
    rng = np.random.default_rng(seed)
    ra, rb = _resampled_sds(a, n_boot, rng), _resampled_sds(b, n_boot, rng)  # all of a's draws, then b's
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(rb > 0, ra / np.where(rb > 0, rb, 1.0), np.where(ra > 0, np.inf, np.nan))
    r = r[~np.isnan(r)]
    if r.size == 0:
        return ratio, math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    # order statistics (no interpolation), so infinite resamples cannot produce inf - inf = NaN
    lo, hi = np.quantile(r, [alpha, 1.0 - alpha], method="inverted_cdf")
    return ratio, float(lo), float(hi)


def _resampled_sds(v: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Population SD of n_boot resamples of v, drawn in row chunks of ~2^22 values (same stream)."""
    out = np.empty(n_boot)
    rows = max(1, 2**22 // v.size)
    for a in range(0, n_boot, rows):
        b = min(n_boot, a + rows)
        out[a:b] = sd_rows(v[rng.integers(0, v.size, size=(b - a, v.size))])
    return out


def equal_variance_test(samples: Sequence[Any]) -> tuple[float, float]:
    """Brown-Forsythe test (Levene's test centred on the median) that all samples share a variance.

    Returns (W statistic, p-value); robust to the non-normal accuracy distributions a few
    outlier runs produce. Needs scipy and at least two samples of two or more values.
    """
    from scipy import stats  # local import: only the claim-1 line needs scipy

    groups = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    if len(groups) < 2 or any(g.size < 2 for g in groups):
        raise ValueError("the test needs at least two groups with at least two values each")
    res = stats.levene(*groups, center="median")
    return float(res.statistic), float(res.pvalue)
