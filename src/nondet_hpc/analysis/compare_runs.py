"""Where did two runs part? ``python -m nondet_hpc.compare RUN_A RUN_B`` (docs/troubleshooting.md).

From two run folders (this sweep's, another sweep's, or copied from another machine): the identity
keys that differ (run.json ``identity``, ``seed``, the stream seeds), the environment facts that
differ (threads, CPU, device and GPU, library versions, precision, kernel settings, the step's
plan, the code's commit), the first recorded point at which the parameters' fingerprints differ,
the distance and probe disagreement at every recorded point, the five parameter tensors that
differ most there, and the final logits' disagreement. Then one verdict:

- ``identical``: every recorded fingerprint, the final weights and the final logits are equal;
- ``differ as their configs imply``: they differ, and so do their identities or environments;
- ``differ although config and environment match``: a source of nondeterminism is not
  controlled, first visible at step k (exit status 1).

Only run.json (JSON), trajectory.npz (arrays, ``allow_pickle=False``), weights.safetensors (its
header) and logits/plain.npy are read, each as a regular file of bounded size; checkpoint.pt and
config.yaml are never opened, and nothing from the folders is executed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..records.trajectory import Trajectory, read_trajectory
from ..records.weights import WeightsFile
from ..rundir import RUN_JSON, TRAJECTORY, WEIGHTS, logits_path
from ..safeio import RefusedFile, load_npy, read_regular

MAX_RUN_JSON = 16 << 20
IDENTICAL, IMPLIED, UNCONTROLLED = "identical", "differ as their configs imply", "not controlled"
#: run.json keys that are not facts of the environment: the identity and seeds (compared apart),
#: the run's own state, results and timings, and what it kept. Every other key (threads, platform
#: and CPU, device and GPU, versions, precision and kernel settings, the step's plan, data hashes,
#: parameter groups, the code's commit, and whatever provenance a later version adds) is compared.
NOT_ENVIRONMENT = frozenset({
    "run_id", "state", "attempts", "seed", "experiment", "group_key", "group_label", "identity", "source", "seeds",
    "bitflip", "started", "finished", "heartbeat", "timings", "result", "views", "snapshots", "features", "record",
    "resumed_from", "preempted", "error", "host", "pid", "slurm", "updated"})
#: leaves of those keys that say where, not what (a copy from another machine has other paths)
WHERE = ("data.root", "data.path", "data.folder")
#: differences shown but not decisive (a copy on another host computes the same)
INFORMATIONAL = ("host",)


class CompareError(ValueError):
    """A folder that is not a run folder this command can read; the message says which and why."""


@dataclass
class Point:
    step: int
    epoch: float
    same: bool  # fingerprints equal
    distance: float  # ||s_a - s_b|| from the sketches (absolute)
    relative: float  # percent of the pair's mean norm
    disagreement: float  # percent of the probe images predicted differently


@dataclass
class Comparison:
    a: Path
    b: Path
    identity: list[tuple[str, Any, Any]]
    environment: list[tuple[str, Any, Any]]
    informational: list[tuple[str, Any, Any]]
    points: list[Point] = field(default_factory=list)
    first: Optional[Point] = None  # the first recorded point at which the fingerprints differ
    tensors: list[tuple[str, float]] = field(default_factory=list)  # at ``first``: (name, |norm_a - norm_b|)
    weights: Optional[tuple[bool, float]] = None  # (fingerprints equal, exact distance) of the final weights
    logits: Optional[tuple[bool, float, float]] = None  # (bytes equal, disagreement %, max |difference|)
    notes: list[str] = field(default_factory=list)

    @property
    def differ(self) -> bool:
        return (self.first is not None or (self.weights is not None and not self.weights[0])
                or (self.logits is not None and not self.logits[0]))

    @property
    def verdict(self) -> str:
        if not self.differ:
            return IDENTICAL
        return IMPLIED if self.identity or self.environment else UNCONTROLLED


def _run_json(folder: Path) -> dict:
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder: give two run folders (SWEEP_DIR/runs/<run id>).")
    try:
        data = json.loads(read_regular(folder / RUN_JSON, MAX_RUN_JSON).decode("utf-8"))
    except RefusedFile as e:
        raise CompareError(f"{folder} is not a run folder: {e.why} ({RUN_JSON}).") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CompareError(f"{folder / RUN_JSON} is not JSON ({e}); nothing can be compared.") from None
    if not isinstance(data, dict) or "identity" not in data:
        raise CompareError(f"{folder / RUN_JSON} is not a run record of this package (no identity).")
    return data


def _flat(prefix: str, node: Any, out: dict) -> None:
    if isinstance(node, dict):
        for k in sorted(node):
            _flat(f"{prefix}.{k}" if prefix else str(k), node[k], out)
    else:
        out[prefix] = node


def _differences(a: dict, b: dict, keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    fa, fb = {}, {}
    for k in keys:
        if k in a:
            _flat(k, a[k], fa)
        if k in b:
            _flat(k, b[k], fb)
    return [(k, fa.get(k, "(not recorded)"), fb.get(k, "(not recorded)")) for k in sorted(set(fa) | set(fb))
            if fa.get(k, "(not recorded)") != fb.get(k, "(not recorded)") and k not in WHERE]


def _identity(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """Identity keys (run.json ``identity``), the replicate seed and each stream's seed that differ."""
    def keys(r: dict) -> dict:
        return {**(r.get("identity") or {}), "seed": r.get("seed"),
                **{f"seeds.{k}": v for k, v in (r.get("seeds") or {}).items()}}

    ka, kb, missing = keys(a), keys(b), "(not recorded)"
    return [(k, ka.get(k, missing), kb.get(k, missing)) for k in sorted(set(ka) | set(kb))
            if ka.get(k, missing) != kb.get(k, missing)]


