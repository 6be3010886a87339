"""Variability metrics of the study, as pure functions on arrays (docs/study.md, "Metrics").

One file holds every formula so there is one place to check them against the paper; the formulas
are written out in docs/metrics.md. Units are the ones the tables print:

=================  ==========================================================================
accuracy           percent (``100 * correct / n_test``)
accuracy SD        percentage points, population SD (ddof=0) over models
CE SD              nats, population SD over models of the mean test cross-entropy
disagreement       percent of test examples, mean over pairs i<j
correlation        Pearson r of the flattened logits, mean over pairs i<j
ensemble delta     percentage points: acc(argmax(l_i + l_j)) - (acc_i + acc_j)/2, mean over pairs
CKA                linear CKA of penultimate features, mean over pairs
test-set SD        percentage points (see :func:`testset_sd`)
variability        percent (mean over the five metrics of a relative reduction)
reduction
=================  ==========================================================================

Exactness: a group of bit-identical models (the determinism control) must give exactly 0 SDs,
0 disagreement, 0 ensemble delta and correlation/CKA exactly 1. That holds by construction here:
counts are integers, SDs are computed on values shifted by their first element (identical values
become exact zeros), and pairs whose arrays have the same digest get correlation (and CKA)
exactly 1.0 instead of a floating-point dot product that may round to 0.9999999999999998.

Memory: pairwise functions take a *sequence* of per-model ``[n_test, n_classes]`` arrays (a
stacked ``[N, n, c]`` array works too, and so do ``numpy.load(..., mmap_mode="r")`` memmaps or
any object with ``.shape``, ``.dtype`` and row slicing). They read the models in blocks of test
examples, so memory is about ``block_bytes`` plus O(N^2 + N * n_test) whatever N is.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

__all__ = [
    "REDUCTION_KEYS",
    "FORMULAS",
    "ModelSummary",
    "PairwiseStats",
    "NonFiniteLogits",
    "accuracy",
    "cross_entropy",
    "population_sd",
    "bootstrap_sd_se",
    "bootstrap_sd_ratio_ci",
    "equal_variance_test",
    "summarize_model",
    "pairwise_stats",
    "progress_line",
    "pairwise_cka_matrix",
    "group_summary",
    "subset_metrics",
    "pairwise_disagreement",
    "pairwise_correlation",
    "ensemble_delta",
    "linear_cka",
    "pairwise_cka",
    "testset_sd",
    "reduction_terms",
    "variability_reduction",
    "array_digest",
]

REDUCTION_KEYS: tuple[str, ...] = ("acc_sd", "ce_sd", "disagreement", "correlation", "ensemble_delta")
FORMULAS: tuple[str, ...] = ("paper", "report")
DEFAULT_BLOCK_BYTES = 64 * 2**20


class ArrayLike2D(Protocol):
    """What the pairwise functions need of one model's logits: shape, dtype and row slicing."""

    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, key: Any) -> Any: ...


class NonFiniteLogits(ValueError):
    """A model's logits contain NaN or inf: the run diverged and cannot be measured."""


# --------------------------------------------------------------------------------------------
# helpers


def array_digest(x: Any, block_rows: int = 65536) -> bytes:
    """BLAKE2b digest of an array's shape, dtype and bytes; equal digests mean identical arrays.

    Read in row blocks so a memmapped array is never copied whole.
    """
    shape = tuple(int(s) for s in x.shape)
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((shape, np.dtype(x.dtype).str)).encode())
    for a in range(0, shape[0] if shape else 1, block_rows):
        h.update(np.ascontiguousarray(x[a:a + block_rows]).tobytes())
    return h.digest()


def _blas_threads(n: int | None) -> contextlib.AbstractContextManager:
    """Limit BLAS threads for the enclosed matrix products (no-op without threadpoolctl).

    The products here are a few tens of milliseconds on one core; a multi-threaded OpenBLAS
    whose second thread has to share a busy core (a training job beside the reducer) can take
    100x longer, spinning while it waits. One thread is the predictable choice.
    """
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn, a dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _rows(x: Any, a: int, b: int, dtype: Any) -> np.ndarray:
    return np.asarray(x[a:b], dtype=dtype)


