"""The run directory (DESIGN.md, "Run directory"): names, atomic writes, the DONE marker.

SWEEP_DIR/runs/<run id>/ holds config.yaml, run.json, logits/<view>.npy, labels.npy,
features.npy (optional), checkpoint.pt and DONE (written last). Every file is written to a
temporary name in the same folder and renamed, so a job killed at any instant leaves either the
old file or the new one, never half a file under the real name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import identity_items

DONE = "DONE"  # written last: a run folder without it is not complete
RUN_JSON = "run.json"  # provenance + state (RunRecord writes it, read_run_json reads it)
CONFIG = "config.yaml"  # the resolved config of the run
LABELS = "labels.npy"  # int64 [n_test]
FEATURES = "features.npy"  # optional float32 [n_test, d] (penultimate features, for CKA)
CHECKPOINT = "checkpoint.pt"  # latest training state (loaded with weights_only=True)
LOGITS = "logits"  # folder of float32 [n_test, n_classes] arrays, one file per view
RUNS = "runs"  # SWEEP_DIR/runs/<run id>/
_UMASK = os.umask(0)
os.umask(_UMASK)


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


def logits_path(run: Path, view: str) -> Path:
    """Where a run's logits of one view (plain, flip, ..., snapshot-k, snapshot-k_<view>) live."""
    return Path(run) / LOGITS / f"{view}.npy"


def read_run_json(run: Path) -> tuple[dict | None, str]:
    """run.json of a run folder, tolerant: ``(data, "")`` or ``(None, why it cannot be used)``.

    Only a regular file is opened (a FIFO or device under that name would block or lie), and
    only a JSON object counts. Status, the reducer and evaluate all read run.json through here.
    """
    path = Path(run) / RUN_JSON
    try:
        if not path.is_file():
            return None, f"{RUN_JSON} missing" if not path.exists() else f"{RUN_JSON} is not a regular file"
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{RUN_JSON} unreadable ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return None, f"{RUN_JSON} holds a JSON {type(data).__name__}, not an object"
    return data, ""


def is_done(path: Path) -> bool:
    return (Path(path) / DONE).exists()


def list_runs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep, sorted; hidden ones (runs/.replaced/ of force=true) are not runs."""
    return sorted(p for p in (Path(sweep_dir) / RUNS).iterdir() if p.is_dir() and not p.name.startswith("."))


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


class RunRecord:
    """run.json of one run: kept in memory, rewritten atomically on every update."""

    def __init__(self, path: Path, initial: dict | None = None):
        self.path = Path(path)
        self.data: dict = initial if initial is not None else (
            read_json(self.path) if self.path.exists() else {})

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["updated"] = time.time()
        write_json(self.path, self.data)


@contextlib.contextmanager
def file_lock(path: Path, busy: Callable[[], Exception], timeout: float = 0.0,
              poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; its folder must exist).

    Waits up to ``timeout`` seconds for a holder to let go (0: do not wait), then raises
    ``busy()``. flock, not a lock file's existence: a holder killed with SIGKILL releases it.
    """
    deadline = time.monotonic() + timeout
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy() from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(path: Path, busy: Callable[[], Exception]) -> contextlib.AbstractContextManager[None]:
    """Hold the run folder's lock (training and evaluate take it); raise ``busy()`` if it is held."""
    return file_lock(Path(path) / ".lock", busy)
