"""The numbers of the report's Instability section, from trajectories, weights files and run.json.

Notation: theta_a(t) are run a's parameters after t optimizer steps (the flat vector of
records/projection.py), T the last step, ||.|| the L2 norm over all parameters.

Initial change (exact). A bit-change run differs from its unperturbed twin in one float32 weight,
moved by one ulp: run.json's ``bitflip`` record ``{index, shape, old, new, ...}`` gives
``||theta_b(0) - theta_0(0)|| = |new - old|`` (:func:`initial_change`). Two bit-change runs of one
group differ in two weights (or in one, moved to its two neighbours, or not at all).

Condition number of training (the paper's quantity; it bounds it below by about 10^7)::

    kappa = (||theta_b(T) - theta_0(T)|| / ||theta_0(T)||) / (||theta_b(0) - theta_0(0)|| / ||theta_0(0)||)

the relative change of the final parameters over the relative change of the initial ones, for a
bit-change run b and its twin 0 (the run with the same identity and no bit change). The final
distance is exact (weights files, :func:`exact_distance`), the initial one exact (run.json), the
norms exact. Without a twin, pairs within the bit-change group, with b's partner in the role of 0.

How fast (per pair, d(t) = ||s_b(t) - s_0(t)|| from the sketches, d(0) the exact initial change):

- growth over the first epoch ``g = d(E) / d(0)``, E the steps of one epoch;
- e-folding time ``tau``: the least-squares fit of ``ln d(t) = alpha + t / tau`` over the points
  with d(t) > 0 before the first one at which d reaches ``level`` (default 1/2) of its largest
  value: the exponential phase, before the divergence levels off;
- saturation: the first recorded point at which the bit-change group's divergence (mean pairwise
  relative sketch distance) reaches ``fraction`` (0.9) of the reference group's (all sources, or
  init): "a one-ulp change is as good as a new seed after N steps".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..metrics import flat_distances
from ..records.trajectory import Trajectory
from ..records.weights import WeightsFile
from .divergence import InstabilityError

#: float64 values held per run when weights are streamed (64 MiB over all runs of a block)
BLOCK_BYTES = 64 << 20


# --- exact distances -------------------------------------------------------------------------
def _check_layouts(files: Sequence[WeightsFile]) -> None:
    for f in files[1:]:
        if f.layout != files[0].layout:
            raise InstabilityError(f"weights of run {f.run_id} and run {files[0].run_id} have different parameter "
                                   f"tensors; they cannot be compared")


def exact_distance(a: WeightsFile, b: WeightsFile, block_bytes: int = BLOCK_BYTES) -> tuple[float, float, float]:
    """(||theta_a - theta_b||, ||theta_a||, ||theta_b||) over all parameters, float64, in blocks.

    Differences of two float32 values are exact in float64; only the sums round.
    """
    _check_layouts([a, b])
    (d, norms) = flat_distances([a, b], block_bytes)
    return float(d[0, 1]), float(norms[0]), float(norms[1])


def final_distance_matrix(files: Sequence[WeightsFile], block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """float64 [N, N]: exact pairwise parameter distances of N weights files, streamed in blocks of
    the flat vector, ``block_bytes`` of float64 values over all N runs at a time (memory about three
    times that with the float32 reads and one row's differences), differences row by row (exact
    zeros for copies). Time: N^2 / 2 x P subtractions (100 digits ResNet-14 runs: ~3 s here)."""
    _check_layouts(files)
    return flat_distances(files, block_bytes)[0]


def sketch_errors(sketch: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Relative errors ``(sketch - exact) / exact`` of the pairs i<j with exact > 0."""
    iu = np.triu_indices(len(exact), 1)
    s, e = sketch[iu], exact[iu]
    keep = e > 0
    return (s[keep] - e[keep]) / e[keep]


# --- the initial change ----------------------------------------------------------------------
def _delta(r: dict) -> float:
    return float(r["new"]) - float(r["old"])


