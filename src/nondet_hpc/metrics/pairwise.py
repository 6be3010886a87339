"""The blocked pass over a group's logits: every pair matrix of the logits metrics at once.

Memory: :func:`pairwise_stats` takes a *sequence* of per-model ``[n_test, n_classes]`` arrays (a
stacked ``[N, n, c]`` array works too, and so do ``numpy.load(..., mmap_mode="r")`` memmaps or any
object with ``.shape``, ``.dtype`` and row slicing). It reads the models in blocks of test
examples, so memory is about ``block_bytes`` plus O(N^2 + N * n_test) whatever N is. What the
matrices mean, and the metrics made of them, is in :mod:`.formulas`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import blocks
from . import formulas as F
from .groups import PairwiseStats, Pairs


def pairwise_stats(models: Sequence[blocks.ArrayLike2D], labels: Any, *,
                   summaries: Sequence[F.ModelSummary] | None = None,
                   block_bytes: int = blocks.DEFAULT_BLOCK_BYTES, threads: int | None = 1,
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
      scatter) and one in-place symmetrization at the end gives exact integer counts. The work is
      ~N^2 * n * (unsafe fraction) * c element operations instead of N^2/2 * n * c.

    The result's ``pairs`` hold ``disagreement`` (agreement counts), ``correlation`` and
    ``ensemble_delta`` (right-ensemble counts): counts are int32 (they are at most n_test), the
    correlations float64. Pairwise metrics of other inputs (CKA of the features) join with
    :meth:`PairwiseStats.add`. ``summaries`` (from :func:`summarize_model`) skip the per-model pass
    when the caller already made it. ``progress(done, total)`` is called after each block with the
    test examples done so far (see :func:`progress_line`).
    """
    with _torch_threads(threads):
        return _pairwise_stats(models, labels, summaries, block_bytes, progress)


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


def _pairwise_stats(models: Sequence[blocks.ArrayLike2D], labels: Any, summaries: Sequence[F.ModelSummary] | None,
                    block_bytes: int, progress: Callable[[int, int], None] | None) -> PairwiseStats:
    y, summaries = _checked(models, labels, summaries)
    n, c = tuple(models[0].shape)
    p = _Pass(models, summaries)
    m_block = p.block_rows(n, c, block_bytes)
    since_flush = 0
    for a in range(0, n, m_block):
        b = min(n, a + m_block)
        X = np.stack([_rows(mod, a, b, p.work_dtype) for mod in models])  # [N, m, c]
        p.add(X, y[a:b], a, b)
        del X
        since_flush += b - a
        if since_flush + m_block > _F32_EXACT and b < n:  # keep float32 counts exact: move them to int32
            p.flush()
            since_flush = 0
        if progress is not None:
            progress(b, n)
    agree, ens, corr = p.finish()
    del p
    return PairwiseStats(
        n_examples=n,
        n_correct=np.array([s.n_correct for s in summaries], np.int64),
        ce=np.array([s.ce for s in summaries], np.float64),
        correct=np.stack([s.correct for s in summaries]),
        digests=[s.digest for s in summaries],
        pairs={"disagreement": Pairs(agree, F.disagreement, F.disagreement_resampled),
               "correlation": Pairs(corr),
               "ensemble_delta": Pairs(ens, F.ensemble_delta)},
    )


def _checked(models: Sequence[blocks.ArrayLike2D], labels: Any, summaries: Sequence[F.ModelSummary] | None
             ) -> tuple[np.ndarray, Sequence[F.ModelSummary]]:
    """The labels (int64) and one summary per model, after checking that every model has one shape."""
    N = len(models)
    if N < 1:
        raise ValueError("pairwise_stats needs at least one model")
    shape = tuple(models[0].shape)
    for k, m in enumerate(models):
        if tuple(m.shape) != shape:
            raise ValueError(f"model {k} has logits of shape {tuple(m.shape)}, model 0 has {shape}")
    n, c = shape
    y = F.check_labels(labels, n, c)
    if summaries is None:
        summaries = [F.summarize_model(m, y) for m in models]
    if len(summaries) != N:
        raise ValueError("one summary per model is required")
    return y, summaries


def _rows(x: Any, a: int, b: int, dtype: Any) -> np.ndarray:
    return np.asarray(x[a:b], dtype=dtype)


