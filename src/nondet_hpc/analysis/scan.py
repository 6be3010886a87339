"""Reading and validating a sweep's run folders: which runs and logits files the reducer can use.

Every run folder is checked against the run-folder contract (:mod:`nondet_hpc.rundir`): DONE,
run.json with ``group_key`` and ``identity``, 1-D integer ``labels.npy``, and ``logits/*.npy``
view files. What fails is not dropped silently: it becomes an :class:`Exclusion` with a category
and a reason naming the file (report/excluded.csv).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import safeio
from ..rundir import (
    DONE,
    LABELS,
    LOGITS,
    RUN_JSON,
    RUNS,
    is_done,
    list_runs,
    logits_path,
    read_run_json,
)

ACC_ENS = "acc-ens"  # view id of the accelerated ensemble (mean of a run's snapshot logits)
_VIEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]*$")
# the inverse of rundir.snapshot_view: "snapshot-<k>" or "snapshot-<k>_<view>"
_SNAPSHOT = re.compile(r"^snapshot-(\d+)(?:_(.+))?$")


class ReduceError(RuntimeError):
    """Nothing to reduce (no runs/ folder, no complete run) or a bad request (unknown baseline)."""


class BadFile(ValueError):
    """A file that cannot be used; the message names it, ``category`` says why (excluded.csv)."""

    def __init__(self, message: str, category: str = "corrupt"):
        super().__init__(message)
        self.category = category


class Npy:
    """A .npy file validated once, then mapped afresh per read (both through nondet_hpc.safeio:
    a regular file only, opened without following a link or blocking on a FIFO, never unpickled).

    Reopening per read (a few times per model) keeps the number of open maps bounded, so a group
    of hundreds of runs with several snapshot files each cannot exhaust file descriptors; the
    header parsed at validation is reused, so a read costs one open and one mmap.
    """

    def __init__(self, path: Path, rel: str):
        self.path, self.rel = path, rel
        try:
            arr = safeio.load_npy(path, mmap=True)
        except safeio.RefusedFile as e:
            raise BadFile(f"{rel}: {_words(e.why)}", _category(e.why)) from None
        self.shape: tuple[int, ...] = tuple(int(s) for s in arr.shape)
        self.dtype = arr.dtype
        self._offset = int(arr.offset) if isinstance(arr, np.memmap) else 0
        self._order = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
        self._empty = not isinstance(arr, np.memmap)
        del arr

    def __getitem__(self, key: Any) -> np.ndarray:
        if self._empty:
            return np.array(np.zeros(self.shape, dtype=self.dtype)[key])
        try:
            with safeio.RegularFile(self.path, safeio.MAX_ARRAY) as rf, rf.fileobj() as f:
                arr = np.memmap(f, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape,
                                order=self._order)
        except (OSError, ValueError) as e:  # replaced or truncated since it was validated
            raise BadFile(f"{self.rel}: cannot be read any more ({type(e).__name__}: {e})") from None
        out = np.array(arr[key])
        del arr
        return out


def _category(why: str) -> str:
    """excluded.csv's category of a file safeio refused: missing, unreadable (not a regular file)
    or corrupt (not a .npy array, pickled, truncated, too large)."""
    if why == "file missing":
        return "missing"
    if why.startswith(("is a ", "cannot be opened", "not a regular")) and "bytes" not in why:
        return "unreadable"
    return "corrupt"


def _words(why: str) -> str:
    """safeio's reason, in the reducer's words for the files of a run folder."""
    if why.startswith("is a symbolic link"):
        return "is a symbolic link; the reducer reads only regular files inside a run folder"
    if why.startswith("holds Python objects"):
        return "holds Python objects (pickle), which the reducer never loads (allow_pickle=False)"
    if _category(why) == "corrupt" and not why.startswith(("is not a .npy", "expected one .npy")):
        return f"corrupt .npy file ({why})"
    return why


class SnapshotMean:
    """Accelerated-ensemble logits: the mean of k snapshot logits, computed block by block on read.

    Summed in float64 in snapshot order, divided by k, stored as float32 like the saved logits;
    the same inputs therefore always give bit-identical means.
    """

    def __init__(self, parts: Sequence[Npy]):
        self.parts = list(parts)
        self.rel = ", ".join(p.rel for p in self.parts)
        self.shape = self.parts[0].shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        total = np.array(self.parts[0][key], dtype=np.float64)
        for p in self.parts[1:]:
            total += np.asarray(p[key], dtype=np.float64)
        return (total / len(self.parts)).astype(np.float32)


Logits = Npy | SnapshotMean  # what a group's statistics read, block by block


@dataclass
class Run:
    run_id: str
    path: Path
    info: dict
    group_key: str
    label: str
    identity: dict
    seed: Any
    labels: np.ndarray | None = None
    views: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)  # view_id -> [(snapshot i, file)]


@dataclass
class Exclusion:
    run_id: str
    group: str
    view: str
    # incomplete | unreadable | corrupt | shape | diverged | labels | data | missing | duplicate | identity
    # | never started (planned in sweep.json, no run folder)
    category: str
    reason: str
    group_key: str = ""


def rel(path: Path, root: Path) -> str:
    """``path`` as the report names it: relative to the sweep folder when it lies inside it."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def parse_view_file(stem: str) -> tuple[str, int] | None:
    """(view id, snapshot index) of a logits file name without ``.npy``; None if it is no view file.

    Snapshot files (rundir.snapshot_view) map to the accelerated-ensemble view of their inner view,
    ``acc-ens`` or ``acc-ens/<view>``; any other view file is its own view with index 0.
    """
    m = _SNAPSHOT.match(stem)
    if m:
        inner = m.group(2) or "plain"
        if not _VIEW_NAME.match(inner):
            return None
        return (ACC_ENS if inner == "plain" else f"{ACC_ENS}/{inner}"), int(m.group(1))
    return (stem, 0) if _VIEW_NAME.match(stem) else None


