"""The run directory (docs/contracts.md, "The run folder"): names, atomic writes, the DONE marker.

SWEEP_DIR/runs/<run id>/ holds config.yaml, run.json, logits/<view>.npy, labels.npy,
features.npy (optional), weights.safetensors and trajectory.npz (record.*), checkpoint.pt and
DONE (written last). Every file is written to a
temporary name in the same folder and renamed, so a job killed at any instant leaves either the
old file or the new one, never half a file under the real name. Every other module names these
files through the constants below (and ``logits_path``, ``snapshot_view``), never as literals.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
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
WEIGHTS = "weights.safetensors"  # final parameters and buffers (records/weights.py; no pickle)
TRAJECTORY = "trajectory.npz"  # fingerprints, norms, sketch, probe logits over training (records/trajectory.py)
KEPT_CHECKPOINTS = "checkpoints"  # checkpoints/epoch-KKKK.pt: full training states kept at record.keep_checkpoints
LOGITS = "logits"  # folder of float32 [n_test, n_classes] arrays, one file per view
LOCK = ".lock"  # flock'ed while a process trains or evaluates the run (run_lock)
RUNS = "runs"  # SWEEP_DIR/runs/<run id>/
REPLACED = ".replaced"  # SWEEP_DIR/runs/.replaced/: runs moved aside by force=true (never deleted)
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


def kept_checkpoint(run: Path, epoch: int) -> Path:
    """The full training state kept at the end of ``epoch`` (``record.keep_checkpoints``)."""
    return Path(run) / KEPT_CHECKPOINTS / f"epoch-{int(epoch):04d}.pt"


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


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC / EDQUOT); the message names the folder and what is free."""

    def __str__(self) -> str:
        return str(self.strerror)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (or what it wraps: torch.save turns OSError into RuntimeError) is a full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return isinstance(exc, (OSError, RuntimeError)) and shutil.disk_usage(folder).free == 0
    except OSError:
        return False


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
    except OSError:
        return "free space unknown"


def _remove_stale_temps(path: Path) -> None:
    """Temp files of ``path`` left by a writer that was killed (kill -9, node failure) before its
    rename. Every writer of one file holds that file's lock (run lock, sweep lock), so a temp of
    the same name found now belongs to a dead writer."""
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.[A-Za-z0-9_]{8}\.tmp\Z")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], Any]) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename.

    A killed writer leaves the old file (or none), never half a file; its temp file is removed by
    the next write of the same file. A full disk raises :class:`DiskFullError` naming the folder
    and the free space; the previous file stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _out_of_space(e, path.parent):
            raise DiskFullError(errno.ENOSPC, f"no space left to write {path} ({_free_text(path.parent)} in "
                                f"{path.parent}); the previous version of the file is intact. Free space or "
                                f"choose another out_dir=PATH, then rerun the same command: finished runs are "
                                f"skipped and this one resumes from its last checkpoint.") from e
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
    return file_lock(Path(path) / LOCK, busy)