def _sd_rows(values: np.ndarray) -> np.ndarray:
    """Population SD (ddof=0) of each row, exact 0 for a row of identical values.

    Shifting each row by its first element changes no SD mathematically, but turns a row of equal
    values into exact zeros, whose mean and spread are then exactly 0 in floating point too.
    """
    v = np.asarray(values, dtype=np.float64)
    d = v - v[:, :1]
    m = d.mean(axis=1, keepdims=True)
    return np.sqrt(np.mean((d - m) ** 2, axis=1))


def _check_labels(labels: Any, n: int, c: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels have shape {y.shape}, expected ({n},) to match the logits")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# one model


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy in percent; ties in the argmax go to the lowest class index (numpy)."""
    x = np.asarray(logits)
    y = _check_labels(labels, x.shape[0], x.shape[1])
    return 100.0 * int(np.count_nonzero(x.argmax(axis=1) == y)) / x.shape[0]


def cross_entropy(logits: Any, labels: Any) -> float:
    """Mean cross-entropy (nats) of softmax(logits) against the labels, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    y = _check_labels(labels, x.shape[0], x.shape[1])
    return float(np.mean(_logsumexp(x) - x[np.arange(x.shape[0]), y]))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1))


@dataclass(frozen=True)
class ModelSummary:
    """What one pass over one model's logits yields; computed once, reused by every metric.

    ``mean``/``norm`` are the mean of all n*c logits and the root of their summed squared
    deviations (so a standardized model is ``(x - mean) / norm``, unit length).
    """

    n_correct: int
    correct: np.ndarray  # bool [n]
    pred: np.ndarray  # int [n]
    ce: float
    mean: float
    norm: float
    digest: bytes