class _Pass:
    """The accumulators of one blocked pass, and what each block adds to them (see pairwise_stats)."""

    def __init__(self, models: Sequence[blocks.ArrayLike2D], summaries: Sequence[F.ModelSummary]) -> None:
        import torch

        N = self.N = len(models)
        self.summaries = summaries
        self.means = torch.from_numpy(np.array([s.mean for s in summaries], np.float64))
        norms = np.array([s.norm for s in summaries])
        with np.errstate(divide="ignore", invalid="ignore"):
            self.inv_norm = torch.from_numpy(np.where(norms > 0, 1.0 / norms, np.nan))
        self.work_dtype = np.result_type(np.dtype(models[0].dtype), np.float32)
        finfo = np.finfo(self.work_dtype)
        self.tol = 2.0 * float(finfo.eps)  # 4 u, u = eps / 2 the unit roundoff of one addition
        self.big = float(finfo.max) / 4  # beyond this a pair's sum could overflow to inf (and tie)
        # accumulators allocated by numpy (torch views them): tracemalloc then sees the N^2 memory
        self.gram = torch.from_numpy(np.zeros((N, N), np.float64))
        self.agree_f = torch.from_numpy(np.zeros((N, N), np.float32))
        self.ens_f = torch.from_numpy(np.zeros((N, N), np.float32))
        # int32 totals, only needed when a test set is too long for float32 counts
        self.agree: np.ndarray | None = None
        self.ens: np.ndarray | None = None
        self.const_agree = self.const_ens = 0  # examples on which every pair agrees / every model is safe

    def block_rows(self, n: int, c: int, block_bytes: int) -> int:
        """Test examples per block: about ``block_bytes`` held at once, float32 counts kept exact.

        Per example: the block (float32/64 copy + class-major copy), float64 standardized logits
        and margins, and the one-hot/indicator matrices.
        """
        it = np.dtype(self.work_dtype).itemsize
        per_example = self.N * c * (3 * it + 8 + 8 + 4) + self.N * 16
        return int(max(1, min(n, block_bytes // max(per_example, 1), _F32_EXACT)))

    def add(self, X: np.ndarray, yb: np.ndarray, a: int, b: int) -> None:
        """Add the block of test examples a:b (logits X [N, m, c], labels yb) to every accumulator."""
        self._correlation(X)
        self._agreement(X.shape, yb, a, b)
        self._ensemble(X, yb)

    def _correlation(self, X: np.ndarray) -> None:
        import torch

        N, m, c = X.shape
        Z = torch.from_numpy(X.reshape(N, m * c).astype(np.float64))
        Z -= self.means[:, None]
        Z *= self.inv_norm[:, None]
        self.gram.addmm_(Z, Z.T)

    def _agreement(self, shape: tuple[int, ...], yb: np.ndarray, a: int, b: int) -> None:
        import torch

        N, m, c = shape
        pred = torch.from_numpy(np.stack([np.asarray(s.pred[a:b], np.int64) for s in self.summaries]))  # [N, m]
        yt = torch.from_numpy(yb)
        right = pred == yt[None, :]
        W = torch.zeros((N, m, c), dtype=torch.float32)
        W.scatter_(2, pred[:, :, None], (~right).to(torch.float32)[:, :, None])  # one-hot of wrong preds
        K = torch.cat([right.to(torch.float32), W.reshape(N, m * c)], dim=1)
        del W
        K, full = _useful_columns(K, N)
        self.const_agree += full
        if K.shape[1]:
            self.agree_f.addmm_(K, K.T)

    def _ensemble(self, X: np.ndarray, yb: np.ndarray) -> None:
        import torch

        N, m, c = X.shape
        lab = X[:, np.arange(m), yb]  # [N, m] logit of the label
        d = lab[:, :, None].astype(np.float64) - X  # margins of the label over each class
        d[:, np.arange(m), yb] = np.inf
        amax = np.abs(X).max(axis=2).astype(np.float64)
        safe = (d.min(axis=2) > self.tol * amax) & (amax < self.big)  # [N, m]
        del d, amax
        St = torch.from_numpy(safe.astype(np.float32))
        S, full = _useful_columns(St, N)
        self.const_ens += full
        if S.shape[1]:
            self.ens_f.addmm_(S, S.T)
        del S
        _ensemble_unsafe(X, yb, safe, St, self.ens_f)

    def flush(self) -> None:
        """Move the float32 counts into the int32 totals (a test set longer than float32 counts exactly)."""
        self.agree = _flush(self.agree_f, self.agree)
        self.ens = _flush(self.ens_f, self.ens)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(agreement counts, ensemble counts, correlations): exact, symmetric, zero diagonal."""
        if self.ens is not None:  # the symmetrization is linear: apply it to the flushed part too
            _symmetrize_half(self.ens)
        _symmetrize_half(self.ens_f.numpy())
        agree = _to_int32(self.agree_f, self.agree)
        ens = _to_int32(self.ens_f, self.ens)
        agree += np.int32(self.const_agree)
        ens += np.int32(self.const_ens)
        np.fill_diagonal(agree, 0)  # a model agrees with itself everywhere; pair sums skip the diagonal
        np.fill_diagonal(ens, 0)
        corr = self.gram.numpy()
        np.clip(corr, -1.0, 1.0, out=corr)
        blocks.set_identical_pairs(corr, [s.digest for s in self.summaries])
        np.fill_diagonal(corr, 0.0)
        return agree, ens, corr


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
    symmetrizes, see :func:`_symmetrize_half`. Entries are grouped by label L so that the tie rule
    of numpy's argmax is a fixed split of the classes: the ensemble is right iff its label sum
    beats every class below L strictly and every class above L or equals it.
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
