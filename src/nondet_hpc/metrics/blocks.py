"""What the blocked computations over many models share: the memory budget, BLAS threads, exact 1.

The pairwise pass over the logits (:mod:`.pairwise`) and the CKA matrix (:mod:`.formulas`) read
the models in blocks of about ``block_bytes``, so memory stays bounded whatever N is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, Sequence

import numpy as np

DEFAULT_BLOCK_BYTES = 64 * 2**20


class ArrayLike2D(Protocol):
    """What the pairwise functions need of one model's logits: shape, dtype and row slicing."""

    shape: tuple[int, ...]
    dtype: Any

    def __getitem__(self, key: Any) -> Any: ...


def blas_threads(n: int | None) -> contextlib.AbstractContextManager:
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


def set_identical_pairs(mat: np.ndarray, digests: Sequence[bytes]) -> None:
    """Identical arrays correlate exactly 1 (unless constant, where r is undefined and stays NaN)."""
    by_digest: dict[bytes, list[int]] = {}
    for i, d in enumerate(digests):
        by_digest.setdefault(d, []).append(i)
    for idx in by_digest.values():
        if len(idx) > 1:
            ix = np.array(idx)
            block = mat[np.ix_(ix, ix)]
            mat[np.ix_(ix, ix)] = np.where(np.isnan(block), np.nan, 1.0)