def scan_sweep(sweep: Path, warnings: list[str]) -> tuple[list[Run], list[Exclusion]]:
    """The sweep's usable runs (labels loaded, views found) and everything left out, with why.

    Each model counts once: a symbolic link inside runs/, a folder whose run.json names another run
    (a copied ``<id>.bak``) and a second run of the same group and seed are exclusions, not runs.
    """
    if not (sweep / RUNS).is_dir():
        raise ReduceError(f"{sweep} has no runs/ folder: nothing to reduce (is this a sweep directory?)")
    try:
        folders = list_runs(sweep)
    except OSError as e:
        raise ReduceError(f"cannot list {sweep / RUNS} ({type(e).__name__}: {e}); check its permissions") from None
    runs: list[Run] = []
    excluded: list[Exclusion] = []
    for d in folders:
        if d.is_symlink():  # the real folder (if inside runs/) is counted under its own name
            excluded.append(Exclusion(d.name, "", "all", "duplicate",
                                      f"{rel(d, sweep)} is a symbolic link (to {os.readlink(d)}); a run is "
                                      "counted once, from its own folder"))
            continue
        run = _read_run(d, sweep, excluded)
        if run is None:
            continue
        discover_views(run, sweep, excluded, warnings)
        runs.append(run)
    return _one_per_seed(runs, sweep, excluded), excluded


def _one_per_seed(runs: list[Run], sweep: Path, excluded: list[Exclusion]) -> list[Run]:
    """Keep the first run (folder order) of each (group, seed); the others are duplicates.

    The run id hashes the whole identity, seed included, so two folders of one group and seed
    whose run.json names match their folders can only come from edited or foreign files.
    """
    first: dict[tuple[str, str], Run] = {}
    keep = []
    for r in runs:
        key = (r.group_key, json.dumps(r.seed, sort_keys=True, default=str))
        if r.seed is None or key not in first:
            first.setdefault(key, r)
            keep.append(r)
            continue
        excluded.append(Exclusion(r.run_id, r.label, "all", "duplicate",
                                  f"same group and seed ({r.seed}) as {rel(first[key].path, sweep)}; "
                                  "a model is counted once", r.group_key))
    return keep