def initial_change(a: dict, b: Optional[dict] = None) -> float:
    """Exact ``||theta_a(0) - theta_b(0)||`` from bit-change records (b None: a's unperturbed twin).

    Both records must describe the same tensor (shape) of the same base weights: a shared index
    must have the same old value.
    """
    if b is None:
        return abs(_delta(a))
    if list(a["shape"]) != list(b["shape"]):
        raise InstabilityError(f"bit changes in tensors of shapes {a['shape']} and {b['shape']}: not one model")
    if int(a["index"]) != int(b["index"]):
        return math.hypot(_delta(a), _delta(b))
    if float(a["old"]) != float(b["old"]):
        raise InstabilityError("two bit changes of one weight start from different values: not the same base weights")
    return abs(float(a["new"]) - float(b["new"]))


def condition_number(final_distance: float, final_norm: float, initial_distance: float, initial_norm: float) -> float:
    """``(final_distance / final_norm) / (initial_distance / initial_norm)`` (NaN when undefined)."""
    if not (initial_distance > 0 and final_norm > 0 and initial_norm > 0):
        return math.nan
    return (final_distance / final_norm) / (initial_distance / initial_norm)


def twin_key(info: dict) -> str:
    """Equal for a bit-change run and the runs that are its unperturbed twin: run.json's identity
    without the source's name, label and varied streams and without the replicate seed, and the
    stream seeds without the bit change's. A twin is a run with this key and ``bitflip`` null
    (the control, or any source's replicate whose seeds are all 1: the same computation)."""
    identity = {k: v for k, v in (info.get("identity") or {}).items()
                if k not in ("source.name", "source.label", "source.vary", "seed")}
    seeds = {k: v for k, v in (info.get("seeds") or {}).items() if k != "bitflip"}
    return json.dumps([identity, seeds], sort_keys=True, default=str)


# --- two runs: where they part --------------------------------------------------------------------
def first_divergence(a: Trajectory, b: Trajectory) -> Optional[int]:
    """Index of the first point (same grid) at which the fingerprints differ; None: never."""
    if not np.array_equal(a.step, b.step):
        raise InstabilityError(f"runs {a.run_id} and {b.run_id} were not recorded on the same grid")
    differ = np.any(a.fingerprint != b.fingerprint, axis=1)
    return int(np.argmax(differ)) if differ.any() else None


def differing_tensors(a: Trajectory, b: Trajectory, point: int, top: int = 5) -> list[tuple[str, float]]:
    """The parameter tensors whose bytes differ at ``point`` (their digests), as ``(name, |norm_a -
    norm_b|)``, largest first, at most ``top``. The norm difference is a lower bound of the tensor's
    distance (triangle inequality), the one the trajectory keeps exactly."""
    if not np.array_equal(a.tensor_name, b.tensor_name):
        raise InstabilityError(f"runs {a.run_id} and {b.run_id} have different parameter tensors")
    differ = np.flatnonzero(np.any(a.tensor_digest[point] != b.tensor_digest[point], axis=1))
    gap = np.abs(a.tensor_norm[point, differ] - b.tensor_norm[point, differ])
    order = np.argsort(-gap, kind="stable")[:top]
    return [(str(a.tensor_name[differ[k]]), float(gap[k])) for k in order]


# --- how fast and when ------------------------------------------------------------------------
def pair_divergence(a: Trajectory, b: Trajectory, initial: Optional[float] = None) -> np.ndarray:
    """float64 [T]: ``||s_a(t) - s_b(t)||`` at each point; the step-0 value replaced by the exact
    ``initial`` change when given (the sketch gives it too, see projection.py)."""
    if not np.array_equal(a.step, b.step) or a.sketch.shape != b.sketch.shape or a.sketch_key != b.sketch_key:
        raise InstabilityError(f"runs {a.run_id} and {b.run_id} were not recorded on the same grid and projection")
    diff = a.sketch - b.sketch
    d = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    if initial is not None and len(d) and a.step[0] == 0:
        d[0] = initial
    return d


def growth_factor(step: np.ndarray, d: np.ndarray, steps_per_epoch: int) -> float:
    """``d(E) / d(0)`` with E = one epoch of steps (NaN without both points or with d(0) = 0)."""
    where = {int(s): k for k, s in enumerate(step)}
    if 0 not in where or steps_per_epoch not in where or not d[where[0]] > 0:
        return math.nan
    return float(d[where[steps_per_epoch]] / d[where[0]])


