"""A run's training trajectory: one ``.npz`` file of fixed arrays, read with ``allow_pickle=False``.

T recorded points (records/schedule.py), n parameter tensors, a sketch of D buckets, K probe
examples of C classes. Arrays (all little-endian; strings are fixed-width unicode, no objects):

================  ================  ==========================================================
name              dtype, shape      meaning
================  ================  ==========================================================
version           int64 []          1
run_id            str []            the run that recorded it
complete          bool []           every grid point up to the last one is present (False
                                    when recording began on a resume from a checkpoint that
                                    had no recorder state)
steps_per_epoch   int64 []          optimizer steps per epoch (a point's epoch = step / this)
step              int64 [T]         optimizer steps done at each point, increasing (0 =
                                    initial weights after the bit change)
fingerprint       uint8 [T, 32]     SHA-256 of the parameters (records/projection.py)
tensor_digest     uint8 [T, n, 32]  SHA-256 of each parameter tensor (which tensors differ)
tensor_name       str [n]           parameter tensors, in the model's order
tensor_size       int64 [n]         values per tensor (the flat vector's layout)
tensor_norm       float64 [T, n]    L2 norm of each parameter tensor
sketch_key        uint64 []         the projection's key (projection.SKETCH_KEY)
sketch            float64 [T, D]    count sketch of all parameters
probe_index       int64 [K]         positions in the run's test set (schedule.probe_indices)
probe_label       int64 [K]         their labels
probe_logits      float32 [T, K, C] the model's logits on them (eval mode, no augmentation)
================  ================  ==========================================================

The file is written whole at each checkpoint and at the end, atomically, as an uncompressed zip
with fixed entry order and timestamps, so the same content always gives the same bytes (a
resumed run's file is byte-identical to an uninterrupted run's). A reader accepts only a
regular file of bounded size holding exactly these entries, uncompressed, with these dtypes and
consistent shapes; anything else (a pickle, a link, extra or missing arrays) is refused
(:class:`~nondet_hpc.safeio.RefusedFile`) and nothing in it is executed.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .projection import FINGERPRINT_BYTES, MAX_SKETCH_DIM, total_norm
from ..safeio import RefusedFile, read_regular, write_bytes

VERSION = 1
#: Largest trajectory file read: 500 points of a 4096-bucket sketch and 512 x 100 probe logits
#: take ~120 MB; the default grid of a 500-epoch run has ~20 points (~4 MB at CIFAR-100).
MAX_TRAJECTORY_BYTES = 256 << 20
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: name -> (dtype kind/size as numpy spells it, number of dimensions)
SPEC: dict[str, tuple[str, int]] = {
    "version": ("<i8", 0), "run_id": ("U", 0), "complete": ("|b1", 0), "steps_per_epoch": ("<i8", 0),
    "step": ("<i8", 1), "fingerprint": ("|u1", 2), "tensor_digest": ("|u1", 3), "tensor_name": ("U", 1),
    "tensor_size": ("<i8", 1),
    "tensor_norm": ("<f8", 2), "sketch_key": ("<u8", 0), "sketch": ("<f8", 2), "probe_index": ("<i8", 1),
    "probe_label": ("<i8", 1), "probe_logits": ("<f4", 3),
}


@dataclass(frozen=True)
class Trajectory:
    run_id: str
    complete: bool
    steps_per_epoch: int
    step: np.ndarray  # int64 [T]
    fingerprint: np.ndarray  # uint8 [T, 32]
    tensor_digest: np.ndarray  # uint8 [T, n, 32]
    tensor_name: np.ndarray  # str [n]
    tensor_size: np.ndarray  # int64 [n]
    tensor_norm: np.ndarray  # float64 [T, n]
    sketch_key: int
    sketch: np.ndarray  # float64 [T, D]
    probe_index: np.ndarray  # int64 [K]
    probe_label: np.ndarray  # int64 [K]
    probe_logits: np.ndarray  # float32 [T, K, C]

    @property
    def n_points(self) -> int:
        return int(self.step.shape[0])

    @property
    def epoch(self) -> np.ndarray:
        """float64 [T]: each point's position in epochs (step / steps_per_epoch)."""
        return self.step / float(self.steps_per_epoch)

    @property
    def param_norm(self) -> np.ndarray:
        """float64 [T]: L2 norm of all parameters at each point."""
        return total_norm(self.tensor_norm)

    def predictions(self) -> np.ndarray:
        """int64 [T, K]: argmax of the probe logits (ties to the lowest class, as numpy)."""
        return np.argmax(self.probe_logits, axis=2) if self.probe_logits.shape[2] else \
            np.zeros(self.probe_logits.shape[:2], np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        """The file's arrays, in the file's order."""
        out = {"version": np.array(VERSION, np.int64)}
        for f in fields(self):
            dtype, ndim = SPEC[f.name]
            v = getattr(self, f.name)
            if dtype == "U":
                out[f.name] = np.asarray(str(v)) if ndim == 0 else np.asarray(v, dtype=str)
            else:
                out[f.name] = np.asarray(v, dtype=dtype)
        return {k: out[k] for k in SPEC}


def trajectory_bytes(traj: Trajectory) -> bytes:
    """The ``.npz`` bytes of ``traj``: stored (uncompressed) entries in SPEC order, fixed timestamps."""
    arrays = check(traj.arrays(), "trajectory")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.require(arr, requirements="C"), allow_pickle=False)
    return buf.getvalue()


