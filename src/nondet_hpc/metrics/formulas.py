"""Every formula of the study's metrics, as pure functions on arrays (docs/metrics.md writes them out).

One file holds the definitions so there is one place to check them against the paper. Units are
the ones the tables print:

=================  ==========================================================================
accuracy           percent (``100 * correct / n_test``; argmax ties go to the lowest class)
accuracy SD        percentage points, population SD (ddof=0) over models
CE SD              nats, population SD over models of the mean test cross-entropy
disagreement       percent of test examples, mean over pairs i<j
correlation        Pearson r of the flattened logits, mean over pairs i<j
ensemble delta     percentage points: acc(argmax(l_i + l_j)) - (acc_i + acc_j)/2, mean over pairs
CKA                linear CKA of penultimate features, mean over pairs
param. distance    percent: exact L2 distance of two models' final parameters over their mean
                   norm, mean over pairs (:func:`pairwise_param_distance`)
test-set SD        percentage points (see :func:`testset_sd`)
variability        percent (mean over the five metrics of a relative reduction)
reduction
=================  ==========================================================================

A pairwise metric is a pair matrix (its [N, N] values, one per pair of models) and a formula that
turns the matrix's sums over pairs (:class:`PairSums`) into the metric: the same formula serves a
whole group, any subset of it (N-models ablation) and a bootstrap resample of its models.

Exactness: a group of bit-identical models (the determinism control) must give exactly 0 SDs,
0 disagreement, 0 ensemble delta and correlation/CKA exactly 1. That holds by construction here:
counts are integers, SDs are computed on values shifted by their first element (identical values
become exact zeros), and pairs whose arrays have the same digest get correlation (and CKA)
exactly 1.0 instead of a floating-point dot product that may round to 0.9999999999999998.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from . import blocks

#: the five metrics whose relative reductions the variability reduction averages (the paper's)
REDUCTION_KEYS: tuple[str, ...] = ("acc_sd", "ce_sd", "disagreement", "correlation", "ensemble_delta")
#: how the correlation enters the variability reduction: the paper's or the reproducibility report's
FORMULAS: tuple[str, ...] = ("paper", "report")


class NonFiniteLogits(ValueError):
    """A model's logits contain NaN or inf: the run diverged and cannot be measured."""


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


def sd_rows(values: np.ndarray) -> np.ndarray:
    """Population SD (ddof=0) of each row, exact 0 for a row of identical values.

    Shifting each row by its first element changes no SD mathematically, but turns a row of equal
    values into exact zeros, whose mean and spread are then exactly 0 in floating point too.
    """
    v = np.asarray(values, dtype=np.float64)
    d = v - v[:, :1]
    m = d.mean(axis=1, keepdims=True)
    return np.sqrt(np.mean((d - m) ** 2, axis=1))


def population_sd(values: Any) -> float:
    """Population standard deviation (ddof=0), as docs/study.md asks; exact 0 for equal values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return math.nan
    return float(sd_rows(v[None])[0])


def check_labels(labels: Any, n: int, c: int) -> np.ndarray:
    """The labels as int64, checked against logits of shape [n, c] (ValueError naming the problem)."""
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


def cross_entropy(logits: Any, labels: Any) -> float:
    """Mean cross-entropy (nats) of softmax(logits) against the labels, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    y = check_labels(labels, x.shape[0], x.shape[1])
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
    y = check_labels(labels, n, c)
    x = np.asarray(logits[:], dtype=np.float64)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise NonFiniteLogits(f"{bad} of {x.size} logits are NaN or infinite")
    pred = x.argmax(axis=1).astype(np.int32 if c > 32767 else np.int16)
    correct = pred == y
    mean = float(x.mean())
    norm = float(np.sqrt(np.sum((x - mean) ** 2)))
    return ModelSummary(int(np.count_nonzero(correct)), correct, pred, cross_entropy(x, y), mean, norm,
                        array_digest(logits))


# --------------------------------------------------------------------------------------------
# a group (or a subset, or a resample) of models: one value per row


def mean_accuracy(n_correct: np.ndarray, n: int) -> np.ndarray:
    """Mean accuracy (%) of each row of per-model correct counts ([R, k] floats), one division so
    that no rounding comes from averaging percents."""
    return 100.0 * n_correct.sum(axis=1) / (n_correct.shape[1] * n)


def testset_sd(right: np.ndarray, k: int, n: int) -> np.ndarray:
    """Accuracy SD (percentage points) that test-set sampling alone would give, per row.

    ``right`` is [R, n]: how many of a row's k models are right on each test example. With p_j the
    fraction of models right on example j, a model whose per-example correctness were independent
    Bernoulli(p_j) draws would have accuracy variance sum_j p_j (1 - p_j) / n^2, so SD =
    sqrt(sum_j p_j (1 - p_j)) / n. A measured SD near this value means run-to-run variation
    behaves like coin flips on the uncertain examples; well below means the models' errors move
    together.
    """
    p = right / k
    return 100.0 * np.sqrt(np.sum(p * (1.0 - p), axis=1)) / n


