"""How far a group's runs have drifted apart at each recorded point, streamed over its trajectories.

For a group of N runs recorded on the same grid (records/schedule.py), at each point t:

- parameter distance, from the count sketches s_a(t) (records/projection.py)::

      dist(t) = mean_{a<b} ||s_a(t) - s_b(t)||_2          (estimates mean_{a<b} ||theta_a - theta_b||)
      norm(t) = mean_a ||theta_a(t)||_2                   (exact, from the per-tensor norms)
      rel(t)  = 100 * mean_{a<b} ||s_a(t) - s_b(t)|| / ((||theta_a(t)|| + ||theta_b(t)||) / 2)

  rel is in percent of each pair's mean norm, the definition of the report's final parameter
  distance (metric ``param_distance``, from the weights files), so the curve's last point
  estimates that metric.

  The sketch estimate of one distance is within about ``1/sqrt(2 D)`` of it (one SD; 1.1 % at
  D = 4096: :func:`nondet_hpc.records.projection.relative_sd`).
- probe disagreement, in percent of the K probe examples, with ``p_a`` the argmax of run a's
  probe logits (ties to the lowest class)::

      dis(t) = 100 * mean_{a<b} (1/K) sum_k [p_a(t)_k != p_b(t)_k]
             = 100 * (1 - sum_k sum_c n_kc (n_kc - 1) / 2 / (K * N (N - 1) / 2))

  with ``n_kc`` the number of runs predicting class c on example k: counts, so the runs are
  added one at a time.
- the first point at which the fingerprints of any two runs differ (None: never; for the
  determinism control every point must be identical).

Memory: a run is read, reduced and dropped (:class:`GroupAccumulator`); what is kept per run is
its sketch minus the first run's, in float32 (``N * T * D * 4`` bytes: 100 runs x 20 points x
4096 buckets = 33 MB), its T norms and nothing of its probe logits but the class counts
(``T * K * C`` integers for the whole group). Keeping the difference to the first run keeps
identical runs at exactly 0 and a one-ulp difference exact (a power of two), and rounds other
differences only to float32's 6e-8 relative, far below the sketch's own error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from ..records.trajectory import Trajectory


class InstabilityError(ValueError):
    """Trajectories that cannot be compared (other grid, probe, projection or model); names the run."""


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """float64 [N, N] Euclidean distances between the rows of ``x`` ([N, D]), differences taken in
    float64 row by row (no Gram matrix: identical rows give exactly 0, tiny ones keep their digits)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n - 1):
        d = x[i + 1:] - x[i]
        out[i, i + 1:] = np.sqrt(np.einsum("ij,ij->i", d, d))
    return out + out.T


def pair_mean(matrix: np.ndarray) -> float:
    """Mean of the entries above the diagonal (NaN for fewer than two runs)."""
    n = len(matrix)
    return float(matrix[np.triu_indices(n, 1)].mean()) if n >= 2 else math.nan


@dataclass
class GroupCurve:
    """One group's divergence at each recorded point (see the module docstring for formulas)."""

    run_ids: list[str]
    step: np.ndarray  # int64 [T]
    epoch: np.ndarray  # float64 [T]
    distance: np.ndarray  # float64 [T]: mean pairwise sketch distance
    mean_norm: np.ndarray  # float64 [T]: mean parameter norm
    disagreement: np.ndarray  # float64 [T]: percent of probe examples, mean over pairs
    first_split: Optional[int]  # step of the first point where two runs' fingerprints differ; None = never
    final_sketch_distances: np.ndarray = field(repr=False)  # float64 [N, N] at the last point
    rel_distance: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 [T]: percent, see above
    identical: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # bool [T]: all fingerprints equal
    final_norms: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # float64 [N] at the end
    sketch_dim: int = 0  # D of the runs' count sketches
    split_run: Optional[str] = None  # the first run whose fingerprints differ from the first run's somewhere

    @property
    def n_runs(self) -> int:
        return len(self.run_ids)


