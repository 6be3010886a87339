"""SWEEP_DIR/barriers/: the loss barrier between two runs of one group, one JSON file per pair.

The ONE module that names, writes and reads these files (``python -m nondet_hpc.barriers``
writes them through :mod:`nondet_hpc.run.barriers`; the reducer reads them). Torch-free.

Definition (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis";
Altintas et al. 2025, "The Butterfly Effect"). For the final parameters theta_a, theta_b of two
runs and alpha_0 = 0 < alpha_1 < ... < alpha_{n-1} = 1, the model at alpha is
``theta(alpha) = theta_a + alpha (theta_b - theta_a)`` with its BatchNorm statistics recomputed on
a fixed subset of training images (no augmentation). With f(alpha) its test loss (or test error),
the barrier is the largest excess of f over the straight line between the two end points::

    barrier = max_i [ f(alpha_i) - (f(0) + alpha_i (f(1) - f(0))) ]

which is >= 0 (the end points have excess 0) and exactly 0 for a model with itself: the
interpolation above gives theta_a at every alpha when theta_b == theta_a, and the line is written
so that two equal end values give that value at every alpha (:func:`barrier_height`).

File ``barriers/<run a>__<run b>.json`` (run ids sorted; a run with itself: ``<a>__<a>.json``)::

    {"format": "nondet_hpc.barrier", "version": 1, "runs": [a, b], "fingerprints": [hex, hex],
     "group_key", "group_label", "source", "alpha": [...], "test_loss": [...], "test_error": [...] (%),
     "barrier_loss", "barrier_error", "alpha_loss", "alpha_error" (where the excess is largest),
     "bn": {"recomputed", "images", "n_train", "rule", "indices_sha256", "batch_size", "batches",
            "augmentation"}, "n_test", "eval_batch_size", "device", "threads", "versions", "host",
     "seconds", "time"}

Reading checks the shape of every field and recomputes both barriers from the stored curves
(a file whose stored barrier disagrees with its own curve is refused); only regular files of at
most MAX_RECORD_BYTES are opened (:mod:`nondet_hpc.safeio`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..safeio import RefusedFile, read_regular, write_bytes

FORMAT = "nondet_hpc.barrier"
VERSION = 1
FOLDER = "barriers"  # SWEEP_DIR/barriers/
SEPARATOR = "__"
SUFFIX = ".json"
MAX_RECORD_BYTES = 1 << 20
#: a run id as rundir.run_id writes it (source names may hold "+"): nothing that leaves the folder
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
CURVES = ("test_loss", "test_error")
#: settings that must be equal for a stored pair to count as done (besides the two fingerprints)
SETTINGS = ("points", "bn_images")


class BarrierError(ValueError):
    """Bad input to the barrier math (alphas not 0..1 increasing, curves of other lengths)."""


def alphas(points: int) -> np.ndarray:
    """float64 [points]: 0, 1/(points-1), ..., 1 (i / (points - 1), so 0 and 1 are exact)."""
    if int(points) < 2:
        raise BarrierError(f"--points {points}: the straight line needs at least its 2 end points (default 11).")
    n = int(points) - 1
    return np.arange(n + 1, dtype=np.float64) / n


def excess(alpha: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """float64 [n]: f(alpha_i) minus the straight line between f(0) and f(1) at alpha_i."""
    a, v = np.asarray(alpha, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.shape != v.shape or a.size < 2:
        raise BarrierError(f"alpha and values must be 1-D of one length >= 2 (got {a.shape} and {v.shape})")
    if a[0] != 0.0 or a[-1] != 1.0 or np.any(np.diff(a) <= 0):
        raise BarrierError("alpha must increase from exactly 0 to exactly 1")
    if not np.all(np.isfinite(v)):
        raise BarrierError("the curve has a value that is not finite")
    # f(0) + alpha (f(1) - f(0)): equal end values give exactly that value at every alpha
    return v - (v[0] + a * (v[-1] - v[0]))


def barrier_height(alpha: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """(largest excess over the straight line, the alpha where it is largest; the first on ties)."""
    e = excess(alpha, values)
    i = int(np.argmax(e))
    return float(e[i]), float(np.asarray(alpha, dtype=np.float64)[i])


def pair_name(a: str, b: str) -> str:
    """The file name of the pair (run ids sorted)."""
    for rid in (a, b):
        if not _RUN_ID.match(rid) or SEPARATOR in rid:
            raise BarrierError(f"{rid!r} is not a run id")
    lo, hi = sorted((a, b))
    return f"{lo}{SEPARATOR}{hi}{SUFFIX}"


def record_path(sweep_dir: Path | str, a: str, b: str) -> Path:
    return Path(sweep_dir) / FOLDER / pair_name(a, b)


def make_record(*, runs: Sequence[str], fingerprints: Sequence[str], alpha: Sequence[float],
                test_loss: Sequence[float], test_error: Sequence[float], **facts: Any) -> dict:
    """The record of one pair: the curves, both barriers (computed here), and ``facts``
    (group, BN subset, settings, environment)."""
    out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "runs": list(runs),
                           "fingerprints": list(fingerprints), **facts,
                           "alpha": [float(x) for x in alpha], "test_loss": [float(x) for x in test_loss],
                           "test_error": [float(x) for x in test_error]}
    for curve, key in ((test_loss, "loss"), (test_error, "error")):
        out[f"barrier_{key}"], out[f"alpha_{key}"] = barrier_height(alpha, curve)
    return out


def write_record(sweep_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Write one pair's record atomically; return its path."""
    a, b = record["runs"]
    path = record_path(sweep_dir, a, b)
    write_bytes(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
    return path


@dataclass(frozen=True)
class PairRecord:
    """A pair's record as read back: checked, barriers recomputed from the curves."""

    path: Path
    data: dict

    @property
    def runs(self) -> tuple[str, str]:
        a, b = self.data["runs"]
        return str(a), str(b)

    @property
    def group_key(self) -> str:
        return str(self.data.get("group_key") or "")

    @property
    def barrier_loss(self) -> float:
        return float(self.data["barrier_loss"])

    @property
    def barrier_error(self) -> float:
        return float(self.data["barrier_error"])

    def matches(self, fingerprints: Sequence[str], settings: Mapping[str, Any]) -> bool:
        """Whether this record is of these exact weights (fingerprints, in the record's run order)
        computed with these settings (``SETTINGS``): a rerun skips it then."""
        return list(self.data["fingerprints"]) == list(fingerprints) and \
            all(self.data.get("settings", {}).get(k) == settings.get(k) for k in SETTINGS)


def _check(path: Path, data: Any) -> dict:
    def bad(why: str) -> RefusedFile:
        return RefusedFile(path, f"is not a barrier record of this package ({why})")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise bad(f"format {data.get('format')!r} version {data.get('version')!r}; expected {FORMAT!r} {VERSION}")
    runs, fps = data.get("runs"), data.get("fingerprints")
    if not (isinstance(runs, list) and len(runs) == 2 and all(isinstance(r, str) for r in runs)):
        raise bad("'runs' is not two run ids")
    if not (isinstance(fps, list) and len(fps) == 2 and all(isinstance(f, str) for f in fps)):
        raise bad("'fingerprints' is not two strings")
    try:
        name = pair_name(*runs)
    except BarrierError as e:
        raise bad(str(e)) from None
    if path.name != name:
        raise bad(f"its runs {runs} belong in {name}, not {path.name}")
    try:
        a = [float(x) for x in data["alpha"]]
        for curve in CURVES:
            vals = [float(x) for x in data[curve]]
            height, where = barrier_height(a, vals)
            key = curve.split("_")[1]
            if float(data[f"barrier_{key}"]) != height or float(data[f"alpha_{key}"]) != where:
                raise bad(f"its barrier_{key} is not the one its own {curve} curve gives ({height!r})")
    except (KeyError, TypeError, ValueError) as e:  # BarrierError is a ValueError
        raise bad(f"{type(e).__name__}: {e}") from None
    return data


def read_record(path: Path | str) -> PairRecord:
    """One pair's record, checked (:class:`RefusedFile` names the file and why otherwise)."""
    p = Path(path)
    raw = read_regular(p, MAX_RECORD_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RefusedFile(p, f"is not JSON ({e})") from None
    return PairRecord(p, _check(p, data))


def read_sweep(sweep_dir: Path | str) -> tuple[list[PairRecord], list[tuple[str, str]]]:
    """Every pair record of a sweep (sorted by file name) and ``[(file, why refused)]``."""
    folder = Path(sweep_dir) / FOLDER
    records: list[PairRecord] = []
    refused: list[tuple[str, str]] = []
    if not folder.is_dir():
        return records, refused
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(SUFFIX):
            continue
        try:
            records.append(read_record(p))
        except RefusedFile as e:
            refused.append((str(p), e.why))
    return records, refused