def summarize_model(logits: Any, labels: Any) -> ModelSummary:
    """One model's accuracy, CE, predictions and standardization constants.

    Raises :class:`NonFiniteLogits` if any logit is NaN or inf and ``ValueError`` on bad shapes.
    """
    shape = tuple(logits.shape)
    if len(shape) != 2:
        raise ValueError(f"logits must be 2-D [n_test, n_classes], got shape {shape}")
    if not np.issubdtype(np.dtype(logits.dtype), np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    n, c = shape
    y = _check_labels(labels, n, c)
    x = np.asarray(logits[:], dtype=np.float64)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise NonFiniteLogits(f"{bad} of {x.size} logits are NaN or infinite")
    pred = x.argmax(axis=1).astype(np.int32 if c > 32767 else np.int16)
    correct = pred == y
    ce = float(np.mean(_logsumexp(x) - x[np.arange(n), y]))
    mean = float(x.mean())
    norm = float(np.sqrt(np.sum((x - mean) ** 2)))
    return ModelSummary(int(np.count_nonzero(correct)), correct, pred, ce, mean, norm, array_digest(logits))


def population_sd(values: Any) -> float:
    """Population standard deviation (ddof=0), as docs/study.md asks; exact 0 for equal values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return math.nan
    return float(_sd_rows(v[None])[0])


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
        sds[a:b] = _sd_rows(v[idx])
    return float(_sd_rows(sds[None])[0] * math.sqrt(n_boot / (n_boot - 1)))


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
        out[a:b] = _sd_rows(v[rng.integers(0, v.size, size=(b - a, v.size))])
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


# --------------------------------------------------------------------------------------------
# all pairs of a group


@dataclass
class PairwiseStats:
    """Per-model and per-pair results of one group, enough to recompute every metric on any subset.

    Pair matrices are symmetric with a zero diagonal: ``agree[i, j]`` = test examples on which
    models i and j predict the same class; ``ens_correct[i, j]`` = examples the 2-model ensemble
    (argmax of l_i + l_j) gets right; ``corr[i, j]`` = Pearson r of the flattened logits;
    ``cka[i, j]`` = linear CKA of the features (None when no features).
    """

    n_examples: int
    n_correct: np.ndarray  # int64 [N]
    ce: np.ndarray  # float64 [N]
    correct: np.ndarray  # bool [N, n]
    agree: np.ndarray  # int64 [N, N]
    ens_correct: np.ndarray  # int64 [N, N]
    corr: np.ndarray  # float64 [N, N]
    digests: list[bytes]
    cka: np.ndarray | None = None

    @property
    def n_models(self) -> int:
        return int(self.n_correct.shape[0])

    @property
    def accuracies(self) -> np.ndarray:
        """Per-model accuracy in percent."""
        return 100.0 * self.n_correct / self.n_examples

    def n_distinct(self) -> int:
        """Number of distinct logits arrays (1 for a bit-identical group)."""
        return len(set(self.digests))


def pairwise_stats(models: Sequence[ArrayLike2D], labels: Any, *, summaries: Sequence[ModelSummary] | None = None,
                   features: Sequence[Any] | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                   blas_threads: int | None = 1, threads: int | None = 1,
                   progress: Callable[[int, int], None] | None = None) -> PairwiseStats:
    """Everything pairwise for N models in one blocked pass over the test examples.

    The test examples are read in blocks of ``m`` rows from every model (about ``block_bytes`` of
    working arrays, whatever N), so each model's file is read once and memmaps are never loaded
    whole. Per block, with torch (``threads`` intra-op threads; None keeps torch's setting):

    - correlation: each model standardized to ``(x - mean) / norm`` over its n*c logits (float64);
      one float64 GEMM over all models accumulates the Pearson matrix. Pairs with identical arrays
      (equal digests) are set to exactly 1.0.
    - disagreement: two models agree on an example iff both are right, or both predict the same
      wrong class. ``agree = K @ K.T`` with ``K = [correct | one-hot of wrong predictions]``: one
      float32 GEMM of exact integer counts. Columns set in every model are a constant, columns set
      in fewer than two models only touch the diagonal: both are dropped before the GEMM.
    - ensemble (argmax of ``l_i + l_j`` in the logits' dtype, ties to the lowest class as numpy):
      a model is *safe* on an example when it is right with a margin over every other class larger
      than the rounding of a float sum (``4 u max|l|``, u the unit roundoff), so that any pair of
      models safe on an example provably has a right ensemble there; those examples are counted by
      the GEMM ``safe @ safe.T``. Only the (model o, example e) entries where o is not safe are
      evaluated exactly, against all N partners at once (vectorised over partners and entries,
      grouped by label so the tie rule is a fixed class split): ``R[o, p]`` counts right ensembles
      on o's unsafe examples, and ``T`` the part of them where the partner p is safe. For a pair,
      unsafe(i) + (unsafe(j) and safe(i)) + safe(both) covers each example once, so
      ``ens[i, j] = SS[i, j] + R[i, j] + T[j, i]``; as ens is symmetric this equals half of
      ``Q + Q.T`` with ``Q = SS + R + T``, so R and T go into one accumulator by row (no column
      scatter) and one in-place symmetrization at the end gives exact integer counts. The work is ~N^2 * n * (unsafe fraction) * c
      element operations instead of N^2/2 * n * c.

    Counts (``agree``, ``ens_correct``) are int32 (they are at most n_test); ``corr`` is float64.
    ``summaries`` (from :func:`summarize_model`) skip the per-model pass when the caller already
    made it. ``features`` (one ``[n, d]`` array per model) add the CKA matrix. ``blas_threads``
    caps numpy BLAS threads (the CKA products). ``progress(done, total)`` is called after each
    block with the test examples done so far (see :func:`progress_line`).
    """
    with _blas_threads(blas_threads), _torch_threads(threads):
        return _pairwise_stats(models, labels, summaries, features, block_bytes, progress)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def progress_line(label: str = "pairwise metrics", every_s: float = 5.0,
                  stream: Any = None) -> Callable[[int, int], None]:
    """A ``progress`` callable for :func:`pairwise_stats` that prints one line every ``every_s`` s.

    Silent for reductions shorter than ``every_s``; prints ``label: 41% (4100/10000 examples, 12 s,
    ~17 s left)`` to ``stream`` (default stderr) afterwards, and a last line at 100%.
    """
    import sys
    import time

    t0 = time.monotonic()
    state = {"last": t0, "printed": False}

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - state["last"] < every_s and not (done >= total and state["printed"]):
            return
        state["last"], state["printed"] = now, True
        el = now - t0
        left = el * (total - done) / done if done else math.nan
        print(f"{label}: {100 * done / max(total, 1):.0f}% ({done}/{total} examples, {el:.0f} s, ~{left:.0f} s left)",
              file=stream or sys.stderr, flush=True)

    return report


# float32 holds every integer up to 2^24 exactly: counts accumulated in float32 GEMMs are exact
# while no entry can exceed this; longer test sets are flushed into int64 in chunks of examples.
_F32_EXACT = 2**23  # Q + Q.T of the ensemble counts reaches 2n


def _pairwise_stats(models: Sequence[ArrayLike2D], labels: Any, summaries: Sequence[ModelSummary] | None,
                    features: Sequence[Any] | None, block_bytes: int,
                    progress: Callable[[int, int], None] | None = None) -> PairwiseStats:
    import torch

    N = len(models)
    if N < 1:
        raise ValueError("pairwise_stats needs at least one model")
    shape = tuple(models[0].shape)
    for k, m in enumerate(models):
        if tuple(m.shape) != shape:
            raise ValueError(f"model {k} has logits of shape {tuple(m.shape)}, model 0 has {shape}")
    n, c = shape
    y = _check_labels(labels, n, c)
    if summaries is None:
        summaries = [summarize_model(m, y) for m in models]
    if len(summaries) != N:
        raise ValueError("one summary per model is required")

    means = torch.from_numpy(np.array([s.mean for s in summaries], np.float64))
    norms = np.array([s.norm for s in summaries])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_norm = torch.from_numpy(np.where(norms > 0, 1.0 / norms, np.nan))
    work_dtype = np.result_type(np.dtype(models[0].dtype), np.float32)
    finfo = np.finfo(work_dtype)
    tol = 2.0 * float(finfo.eps)  # 4 u, u = eps / 2 the unit roundoff of one addition
    big = float(finfo.max) / 4  # beyond this a pair's sum could overflow to inf (and tie)

    # accumulators allocated by numpy (torch views them): tracemalloc then sees the N^2 memory
    gram = torch.from_numpy(np.zeros((N, N), np.float64))
    agree_f = torch.from_numpy(np.zeros((N, N), np.float32))
    ens_f = torch.from_numpy(np.zeros((N, N), np.float32))
    agree = ens = None  # int32 totals, only needed when a test set is too long for float32 counts
    const_agree = const_ens = 0  # examples on which every pair agrees / every model is safe
    # bytes per test example held at once: the block (float32/64 copy + class-major copy),
    # float64 standardized logits and margins, and the one-hot/indicator matrices
    it = np.dtype(work_dtype).itemsize
    per_example = N * c * (3 * it + 8 + 8 + 4) + N * 16
    m_block = int(max(1, min(n, block_bytes // max(per_example, 1), _F32_EXACT)))
    since_flush = 0
    for a in range(0, n, m_block):
        b = min(n, a + m_block)
        m = b - a
        X = np.stack([_rows(mod, a, b, work_dtype) for mod in models])  # [N, m, c]
        Xt = torch.from_numpy(X)
        yb = y[a:b]

        Z = torch.from_numpy(X.reshape(N, m * c).astype(np.float64))
        Z -= means[:, None]
        Z *= inv_norm[:, None]
        gram.addmm_(Z, Z.T)
        del Z

        pred = torch.from_numpy(np.stack([np.asarray(s.pred[a:b], np.int64) for s in summaries]))  # [N, m]
        yt = torch.from_numpy(yb)
        right = pred == yt[None, :]
        W = torch.zeros((N, m, c), dtype=torch.float32)
        W.scatter_(2, pred[:, :, None], (~right).to(torch.float32)[:, :, None])  # one-hot of wrong preds
        K = torch.cat([right.to(torch.float32), W.reshape(N, m * c)], dim=1)
        del W
        K, full = _useful_columns(K, N)
        const_agree += full
        if K.shape[1]:
            agree_f.addmm_(K, K.T)
        del K

        lab = X[:, np.arange(m), yb]  # [N, m] logit of the label
        d = lab[:, :, None].astype(np.float64) - X  # margins of the label over each class
        d[:, np.arange(m), yb] = np.inf
        amax = np.abs(X).max(axis=2).astype(np.float64)
        safe = (d.min(axis=2) > tol * amax) & (amax < big)  # [N, m]
        del d, amax
        St = torch.from_numpy(safe.astype(np.float32))
        S, full = _useful_columns(St, N)
        const_ens += full
        if S.shape[1]:
            ens_f.addmm_(S, S.T)
        del S
        _ensemble_unsafe(X, yb, safe, St, ens_f)
        del X, Xt, St

        since_flush += m
        if since_flush + m_block > _F32_EXACT and b < n:  # keep float32 counts exact: move them to int32
            agree = _flush(agree_f, agree)
            ens = _flush(ens_f, ens)
            since_flush = 0
        if progress is not None:
            progress(b, n)
    if ens is not None:  # the symmetrization is linear: apply it to the flushed part too
        _symmetrize_half(ens)
    _symmetrize_half(ens_f.numpy())
    agree = _to_int32(agree_f, agree)
    ens = _to_int32(ens_f, ens)
    del agree_f, ens_f
    agree += np.int32(const_agree)
    ens += np.int32(const_ens)
    np.fill_diagonal(agree, 0)  # a model agrees with itself everywhere; pair sums skip the diagonal
    np.fill_diagonal(ens, 0)
    corr = gram.numpy()
    np.clip(corr, -1.0, 1.0, out=corr)
    digests = [s.digest for s in summaries]
    _set_identical_pairs(corr, digests)
    np.fill_diagonal(corr, 0.0)
    cka = _pairwise_cka_matrix(features, block_bytes) if features is not None else None
    if cka is not None and cka.shape != (N, N):
        raise ValueError(f"features given for {cka.shape[0]} models, logits for {N}")
    return PairwiseStats(
        n_examples=n,
        n_correct=np.array([s.n_correct for s in summaries], np.int64),
        ce=np.array([s.ce for s in summaries], np.float64),
        correct=np.stack([s.correct for s in summaries]),
        agree=agree,
        ens_correct=ens,
        corr=corr,
        digests=digests,
        cka=cka,
    )


def _useful_columns(K: Any, N: int) -> tuple[Any, int]:
    """Columns of a 0/1 matrix [N, cols] that count towards off-diagonal entries of ``K @ K.T``.

    A column set in every model adds 1 to every pair: returned as a count (the caller adds it as
    a constant); one set in fewer than two models adds only to the diagonal, which is discarded.
    """
    cs = K.sum(0)
    return K[:, (cs >= 2) & (cs < N)], int((cs == N).sum())


def _flush(acc: Any, out: np.ndarray | None, rows: int = 128) -> np.ndarray:
    """Add float32 integer counts into an int32 array (made if None) by row chunks; zero them."""
    if out is None:
        out = np.zeros(tuple(acc.shape), np.int32)
    for r in range(0, out.shape[0], rows):
        out[r:r + rows] += np.rint(acc[r:r + rows].numpy()).astype(np.int32)
    acc.zero_()
    return out


def _symmetrize_half(Q: np.ndarray, tile: int = 512) -> None:
    """``Q <- (Q + Q.T) / 2`` in place, tile by tile (no N x N temporary); exact for these counts.

    Q + Q.T is twice an integer count below 2^24 (float32) or 2^31 (int32), so halving is exact.
    """
    N = Q.shape[0]
    for a in range(0, N, tile):
        for b in range(a, N, tile):
            t = Q[a:a + tile, b:b + tile] + Q[b:b + tile, a:a + tile].T
            t //= 2  # floor division of an even integer (float or int) is exact
            Q[a:a + tile, b:b + tile] = t
            Q[b:b + tile, a:a + tile] = t.T


def _to_int32(acc: Any, out: np.ndarray | None, rows: int = 128) -> np.ndarray:
    """The final int32 counts; converted inside the float32 accumulator's own buffer when possible.

    Same size, so no second N x N array: each row chunk is read (copied) before it is overwritten.
    """
    if out is not None:
        return _flush(acc, out, rows)
    f = acc.numpy()
    i = f.view(np.int32)
    for r in range(0, f.shape[0], rows):
        i[r:r + rows] = np.rint(f[r:r + rows]).astype(np.int32)
    return i


# partner x entry elements per step of the exact ensemble evaluation: large enough that torch's
# per-call cost is small, small enough that the [N, q] temporaries stay in cache
_ENS_CHUNK = 2**19


def _ensemble_unsafe(X: np.ndarray, y: np.ndarray, safe: np.ndarray, St: Any, ens_f: Any) -> None:
    """Exact ensemble correctness on every (model o, example e) where o is not safe, vs all partners.

    Adds ``R[o, p] + T[o, p]`` into ``ens_f[o, p]`` (T: the part where p is safe on e); the caller
    symmetrizes, see :func:`_symmetrize_half`. Entries are grouped by label L so that the tie rule of numpy's argmax is a
    fixed split of the classes: the ensemble is right iff its label sum beats every class below L
    strictly and every class above L or equals it.
    """
    import torch

    N, m, c = X.shape
    if N < 2:
        return
    o_all, e_all = np.nonzero(~safe)
    if o_all.size == 0:
        return
    # example-major [m, c, N]: an entry's partner logits are one contiguous [c, N] slab, so the
    # gather is a row copy and every class comparison runs over N contiguous partners
    XE = torch.from_numpy(np.ascontiguousarray(X.transpose(1, 2, 0)))
    SE = St.T.contiguous()  # [m, N] partner safe on example
    Xo = torch.from_numpy(X)
    lab_all = y[e_all]
    step = max(1, _ENS_CHUNK // (N * c))
    for L in (int(v) for v in np.unique(lab_all)):
        sel = np.flatnonzero(lab_all == L)
        for q0 in range(0, sel.size, step):
            q = sel[q0:q0 + step]
            o = torch.from_numpy(o_all[q])
            e = torch.from_numpy(e_all[q])
            s = XE.index_select(0, e)  # [q, c, N]: partner p's logits l_p[e]
            s += Xo[o, e][:, :, None]  # + the owner's l_o[e], in X's dtype (same sum as argmax of l_o + l_p)
            s_lab = s[:, L, :]
            ok = torch.ones(s_lab.shape, dtype=torch.bool)
            if L > 0:  # a class below the label wins a tie: the label must beat it strictly
                ok &= s_lab > s[:, :L, :].amax(dim=1)
            if L < c - 1:  # a class above the label loses a tie
                ok &= s_lab >= s[:, L + 1:, :].amax(dim=1)
            # R[o, p] + T[o, p] in one row scatter: a right ensemble counts 1, plus 1 if p is safe
            ens_f.index_add_(0, o, ok.to(torch.float32) * (1.0 + SE.index_select(0, e)))


def _set_identical_pairs(mat: np.ndarray, digests: Sequence[bytes]) -> None:
    """Identical arrays correlate exactly 1 (unless constant, where r is undefined and stays NaN)."""
    by_digest: dict[bytes, list[int]] = {}
    for i, d in enumerate(digests):
        by_digest.setdefault(d, []).append(i)
    for idx in by_digest.values():
        if len(idx) > 1:
            ix = np.array(idx)
            block = mat[np.ix_(ix, ix)]
            mat[np.ix_(ix, ix)] = np.where(np.isnan(block), np.nan, 1.0)


def pairwise_cka_matrix(features: Sequence[Any], *, block_bytes: int = DEFAULT_BLOCK_BYTES,
                        blas_threads: int | None = 1) -> np.ndarray:
    """Linear CKA (Kornblith et al. 2019) of every pair of feature matrices, zero diagonal.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred X, Y [n, d].
    Feature-space form (cost n*d^2 per pair, no n x n kernels). Models are taken in row blocks of
    about ``block_bytes`` of centred float32 features; cross products run in float32 BLAS
    (relative error ~1e-6), norms in float64. Identical feature arrays get exactly 1.0.
    """
    with _blas_threads(blas_threads):
        return _pairwise_cka_matrix(features, block_bytes)


def _pairwise_cka_matrix(features: Sequence[Any], block_bytes: int) -> np.ndarray:
    N = len(features)
    if N == 0:
        return np.zeros((0, 0))
    n = int(features[0].shape[0])
    for k, f in enumerate(features):
        if len(f.shape) != 2 or int(f.shape[0]) != n:
            raise ValueError(f"features of model {k} have shape {tuple(f.shape)}, expected [{n}, d]")

    def centred(k: int) -> np.ndarray:
        f = np.asarray(features[k][:], dtype=np.float64)
        if not np.isfinite(f).all():
            raise NonFiniteLogits(f"features of model {k} contain NaN or inf")
        return f - f.mean(axis=0)

    self_norm = np.empty(N)
    digests = []
    for k in range(N):
        f = centred(k)
        self_norm[k] = np.linalg.norm(f.T @ f)
        digests.append(array_digest(features[k]))
    out = np.zeros((N, N))
    dims = [int(f.shape[1]) for f in features]
    i0 = 0
    while i0 < N:
        # grow the row block while it fits in block_bytes (always at least one model)
        i1, size = i0 + 1, n * dims[i0] * 4
        while i1 < N and size + n * dims[i1] * 4 <= block_bytes:
            size += n * dims[i1] * 4
            i1 += 1
        XI = np.concatenate([centred(i).astype(np.float32) for i in range(i0, i1)], axis=1)
        offs = np.concatenate([[0], np.cumsum(dims[i0:i1])])
        for j in range(i0 + 1, N):
            Xj = centred(j).astype(np.float32)
            C = XI.T @ Xj
            for ii in range(i0, min(i1, j)):
                block = C[offs[ii - i0]:offs[ii - i0 + 1]].astype(np.float64)
                den = self_norm[ii] * self_norm[j]
                out[ii, j] = np.sum(block * block) / den if den > 0 else math.nan
        i0 = i1
    out = out + out.T
    out = np.clip(out, 0.0, 1.0)  # CKA lies in [0, 1]; float32 products may overshoot by ~1e-7
    _set_identical_pairs(out, digests)
    np.fill_diagonal(out, 0.0)
    return out


# --------------------------------------------------------------------------------------------
# group metrics from pair matrices (full group or any subsets)


def subset_metrics(stats: PairwiseStats, subsets: Any, *, blas_threads: int | None = 1) -> dict[str, np.ndarray]:
    """Every group metric for each row of ``subsets`` ([R, k] model indices, k >= 2, no repeats).

    Returns arrays of length R for: acc_mean, acc_sd, ce_sd, disagreement, correlation,
    ensemble_delta, cka, testset_sd. Sums over the pairs of a subset S use the indicator vector
    s: sum_{i<j in S} A_ij = s^T A s / 2 (A symmetric, zero diagonal), so R subsets cost two
    matrix products. Counts stay integers in float64 (exact below 2^53), so identical models
    still give exact zeros.
    """
    with _blas_threads(blas_threads):
        return _subset_metrics(stats, subsets)


def _subset_metrics(stats: PairwiseStats, subsets: Any) -> dict[str, np.ndarray]:
    S = np.atleast_2d(np.asarray(subsets, dtype=np.int64))
    R, k = S.shape
    N, n = stats.n_models, stats.n_examples
    if k < 2:
        raise ValueError("pairwise metrics need subsets of at least 2 models")
    M = np.zeros((R, N))
    M[np.arange(R)[:, None], S] = 1.0
    if not np.all(M.sum(axis=1) == k):
        raise ValueError("a subset repeats a model index")
    n_pairs = k * (k - 1) / 2

    rows = max(1, 2**22 // max(N, 1))  # float64 row chunks of ~32 MiB: no N x N float64 copy

    def pair_sum(A: np.ndarray) -> np.ndarray:
        AM = np.empty((N, R))
        for a in range(0, N, rows):
            AM[a:a + rows] = A[a:a + rows].astype(np.float64) @ M.T  # integer counts stay exact
        return np.einsum("nr,rn->r", AM, M) / 2.0

    C = stats.n_correct[S].astype(np.float64)  # [R, k]
    acc = 100.0 * C / n
    out: dict[str, np.ndarray] = {
        "acc_mean": 100.0 * C.sum(axis=1) / (k * n),  # one division: no rounding from averaging percents
        "acc_sd": _sd_rows(acc),
        "ce_sd": _sd_rows(stats.ce[S]),
    }
    total = n_pairs * n
    out["disagreement"] = 100.0 * (total - pair_sum(stats.agree)) / total
    out["correlation"] = pair_sum(stats.corr) / n_pairs
    # sum over pairs of (acc_i + acc_j) = (k - 1) * sum_i acc_i, each model being in k-1 pairs
    out["ensemble_delta"] = 100.0 * (2.0 * pair_sum(stats.ens_correct) - (k - 1) * C.sum(axis=1)) / (2.0 * total)
    out["cka"] = pair_sum(stats.cka) / n_pairs if stats.cka is not None else np.full(R, math.nan)
    counts = np.empty((R, n))  # [R, n] models right on each example, by column chunks of n
    cols = max(1, 2**22 // max(N, 1))
    for a in range(0, n, cols):
        counts[:, a:a + cols] = M @ stats.correct[:, a:a + cols].astype(np.float64)
    p = counts / k
    out["testset_sd"] = 100.0 * np.sqrt(np.sum(p * (1.0 - p), axis=1)) / n
    return out


def group_summary(stats: PairwiseStats) -> dict[str, float]:
    """The group's metrics over all its models (see :func:`subset_metrics` for the keys)."""
    N = stats.n_models
    if N < 2:
        acc = stats.accuracies
        return {"acc_mean": float(acc.mean()) if N else math.nan, **{k: math.nan for k in (
            "acc_sd", "ce_sd", "disagreement", "correlation", "ensemble_delta", "cka", "testset_sd")}}
    return {k: float(v[0]) for k, v in subset_metrics(stats, np.arange(N)[None]).items()}


# --------------------------------------------------------------------------------------------
# convenience wrappers: one metric, straight from the logits


def pairwise_disagreement(models: Sequence[ArrayLike2D], *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """Mean over pairs i<j of the percent of test examples whose argmax differs."""
    n, c = models[0].shape
    dummy = np.zeros(n, np.int64)  # labels do not enter disagreement
    return group_summary(pairwise_stats(models, dummy, block_bytes=block_bytes))["disagreement"]


def pairwise_correlation(models: Sequence[ArrayLike2D], *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """Mean over pairs i<j of the Pearson correlation of the two models' flattened logits."""
    n, c = models[0].shape
    return group_summary(pairwise_stats(models, np.zeros(n, np.int64), block_bytes=block_bytes))["correlation"]


def ensemble_delta(models: Sequence[ArrayLike2D], labels: Any, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """Mean over pairs of acc(argmax(l_i + l_j)) - (acc_i + acc_j) / 2, in percentage points."""
    return group_summary(pairwise_stats(models, labels, block_bytes=block_bytes))["ensemble_delta"]


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two feature matrices [n, d1], [n, d2] (float64 reference implementation)."""
    X = np.asarray(x, dtype=np.float64)
    Y = np.asarray(y, dtype=np.float64)
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(np.linalg.norm(Y.T @ X) ** 2 / den) if den > 0 else math.nan


def pairwise_cka(features: Sequence[Any], *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> float:
    """Mean over pairs i<j of the linear CKA of the models' penultimate features."""
    mat = pairwise_cka_matrix(features, block_bytes=block_bytes)
    iu = np.triu_indices(mat.shape[0], 1)
    return float(mat[iu].mean()) if iu[0].size else math.nan


def testset_sd(correct: Any) -> float:
    """Accuracy SD (percentage points) that test-set sampling alone would give.

    ``correct`` is [N models, n examples] booleans. With p_j the fraction of models right on
    example j, a model whose per-example correctness were independent Bernoulli(p_j) draws would
    have accuracy variance sum_j p_j (1 - p_j) / n^2, so SD = sqrt(sum_j p_j (1 - p_j)) / n.
    A measured SD near this value means run-to-run variation behaves like coin flips on the
    uncertain examples; well below means the models' errors move together.
    """
    C = np.asarray(correct, dtype=np.float64)
    if C.ndim != 2 or C.shape[0] < 1:
        raise ValueError(f"correct must be [N models, n examples], got shape {C.shape}")
    p = C.mean(axis=0)
    return float(100.0 * np.sqrt(np.sum(p * (1.0 - p))) / C.shape[1])


# --------------------------------------------------------------------------------------------
# variability reduction


def reduction_terms(base: Mapping[str, float], new: Mapping[str, float], formula: str = "paper") -> dict[str, float]:
    """Relative reduction of each of the five metrics (fractions; NaN where undefined).

    For acc_sd, ce_sd, disagreement and ensemble_delta both formulas use ``1 - new/base``.
    Correlation differs (docs/study.md, docs/metrics.md):
      - "paper": variability is 1 - correlation, so the term is ``1 - (1 - new)/(1 - base)``;
      - "report": the reproducibility report's relative rise ``(new - base)/base``.
    """
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    missing = [k for k in REDUCTION_KEYS if k not in base or k not in new]
    if missing:
        raise KeyError(f"variability reduction needs keys {REDUCTION_KEYS}; missing {missing}")

    def rel(b: float, n: float) -> float:
        b, n = float(b), float(n)
        return 1.0 - n / b if b != 0 and math.isfinite(b) and math.isfinite(n) else math.nan

    out = {k: rel(base[k], new[k]) for k in REDUCTION_KEYS if k != "correlation"}
    cb, cn = float(base["correlation"]), float(new["correlation"])
    if formula == "paper":
        out["correlation"] = rel(1.0 - cb, 1.0 - cn)
    else:
        out["correlation"] = (cn - cb) / cb if cb != 0 and math.isfinite(cb) and math.isfinite(cn) else math.nan
    return {k: out[k] for k in REDUCTION_KEYS}


def variability_reduction(base: Mapping[str, float], new: Mapping[str, float], formula: str = "paper") -> float:
    """Variability reduction in percent: 100 x the mean of :func:`reduction_terms`.

    NaN if any term is undefined (a baseline metric of 0, e.g. a bit-identical baseline), because
    averaging the remaining terms would silently change what the number means.
    """
    terms = reduction_terms(base, new, formula)
    vals = list(terms.values())
    if any(math.isnan(v) for v in vals):
        return math.nan
    return 100.0 * sum(vals) / len(vals)
