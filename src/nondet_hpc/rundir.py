"""The run directory (docs/contracts.md, "The run folder"): names, atomic writes, the DONE marker.

SWEEP_DIR/runs/<run id>/ holds config.yaml, run.json, logits/<view>.npy, labels.npy,
features.npy (optional), weights.safetensors and trajectory.npz (record.*), checkpoint.pt and
DONE (written last). Every file is written to a
temporary name in the same folder and renamed, so a job killed at any instant leaves either the
old file or the new one, never half a file under the real name; every write and read goes through
:mod:`nondet_hpc.safeio` (no link below the sweep folder is followed, only regular files of
bounded size are read). Every other module names these
files through the constants below (and ``logits_path``, ``snapshot_view``), never as literals.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import safeio
from .config import identity_items
from .safeio import RUNS, DiskFullError  # noqa: F401 - part of this module's names (RUNS: the layout)

DONE = "DONE"  # written last: a run folder without it is not complete
RUN_JSON = "run.json"  # provenance + state (RunRecord writes it, read_run_json reads it)
CONFIG = "config.yaml"  # the resolved config of the run
LABELS = "labels.npy"  # int64 [n_test]
FEATURES = "features.npy"  # optional float32 [n_test, d] (penultimate features, for CKA)
CHECKPOINT = "checkpoint.pt"  # latest training state (loaded with weights_only=True)
WEIGHTS = "weights.safetensors"  # final parameters and buffers (records/weights.py; no pickle)
TRAJECTORY = "trajectory.npz"  # fingerprints, norms, sketch, probe logits over training (records/trajectory.py)
KEPT_CHECKPOINTS = "checkpoints"  # checkpoints/epoch-KKKK.pt: full training states kept at record.keep_checkpoints
LOGITS = "logits"  # folder of float32 [n_test, n_classes] arrays, one file per view
LOCK = ".lock"  # flock'ed while a process trains or evaluates the run (run_lock)
# RUNS = "runs": SWEEP_DIR/runs/<run id>/ (defined in safeio, which finds a run folder's sweep by it)
REPLACED = ".replaced"  # SWEEP_DIR/runs/.replaced/: runs moved aside by force=true (never deleted)


def _digest(items: dict) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:10]


def group_key(cfg) -> str:
    """Equal for runs whose configs differ only in the replicate seed."""
    items = identity_items(cfg)
    items.pop("seed")
    return _digest(items)


def run_id(cfg) -> str:
    """Readable and unique: source, seed, data, model, epochs, then a hash of everything else.

    The hash covers the whole identity (identity_items), so two configs that differ anywhere that
    matters can never share a folder, while bookkeeping keys (views, out_dir) keep the id.
    """
    items = identity_items(cfg)
    return (f"{cfg.source.name}-s{cfg.seed:04d}-{cfg.data.name}-{cfg.model.name}-"
            f"e{cfg.train.epochs}-{_digest(items)}")


def run_dir(cfg) -> Path:
    return Path(cfg.out_dir) / RUNS / run_id(cfg)


def snapshot_view(k: int, view: str = "plain") -> str:
    """Name of the view of the model at the end of snapshot cycle ``k`` (accelerated ensembling)."""
    return f"snapshot-{k}" if view == "plain" else f"snapshot-{k}_{view}"


def kept_checkpoint(run: Path, epoch: int) -> Path:
    """The full training state kept at the end of ``epoch`` (``record.keep_checkpoints``)."""
    return Path(run) / KEPT_CHECKPOINTS / f"epoch-{int(epoch):04d}.pt"


def logits_path(run: Path, view: str) -> Path:
    """Where a run's logits of one view (plain, flip, ..., snapshot-k, snapshot-k_<view>) live."""
    return Path(run) / LOGITS / f"{view}.npy"


def read_run_json(run: Path) -> tuple[dict | None, str]:
    """run.json of a run folder, tolerant: ``(data, "")`` or ``(None, why it cannot be used)``.

    Only a regular file of bounded size is opened (a FIFO or device under that name would block or
    lie; safeio), and only a JSON object counts. Status, the reducer and evaluate all read run.json
    through here.
    """
    path = Path(run) / RUN_JSON
    try:
        data = safeio.load_json(path)
    except safeio.RefusedFile as e:
        if e.why == "file missing":
            return None, f"{RUN_JSON} missing"
        return None, f"{RUN_JSON} unreadable ({e.why})" if e.why.startswith("not valid") else f"{RUN_JSON} {e.why}"
    if not isinstance(data, dict):
        return None, f"{RUN_JSON} holds a JSON {type(data).__name__}, not an object"
    return data, ""


def is_done(path: Path) -> bool:
    """A finished run: its DONE is a regular file (lstat only, never opened, so nothing under that name
    can block; a link, FIFO or folder planted as DONE is not a finished run)."""
    return safeio.is_regular(Path(path) / DONE)


def list_runs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep, sorted; hidden ones (runs/.replaced/ of force=true) are not runs."""
    return sorted(p for p in (Path(sweep_dir) / RUNS).iterdir() if p.is_dir() and not p.name.startswith("."))


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename
    (:func:`nondet_hpc.safeio.atomic_write`: no link below the sweep folder is followed)."""
    safeio.atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """JSON of a regular file of a run folder (safeio.RefusedFile when it is not one)."""
    return safeio.load_json(path)


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


class RunRecord:
    """run.json of one run: kept in memory, rewritten atomically on every update."""

    def __init__(self, path: Path, initial: dict | None = None):
        self.path = Path(path)
        data = initial if initial is not None else (read_json(self.path) if os.path.lexists(self.path) else {})
        if not isinstance(data, dict):
            raise safeio.RefusedFile(self.path, f"holds a JSON {type(data).__name__}, not the object a run record "
                                                f"is; move it away (the run then starts a new record)")
        self.data: dict = data

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated"] = time.time()
        write_json(self.path, self.data)


def file_lock(path: Path, busy: Callable[[], Exception], timeout: float = 0.0,
              poll: float = 0.2) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive ``flock`` on ``path`` (:func:`nondet_hpc.safeio.file_lock`)."""
    return safeio.file_lock(path, busy, timeout, poll)


def run_lock(path: Path, busy: Callable[[], Exception]) -> contextlib.AbstractContextManager[None]:
    """Hold the run folder's lock (training and evaluate take it); raise ``busy()`` if it is held."""
    return file_lock(Path(path) / LOCK, busy)