@dataclass(frozen=True)
class PairSums:
    """A pair matrix summed over the pairs of models of each row (a subset or a bootstrap resample).

    A subset counts each pair i < j once. A resample counts the ordered pairs of two *different*
    models it drew, each as often as its two models were drawn together, so a model paired with
    its own copy never counts (it would add disagreement 0 and correlation 1 that no real pair
    has). Either way ``total / pairs`` is the mean over pairs.
    """

    total: np.ndarray  # [R] the matrix summed over the row's pairs
    pairs: Any  # the number of pairs counted (a float, or [R] with NaN where a resample has none)
    solo: np.ndarray  # [R] the models' own correct counts summed the same way, (c_i + c_j) / 2 per pair
    n: int  # test examples


def pair_mean(s: PairSums) -> np.ndarray:
    """The mean over pairs: correlation (Pearson r of the flattened logits), CKA, and the default."""
    return s.total / s.pairs


def disagreement(s: PairSums) -> np.ndarray:
    """Percent of test examples two models predict differently, from their agreement counts.

    Computed from the integer counts, so identical models give an exact 0.
    """
    return 100.0 * (s.pairs * s.n - s.total) / (s.pairs * s.n)


def disagreement_resampled(s: PairSums) -> np.ndarray:
    """:func:`disagreement` as the bootstrap over models computes it: 100 (1 - mean agreement / n).

    The same number up to the last bits; kept apart so that resampled values (claims.csv) stay
    what they have always been.
    """
    return 100.0 * (1.0 - s.total / s.pairs / s.n)


def ensemble_delta(s: PairSums) -> np.ndarray:
    """Mean over pairs of acc(argmax(l_i + l_j)) - (acc_i + acc_j) / 2 in percentage points, from
    the counts of test examples the 2-model ensemble gets right."""
    return 100.0 * (s.total - s.solo) / (s.pairs * s.n)


# --------------------------------------------------------------------------------------------
# CKA of the penultimate features


def pairwise_cka_matrix(features: Sequence[Any], block_bytes: int = blocks.DEFAULT_BLOCK_BYTES, *,
                        blas_threads: int | None = 1) -> np.ndarray:
    """Linear CKA (Kornblith et al. 2019) of every pair of feature matrices, zero diagonal.

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred X, Y [n, d].
    Feature-space form (cost n*d^2 per pair, no n x n kernels). Models are taken in row blocks of
    about ``block_bytes`` of centred float32 features; cross products run in float32 BLAS
    (relative error ~1e-6), norms in float64. Identical feature arrays get exactly 1.0. The
    ``pair`` function of the CKA metric (nondet_hpc.registry.metrics).
    """
    with blocks.blas_threads(blas_threads):
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
    blocks.set_identical_pairs(out, digests)
    np.fill_diagonal(out, 0.0)
    return out


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


# --------------------------------------------------------------------------------------------
# distance between the models' final weights


#: bytes of float64 values reduced at a time by :func:`flat_distances` (about an L2 cache)
CACHE_BYTES = 2 << 20


def flat_distances(vectors: Sequence[Any], block_bytes: int = blocks.DEFAULT_BLOCK_BYTES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [N, N] exact L2 distances, float64 [N] L2 norms) of N flat parameter vectors.

    ``vectors``: objects with ``n_values`` and ``flat_range(lo, hi) -> float32 [hi - lo]`` (a
    weights file, records/weights.py). They are read in blocks of the flat vector, ``block_bytes``
    of float64 values over all N at a time, and each block is reduced in slices of about
    ``CACHE_BYTES`` (5x faster than whole blocks here: the differences stay in the CPU cache);
    differences of float32 values are exact in float64 and taken row by row (no Gram matrix), so
    bit-identical models are exactly 0 apart.
    """
    N = len(vectors)
    if N == 0:
        return np.zeros((0, 0)), np.zeros(0)
    n = int(vectors[0].n_values)
    bad = [k for k, v in enumerate(vectors) if int(v.n_values) != n]
    if bad:
        raise ValueError(f"models {bad[:5]} have another number of parameters than model 0 ({n})")
    step, inner = max(1, block_bytes // (8 * N)), max(1, CACHE_BYTES // (8 * N))
    sq, norms = np.zeros((N, N)), np.zeros(N)
    for lo in range(0, n, step):
        block = np.stack([v.flat_range(lo, min(n, lo + step)) for v in vectors])
        for a in range(0, block.shape[1], inner):
            x = block[:, a:a + inner].astype(np.float64)
            norms += np.einsum("ij,ij->i", x, x)
            for i in range(N - 1):
                d = x[i + 1:] - x[i]
                sq[i, i + 1:] += np.einsum("ij,ij->i", d, d)
    out = np.sqrt(sq)
    return out + out.T, np.sqrt(norms)


def relative_distances(dist: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``100 * ||theta_i - theta_j|| / ((||theta_i|| + ||theta_j||) / 2)``: percent of the pair's
    mean norm (0 on the diagonal and between identical models)."""
    scale = (norms[:, None] + norms[None, :]) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dist > 0, 100.0 * dist / scale, 0.0)


def pairwise_param_distance(vectors: Sequence[Any], block_bytes: int = blocks.DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """The pair matrix of the final parameter distance (metric ``param_distance``): each pair's
    exact distance in percent of its mean parameter norm (:func:`relative_distances`)."""
    return relative_distances(*flat_distances(vectors, block_bytes))