def efolding_steps(step: np.ndarray, d: np.ndarray, level: float = 0.5) -> float:
    """tau of ``ln d(t) = alpha + t / tau`` fitted (least squares) before d first reaches
    ``level * max(d)``; NaN with fewer than two such points with d > 0, or no growth."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    if not finite.any() or not np.nanmax(d) > 0:
        return math.nan
    top = level * np.max(d[finite])
    stop = int(np.argmax(d >= top))  # the first point at or above the level
    use = np.arange(stop)
    use = use[(d[use] > 0) & finite[use]]
    if len(use) < 2:
        return math.nan
    slope = np.polyfit(np.asarray(step, dtype=np.float64)[use], np.log(d[use]), 1)[0]
    return float(1.0 / slope) if slope > 0 else math.nan


def saturation_step(step: np.ndarray, curve: np.ndarray, ref_step: np.ndarray, reference: np.ndarray,
                    fraction: float = 0.9) -> Optional[int]:
    """The first step (common to both grids) at which ``curve >= fraction * reference`` with a
    positive reference; None if never."""
    ref = {int(s): float(v) for s, v in zip(ref_step, reference)}
    for s, v in zip(step, curve):
        r = ref.get(int(s))
        if r is not None and r > 0 and v >= fraction * r:
            return int(s)
    return None


# --- per pair ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairResult:
    """A bit-change run against its twin (or a partner of its group): every per-pair number."""

    run: str
    other: str
    initial_distance: float  # exact, from run.json
    initial_sketch_distance: float  # the same from the sketches at step 0 (equal for a one-ulp change)
    initial_norm: float  # ||theta_other(0)||
    final_distance: float  # exact, from the weights files
    final_sketch_distance: float  # the same from the sketches at the last point
    final_norm: float  # ||theta_other(T)||, exact
    condition_number: float
    growth_first_epoch: float
    efolding_steps: float


def pair_result(a: Trajectory, b: Trajectory, wa: WeightsFile, wb: WeightsFile, initial: float,
                level: float = 0.5) -> PairResult:
    """Every per-pair number of run a against run b (b: the twin, whose norms are the reference)."""
    d = pair_divergence(a, b)
    final, _, final_norm = exact_distance(wa, wb)
    init_norm = float(b.param_norm[0]) if len(b.step) and b.step[0] == 0 else math.nan
    curve = d.copy()
    if len(curve) and a.step[0] == 0:
        curve[0] = initial
    return PairResult(a.run_id, b.run_id, initial, float(d[0]) if len(d) else math.nan, init_norm, final,
                      float(d[-1]) if len(d) else math.nan, final_norm,
                      condition_number(final, final_norm, initial, init_norm),
                      growth_factor(a.step, curve, a.steps_per_epoch), efolding_steps(a.step, curve, level))


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and count of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


# --- two groups ---------------------------------------------------------------------------------
def _pair_means(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean over pairs of distinct models of each resample (row of ``idx``), copies of a model
    with itself left out: ``(w^T A w) / ((sum w)^2 - sum w^2)`` with w the draw counts."""
    N = len(matrix)
    W = np.zeros((len(idx), N))
    np.add.at(W, (np.arange(len(idx))[:, None], idx), 1.0)
    pairs = W.sum(1) ** 2 - np.einsum("rn,rn->r", W, W)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, np.einsum("rn,nm,rm->r", W, matrix, W) / pairs, np.nan)


def pair_mean_ratio_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(ratio, low, high): mean over pairs of ``a`` over that of ``b`` (two groups' [N, N] pair
    matrices, e.g. final distances of the bit-change and the all-sources group) and its percentile
    bootstrap interval, the models of each group resampled with replacement independently."""
    ratio = pair_mean_ratio(a, b)
    rng = np.random.default_rng(seed)
    ra = _pair_means(a, rng.integers(0, len(a), size=(n_boot, len(a))))
    rb = _pair_means(b, rng.integers(0, len(b), size=(n_boot, len(b))))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ra / rb
    r = r[np.isfinite(r)]
    if not len(r):
        return ratio, math.nan, math.nan
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return ratio, float(lo), float(hi)


def pair_mean_ratio(a: np.ndarray, b: np.ndarray) -> float:
    ia, ib = np.triu_indices(len(a), 1), np.triu_indices(len(b), 1)
    if not len(ia[0]) or not len(ib[0]):
        return math.nan
    mb = float(b[ib].mean())
    return float(a[ia].mean()) / mb if mb > 0 else math.nan