def _trajectory(folder: Path, notes: list[str]) -> Optional[Trajectory]:
    path = folder / TRAJECTORY
    if not path.exists() and not path.is_symlink():
        notes.append(f"{folder.name}: no {TRAJECTORY} (record.trajectory=false or an older version): the first "
                     f"divergent point cannot be told, only whether the final results differ")
        return None
    try:
        return read_trajectory(path)
    except RefusedFile as e:
        notes.append(f"{path}: refused ({e.why}); compared without it")
        return None


def _points(c: Comparison, ta: Trajectory, tb: Trajectory) -> None:
    common, ia, ib = np.intersect1d(ta.step, tb.step, return_indices=True)
    if len(common) < min(len(ta.step), len(tb.step)):
        c.notes.append(f"recorded on different grids: {len(common)} common points compared")
    same_layout = np.array_equal(ta.tensor_name, tb.tensor_name) and np.array_equal(ta.tensor_size, tb.tensor_size)
    same_sketch = ta.sketch.shape[1] == tb.sketch.shape[1] and ta.sketch_key == tb.sketch_key and same_layout
    same_probe = np.array_equal(ta.probe_index, tb.probe_index) and ta.probe_logits.shape[2] == tb.probe_logits.shape[2]
    if not same_layout:
        c.notes.append("the two models have different parameter tensors: only fingerprints are compared")
    pa, pb = ta.predictions(), tb.predictions()
    for s, i, j in zip(common, ia, ib):
        same = bool(np.array_equal(ta.fingerprint[i], tb.fingerprint[j]))
        d = float(np.linalg.norm(ta.sketch[i] - tb.sketch[j])) if same_sketch else math.nan
        scale = (ta.param_norm[i] + tb.param_norm[j]) / 2.0
        rel_ = 100.0 * d / scale if scale > 0 and d > 0 else (0.0 if d == 0 else math.nan)
        dis = 100.0 * float(np.mean(pa[i] != pb[j])) if same_probe and pa.shape[1] else math.nan
        c.points.append(Point(int(s), float(s) / ta.steps_per_epoch, same, d, rel_, dis))
        if not same and c.first is None:
            c.first = c.points[-1]
            if same_layout:
                differ = np.flatnonzero(np.any(ta.tensor_digest[i] != tb.tensor_digest[j], axis=1))
                gap = np.abs(ta.tensor_norm[i, differ] - tb.tensor_norm[j, differ])
                order = np.argsort(-gap, kind="stable")[:5]
                c.tensors = [(str(ta.tensor_name[differ[k]]), float(gap[k])) for k in order]


def _weights(c: Comparison) -> None:
    pa, pb = c.a / WEIGHTS, c.b / WEIGHTS
    if not (pa.exists() and pb.exists()):
        return
    try:
        with WeightsFile(pa) as wa, WeightsFile(pb) as wb:
            same = wa.fingerprint_hex == wb.fingerprint_hex
            if wa.layout != wb.layout:
                c.weights = (same, math.nan)
                return
            n, step, sq = wa.layout.n_values, 1 << 22, 0.0
            for lo in range(0, n, step):
                d = wa.flat_range(lo, min(n, lo + step)).astype(np.float64) - \
                    wb.flat_range(lo, min(n, lo + step)).astype(np.float64)
                sq += float(d @ d)
            c.weights = (same, math.sqrt(sq))
    except RefusedFile as e:
        c.notes.append(f"weights refused ({e}); compared without them")