def write_trajectory(path: Path | str, traj: Trajectory) -> None:
    """Write ``traj`` to ``path`` atomically (the whole file, every time)."""
    write_bytes(path, trajectory_bytes(traj))


def _load_arrays(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of an npz held in ``data``: exactly SPEC's entries, stored, no pickle."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise RefusedFile(where, f"is not a trajectory file (not an npz archive: {e})") from None
    names, expected = [i.filename for i in infos], {f"{k}.npy" for k in SPEC}
    if set(names) != expected or len(names) != len(expected):
        extra, missing = sorted(set(names) - expected)[:5], sorted(expected - set(names))
        raise RefusedFile(where, f"does not hold exactly the trajectory's arrays (unexpected: {extra or 'none'}, "
                                 f"missing: {missing or 'none'}, {len(names)} entries)")
    if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(data) for i in infos):
        raise RefusedFile(where, "has compressed or oversized entries (this package writes them stored)")
    out = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for k in SPEC:
                out[k] = npz[k]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise RefusedFile(where, f"has an array that cannot be read without pickle ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from None
    return out


def check(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """``arrays`` if they form a valid trajectory (dtypes, dimensions, consistent sizes), else refused."""
    for name, (dtype, ndim) in SPEC.items():
        a = arrays[name]
        ok_dtype = a.dtype.kind == "U" if dtype == "U" else a.dtype == np.dtype(dtype)
        if not ok_dtype or a.ndim != ndim:
            raise RefusedFile(where, f"array {name} is {a.dtype} with {a.ndim} dimensions; expected {dtype} "
                                     f"with {ndim}")
    T, n, K = arrays["step"].shape[0], arrays["tensor_name"].shape[0], arrays["probe_index"].shape[0]
    D = arrays["sketch"].shape[1]
    expect = {"fingerprint": (T, FINGERPRINT_BYTES), "tensor_digest": (T, n, FINGERPRINT_BYTES), "tensor_size": (n,),
              "tensor_norm": (T, n), "sketch": (T, D),
              "probe_label": (K,)}
    bad = [k for k, s in expect.items() if arrays[k].shape != s]
    if bad or arrays["probe_logits"].shape[:2] != (T, K):
        raise RefusedFile(where, f"arrays {bad or ['probe_logits']} do not fit {T} points, {n} tensors, {K} probes")
    step, idx = arrays["step"], arrays["probe_index"]
    problems = [
        (int(arrays["version"]) != VERSION, f"version {int(arrays['version'])}, this package reads {VERSION}"),
        (int(arrays["steps_per_epoch"]) < 1, "steps_per_epoch < 1"),
        (T and (step[0] < 0 or np.any(np.diff(step) <= 0)), "steps are not increasing from >= 0"),
        (not 1 <= D <= MAX_SKETCH_DIM, f"sketch dimension {D} outside 1..{MAX_SKETCH_DIM}"),
        (np.any(arrays["tensor_size"] < 0), "negative tensor sizes"),
        (K and (idx[0] < 0 or np.any(np.diff(idx) <= 0)), "probe indices are not increasing from >= 0"),
    ]
    for failed, why in problems:
        if failed:
            raise RefusedFile(where, f"is not a valid trajectory: {why}")
    return arrays


def read_trajectory(path: Path | str, *, max_bytes: int = MAX_TRAJECTORY_BYTES) -> Trajectory:
    """The trajectory file at ``path``: regular file, <= ``max_bytes``, checked; no torch needed."""
    arrays = check(_load_arrays(read_regular(path, max_bytes), str(path)), str(path))
    return from_arrays(arrays)


def from_arrays(arrays: dict[str, np.ndarray]) -> Trajectory:
    """A :class:`Trajectory` of checked arrays (scalars become Python values)."""
    kw = {f.name: arrays[f.name] for f in fields(Trajectory)}
    kw.update(run_id=str(arrays["run_id"]), complete=bool(arrays["complete"]),
              steps_per_epoch=int(arrays["steps_per_epoch"]), sketch_key=int(arrays["sketch_key"]))
    return Trajectory(**kw)
