"""A group's per-model and per-pair results, and every metric of the group or of any subset of it.

:func:`nondet_hpc.metrics.pairwise_stats` computes the pair matrices of the logits in one blocked
pass; other pairwise metrics (CKA of the features, any metric declared with a ``pair`` function in
:mod:`nondet_hpc.registry.metrics`) join with :meth:`PairwiseStats.add`. Everything after that
works from these arrays: the N-models ablation and the bootstrap over models reread no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import blocks
from . import formulas as F


@dataclass(frozen=True)
class Pairs:
    """One pairwise metric of a group: its pair matrix and how the metric follows from its sums."""

    matrix: np.ndarray  # [N, N], symmetric, zero diagonal
    value: Callable[[F.PairSums], np.ndarray] = F.pair_mean  # the metric from sums over pairs
    resampled: Callable[[F.PairSums], np.ndarray] | None = None  # the bootstrap's arithmetic where it differs


@dataclass
class PairwiseStats:
    """Per-model and per-pair results of one group, enough to recompute every metric on any subset.

    ``pairs`` maps a pairwise metric's key to its :class:`Pairs`; the matrix is what the metric is
    computed from: ``disagreement``: test examples on which models i and j predict the same class;
    ``ensemble_delta``: examples the 2-model ensemble (argmax of l_i + l_j) gets right;
    ``correlation``: Pearson r of the flattened logits; ``cka``: linear CKA of the features.
    """

    n_examples: int
    n_correct: np.ndarray  # int64 [N]
    ce: np.ndarray  # float64 [N]
    correct: np.ndarray  # bool [N, n]
    digests: list[bytes]
    pairs: dict[str, Pairs] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return int(self.n_correct.shape[0])

    @property
    def accuracies(self) -> np.ndarray:
        """Per-model accuracy in percent."""
        return 100.0 * self.n_correct / self.n_examples

    def per_model(self) -> dict[str, np.ndarray]:
        """Per-model values by name (report/per_model.csv's columns): accuracy (%) and cross-entropy."""
        return {"acc": self.accuracies, "ce": self.ce}

    def n_distinct(self) -> int:
        """Number of distinct logits arrays (1 for a bit-identical group)."""
        return len(set(self.digests))

    def add(self, key: str, matrix: np.ndarray, value: Callable[[F.PairSums], np.ndarray] = F.pair_mean) -> None:
        """Add pairwise metric ``key``: its [N, N] matrix (symmetric, zero diagonal) and its formula."""
        if matrix.shape != (self.n_models, self.n_models):
            raise ValueError(f"{key}: pair matrix of shape {matrix.shape}, the group has {self.n_models} models")
        self.pairs[key] = Pairs(matrix, value)


def subset_metrics(stats: PairwiseStats, subsets: Any, *, blas_threads: int | None = 1) -> dict[str, np.ndarray]:
    """Every group metric for each row of ``subsets`` ([R, k] model indices, k >= 2, no repeats).

    Returns arrays of length R for: acc_mean, acc_sd, ce_sd, every key of ``stats.pairs``
    (disagreement, correlation, ensemble_delta, then cka and any added metric), testset_sd. Sums
    over the pairs of a subset S use the indicator vector s: sum_{i<j in S} A_ij = s^T A s / 2 (A
    symmetric, zero diagonal), so R subsets cost two matrix products. Counts stay integers in
    float64 (exact below 2^53), so identical models still give exact zeros.
    """
    with blocks.blas_threads(blas_threads):
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
    C = stats.n_correct[S].astype(np.float64)  # [R, k]
    out: dict[str, np.ndarray] = {
        "acc_mean": F.mean_accuracy(C, n),
        "acc_sd": F.sd_rows(100.0 * C / n),
        "ce_sd": F.sd_rows(stats.ce[S]),
    }
    n_pairs = k * (k - 1) / 2
    solo = (k - 1) * C.sum(axis=1) / 2.0  # each model is in k-1 pairs
    for key, p in stats.pairs.items():
        out[key] = p.value(F.PairSums(_pair_sum(p.matrix, M), n_pairs, solo, n))
    out["testset_sd"] = F.testset_sd(_right_counts(stats.correct, M), k, n)
    return out


def _pair_sum(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """sum_{i<j in S} A_ij for each indicator row of M, by float64 row chunks of ~32 MiB (no N x N copy)."""
    R, N = M.shape
    rows = max(1, 2**22 // max(N, 1))
    AM = np.empty((N, R))
    for a in range(0, N, rows):
        AM[a:a + rows] = A[a:a + rows].astype(np.float64) @ M.T  # integer counts stay exact
    return np.einsum("nr,rn->r", AM, M) / 2.0


def _right_counts(correct: np.ndarray, M: np.ndarray) -> np.ndarray:
    """[R, n]: how many models of each indicator row of M are right on each example (column chunks)."""
    R, N = M.shape
    n = correct.shape[1]
    counts = np.empty((R, n))
    cols = max(1, 2**22 // max(N, 1))
    for a in range(0, n, cols):
        counts[:, a:a + cols] = M @ correct[:, a:a + cols].astype(np.float64)
    return counts


def group_summary(stats: PairwiseStats) -> dict[str, float]:
    """The group's metrics over all its models (see :func:`subset_metrics` for the keys)."""
    N = stats.n_models
    if N < 2:
        acc = stats.accuracies
        return {"acc_mean": float(acc.mean()) if N else math.nan,
                **{k: math.nan for k in ("acc_sd", "ce_sd", *stats.pairs, "testset_sd")}}
    return {k: float(v[0]) for k, v in subset_metrics(stats, np.arange(N)[None]).items()}