def _logits(c: Comparison) -> None:
    pa, pb = logits_path(c.a, "plain"), logits_path(c.b, "plain")
    try:  # regular files of bounded size only, never unpickled (safeio)
        la, lb = load_npy(pa, mmap=True), load_npy(pb, mmap=True)
    except (RefusedFile, ValueError, OSError) as e:
        c.notes.append(f"final logits not compared: {e}")
        return
    if la.shape != lb.shape or la.ndim != 2:
        c.notes.append(f"final logits not compared: shapes {la.shape} and {lb.shape} (other test sets?)")
        return
    same = la.dtype == lb.dtype and np.array_equal(np.asarray(la), np.asarray(lb))
    dis = 100.0 * float(np.mean(np.argmax(la, axis=1) != np.argmax(lb, axis=1))) if len(la) else math.nan
    diff = float(np.max(np.abs(np.asarray(la, np.float64) - np.asarray(lb, np.float64)))) if la.size else 0.0
    c.logits = (bool(same), dis, diff)


def compare_runs(a: Path | str, b: Path | str) -> Comparison:
    """Compare two run folders (read only; see the module docstring)."""
    a, b = Path(a), Path(b)
    ra, rb = _run_json(a), _run_json(b)
    environment = tuple(sorted((set(ra) | set(rb)) - NOT_ENVIRONMENT))
    c = Comparison(a, b, _identity(ra, rb), _differences(ra, rb, environment), _differences(ra, rb, INFORMATIONAL))
    for folder, r in ((a, ra), (b, rb)):
        if r.get("state") != "done":
            c.notes.append(f"{folder.name} is not finished (state {r.get('state')!r}): compared as far as recorded")
    ta, tb = _trajectory(a, c.notes), _trajectory(b, c.notes)
    if ta is not None and tb is not None:
        _points(c, ta, tb)
    _weights(c)
    _logits(c)
    return c


# ----------------------------------------------------------------------------------------- text
def _pairs(rows: list[tuple[str, Any, Any]]) -> list[str]:
    return [f"  {k}: {json.dumps(x, default=str)} | {json.dumps(y, default=str)}" for k, x, y in rows]


def _num(x: float) -> str:
    return "-" if not math.isfinite(x) else ("0" if x == 0 else f"{x:.4g}")


def verdict_line(c: Comparison) -> str:
    where = (f"step {c.first.step} (epoch {c.first.epoch:.3g})" if c.first is not None else
             "the end of training (no recorded point differs, or none was recorded)")
    if c.verdict == IDENTICAL:
        extra = " (their configs or environments differ in ways that did not change the computation)" \
            if c.identity or c.environment else ""
        return (f"Verdict: identical: every recorded fingerprint, the final weights and the final logits are "
                f"equal{extra}.")
    if c.verdict == IMPLIED:
        what = " and ".join(w for w, rows in (("identity keys", c.identity), ("environment", c.environment)) if rows)
        return f"Verdict: differ as their configs imply ({what} differ, listed above); first visible at {where}."
    return (f"Verdict: differ although config and environment match: a source of nondeterminism is not "
            f"controlled, first visible at {where}.")


def render(c: Comparison) -> str:
    """The command's report: what differs, where they parted, and the verdict (last line)."""
    lines = [f"A: {c.a}", f"B: {c.b}", ""]
    lines += ["Identity keys that differ (A | B):", *(_pairs(c.identity) or ["  none"])]
    lines += ["Environment facts that differ (A | B):", *(_pairs(c.environment) or ["  none"])]
    if c.informational:
        lines += ["Also different, not deciding the arithmetic:", *_pairs(c.informational)]
    if c.points:
        lines += ["", f"Recorded points ({len(c.points)}): distance from the count sketches (absolute, and in % of the "
                      f"pair's mean norm); probe disagreement in % of the probe images",
                  f"  {'step':>8} {'epoch':>8}  {'fingerprints':<12} {'distance':>11} {'% of norm':>10} "
                  f"{'probe %':>8}"]
        lines += [f"  {p.step:>8} {p.epoch:>8.3g}  {'same' if p.same else 'DIFFER':<12} {_num(p.distance):>11} "
                  f"{_num(p.relative):>10} {_num(p.disagreement):>8}" for p in c.points]
    if c.first is not None:
        lines += ["", f"First divergent point: step {c.first.step} (epoch {c.first.epoch:.3g}). Parameter tensors "
                      f"that differ most there (|difference of their norms|, a lower bound of their distance):"]
        lines += [f"  {name}: {gap:.3g}" for name, gap in c.tensors] or ["  (tensors not comparable)"]
    elif c.points:
        lines += ["", "Fingerprints: equal at every recorded point."]
    if c.weights is not None:
        lines += [f"Final weights: {'identical' if c.weights[0] else 'differ'}, exact distance {_num(c.weights[1])}."]
    if c.logits is not None:
        same, dis, diff = c.logits
        lines += ["Final logits (plain): " + ("identical." if same else
                  f"differ: predictions disagree on {dis:.2f} % of the test images, largest logit difference "
                  f"{diff:.3g}.")]
    if c.notes:
        lines += ["", "Notes:", *[f"  {n}" for n in c.notes]]
    return "\n".join(lines + ["", verdict_line(c)])