class GroupAccumulator:
    """Adds a group's trajectories one at a time (:meth:`add`), then :meth:`curve`."""

    def __init__(self) -> None:
        self.ref: Optional[Trajectory] = None
        self.run_ids: list[str] = []
        self.deltas: list[np.ndarray] = []  # float32 [T, D] per run: its sketch minus the first run's
        self.norms: list[np.ndarray] = []  # float64 [T] per run
        self.split: Optional[np.ndarray] = None  # bool [T]: some run's fingerprint differs from the first's
        self.split_run: Optional[str] = None  # the first run that differs from the first run
        self.counts: Optional[np.ndarray] = None  # int32 [T, K, C]: runs predicting class c on example k

    def _check(self, t: Trajectory) -> None:
        r = self.ref
        assert r is not None
        same = {"step grid": np.array_equal(t.step, r.step), "steps per epoch": t.steps_per_epoch == r.steps_per_epoch,
                "projection": t.sketch_key == r.sketch_key and t.sketch.shape == r.sketch.shape,
                "probe examples": np.array_equal(t.probe_index, r.probe_index)
                and np.array_equal(t.probe_label, r.probe_label) and t.probe_logits.shape == r.probe_logits.shape,
                "parameter tensors": np.array_equal(t.tensor_name, r.tensor_name)
                and np.array_equal(t.tensor_size, r.tensor_size)}
        differ = [k for k, ok in same.items() if not ok]
        if differ:
            raise InstabilityError(f"run {t.run_id} cannot be compared with run {r.run_id} of its group: "
                                   f"{', '.join(differ)} differ")

    def add(self, t: Trajectory) -> None:
        if self.ref is None:
            self.ref = t
            T, K, C = t.probe_logits.shape
            self.split = np.zeros(T, dtype=bool)
            self.counts = np.zeros((T, K, C), dtype=np.int32)
        else:
            self._check(t)
        assert self.split is not None and self.counts is not None
        self.run_ids.append(t.run_id)
        self.deltas.append((t.sketch - self.ref.sketch).astype(np.float32))
        self.norms.append(t.param_norm)
        differs = np.any(t.fingerprint != self.ref.fingerprint, axis=1)
        if self.split_run is None and differs.any():
            self.split_run = t.run_id
        self.split |= differs
        T, K, C = self.counts.shape
        if K and C:
            pred = t.predictions()  # [T, K]
            np.add.at(self.counts, (np.arange(T)[:, None], np.arange(K)[None, :], pred), 1)

    def curve(self) -> GroupCurve:
        if self.ref is None:
            raise InstabilityError("a group without trajectories has no divergence curve")
        assert self.split is not None and self.counts is not None
        n, T = len(self.run_ids), self.ref.n_points
        dist, rel, final = np.full(T, math.nan), np.full(T, math.nan), np.zeros((n, n))
        norms = np.stack(self.norms)  # [N, T]
        for t in range(T):
            m = pairwise_distances(np.stack([d[t] for d in self.deltas]))
            dist[t] = pair_mean(m)
            scale = (norms[:, t][:, None] + norms[:, t][None, :]) / 2.0
            with np.errstate(divide="ignore", invalid="ignore"):
                rel[t] = pair_mean(np.where(m > 0, 100.0 * m / scale, 0.0))
            final = m
        K = self.counts.shape[1]
        if n >= 2 and K:
            agree = (self.counts.astype(np.int64) * (self.counts - 1) // 2).sum(axis=(1, 2))
            dis = 100.0 * (1.0 - agree / (K * n * (n - 1) / 2))
        else:
            dis = np.full(T, math.nan)
        first = int(self.ref.step[np.argmax(self.split)]) if self.split.any() else None
        return GroupCurve(self.run_ids, self.ref.step.copy(), self.ref.epoch, dist, norms.mean(axis=0), dis, first,
                          final, rel, ~self.split, norms[:, -1].copy() if T else np.zeros(n),
                          int(self.ref.sketch.shape[1]), self.split_run)


def group_curve(trajectories: Iterable[Trajectory]) -> GroupCurve:
    """The divergence curve of the runs of one group, read one at a time (e.g. a generator)."""
    acc = GroupAccumulator()
    for t in trajectories:
        acc.add(t)
    return acc.curve()