def _read_run(d: Path, sweep: Path, excluded: list[Exclusion]) -> Run | None:
    """One run folder as a :class:`Run` with its labels, or None with the reason in ``excluded``."""
    rid = d.name
    data, info_err = read_run_json(d)
    info: dict = data or {}
    label = str(info.get("group_label", "")) if info else ""
    gkey = info.get("group_key")
    gkey_s = gkey if isinstance(gkey, str) else ""
    if not is_done(d):  # an incomplete run is reported as such, whatever its run.json holds
        state = info.get("state", "unknown") if info else "unknown"
        why = f"no DONE marker (state: {state})"
        if os.path.lexists(d / DONE):  # a link, FIFO or folder under that name: not a finished run's marker
            why = f"{DONE} is {safeio.kind(os.lstat(d / DONE).st_mode)}, not a regular file (state: {state})"
        excluded.append(Exclusion(rid, label, "all", "incomplete", why, gkey_s))
        return None
    if info_err:
        excluded.append(Exclusion(rid, label, "all", "unreadable", f"{rel(d, sweep)}/{info_err}"))
        return None
    identity = info.get("identity")
    if not isinstance(identity, dict) or not gkey_s:
        excluded.append(Exclusion(rid, label, "all", "unreadable",
                                  f"{rel(d / RUN_JSON, sweep)} lacks 'group_key' (a string) or 'identity' "
                                  "(an object)"))
        return None
    recorded = info.get("run_id", rid)
    if recorded != rid:  # a copied or renamed folder: the model is counted under its own name only
        excluded.append(Exclusion(rid, label, "all", "identity",
                                  f"{rel(d / RUN_JSON, sweep)} names run {recorded!r}, not its folder {rid!r} "
                                  "(a copy or a renamed folder?); a run is counted only from the folder named "
                                  "by its id", gkey_s))
        return None
    problem = _bad_field(info)
    if problem:
        excluded.append(Exclusion(rid, label, "all", "unreadable", f"{rel(d / RUN_JSON, sweep)}: {problem}", gkey_s))
        return None
    if not label:
        label = str(identity.get("source.label") or identity.get("source.name") or gkey_s)
    run = Run(rid, d, info, gkey_s, label, identity, info.get("seed"))
    try:  # without labels nothing of the run can be scored
        lab = Npy(d / LABELS, rel(d / LABELS, sweep))
        if len(lab.shape) != 1 or not np.issubdtype(lab.dtype, np.integer) or lab.shape[0] == 0:
            raise BadFile(f"{lab.rel}: expected non-empty 1-D integer labels, got shape {lab.shape} "
                          f"dtype {lab.dtype}", "shape")
        run.labels = lab[:].astype(np.int64, copy=False)
    except BadFile as e:
        excluded.append(Exclusion(run.run_id, label, "all", e.category, str(e), gkey_s))
        return None
    return run


def _bad_field(info: dict) -> str:
    """What is wrong with the run.json fields the reducer reads ("" when nothing)."""
    for key in ("views", "snapshots"):
        val = info.get(key, [])
        if val is None:
            continue
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            return f"'{key}' must be a list of view names, got {json.dumps(val, default=str)[:80]}"
        bad = [v for v in val if parse_view_file(v) is None]
        if bad:
            return f"'{key}' holds names that are not view names: {bad[:3]}"
    if not isinstance(info.get("seed"), (int, type(None))) or isinstance(info.get("seed"), bool):
        return f"'seed' must be an integer, got {json.dumps(info.get('seed'), default=str)[:40]}"
    return ""


def discover_views(run: Run, sweep: Path, excluded: list[Exclusion], warnings: list[str]) -> None:
    """Fill ``run.views`` from logits/*.npy; name odd file names and files run.json promises but lacks."""
    logits_dir = run.path / LOGITS
    # a linked logits/ folder would read another run's files: only a real folder counts
    files = sorted(logits_dir.glob("*.npy")) if logits_dir.is_dir() and not logits_dir.is_symlink() else []
    for f in files:
        parsed = parse_view_file(f.name[:-4])
        if parsed is None:
            warnings.append(f"ignored {rel(f, sweep)}: not a view file name")
            continue
        vid, index = parsed
        run.views.setdefault(vid, []).append((index, f))
    for parts in run.views.values():
        parts.sort()
    if logits_dir.is_symlink():
        excluded.append(Exclusion(run.run_id, run.label, "all", "missing",
                                  f"{rel(logits_dir, sweep)} is a symbolic link (to {os.readlink(logits_dir)}); "
                                  "the reducer reads only the run folder's own logits/", run.group_key))
    elif not run.views:
        excluded.append(Exclusion(run.run_id, run.label, "all", "missing",
                                  f"{rel(logits_dir, sweep)}/ holds no logits (*.npy)", run.group_key))
    # what run.json promises must be there; a missing file is named, not silently skipped
    promised = list(run.info.get("views") or []) + list(run.info.get("snapshots") or [])
    for name in promised:  # names checked by _bad_field: plain view-file names, no paths
        path = logits_path(run.path, name)
        if not path.exists():
            excluded.append(Exclusion(run.run_id, run.label, name, "missing",
                                      f"{RUN_JSON} lists {name} but {rel(path, sweep)} is missing", run.group_key))
