"""The reducer: SWEEP_DIR/runs/*/logits -> metrics tables and plots in SWEEP_DIR/report/.

    python -m nondet_hpc.reduce SWEEP_DIR [--formula paper|report] [--baseline NAME]
                                          [--n-boot N] [--seed S]

Runs are grouped by everything in their config except the replicate seed (run.json "group_key")
and by logits view, so single models, test-time augmentation (TTA) views and accelerated
(snapshot) ensembles all come out of the same code as rows of one table. Metric formulas live in
:mod:`nondet_hpc.metrics` and are explained in docs/metrics.md.

What cannot be measured is said, never silently dropped: runs without DONE, diverged runs
(non-finite logits), corrupt or wrongly shaped files, missing snapshots are listed in
report/excluded.csv and in the printed summary; a group whose runs disagree on the test labels is
stopped with the offending run named; a group with fewer than two usable models gets its
accuracy and a note instead of pairwise metrics. The rest of the report is still produced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import metrics as M
from ..rundir import atomic_write, list_runs

__all__ = ["ReduceError", "reduce_sweep", "format_table", "main", "VIEW_DISPLAY"]

VIEW_ORDER: tuple[str, ...] = ("plain", "flip", "crop25", "crop81", "flip-crop25", "flip-crop81")
VIEW_DISPLAY: dict[str, str] = {"plain": "", "flip": "Flip", "crop25": "Crop25", "crop81": "Crop81",
                                "flip-crop25": "Flip-Crop25", "flip-crop81": "Flip-Crop81"}
ACC_ENS = "acc-ens"
# paper's row order; names not listed (new combinations) go between the single sources and "all"
SOURCE_ORDER: dict[str, int] = {"none": 0, "init": 1, "shuffle": 2, "augment": 3, "cudnn": 4,
                                "init+shuffle": 5, "shuffle+cudnn": 6, "shuffle+augment+cudnn": 7,
                                "all": 9, "bitflip": 10}
ABLATION_NS: tuple[int, ...] = (10, 25, 50, 75)
ABLATION_SUBSETS = 200
METRIC_COLUMNS: tuple[str, ...] = ("acc_mean", "acc_sd", "ce_sd", "disagreement", "correlation",
                                   "ensemble_delta", "cka", "testset_sd")
COLUMNS: tuple[str, ...] = (
    "group", "source", "view", "view_id", "group_key", "n_models", "n_excluded", "n_distinct",
    "acc_mean", "acc_sd", "acc_sd_se", "testset_sd", "ce_sd", "ce_sd_se", "disagreement", "correlation",
    "ensemble_delta", "cka", "baseline", "reduction_pct", "formula", "note")
REPORT_FILES: tuple[str, ...] = (
    "metrics.csv", "metrics.md", "metrics.tex", "per_model.csv", "excluded.csv", "ablation.csv",
    "ablation.md", "claim1.csv", "summary.txt", "report.md", "metrics.png", "sd_vs_n.png",
    "accuracy_spread.png", "claim1.png", "reduction.png")
_VIEW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]*$")
_SNAPSHOT = re.compile(r"^snapshot-(\d+)(?:_(.+))?$")


class ReduceError(RuntimeError):
    """Nothing to reduce (no runs/ folder, no complete run) or a bad request (unknown baseline)."""


class _BadFile(ValueError):
    """A file that cannot be used; the message names it, ``category`` says why (excluded.csv)."""

    def __init__(self, message: str, category: str = "corrupt"):
        super().__init__(message)
        self.category = category


# --------------------------------------------------------------------------------------------
# files


class _Npy:
    """A .npy file validated once (``np.load``, ``allow_pickle=False``), then mapped afresh per read.

    Reopening per read (a few times per model) keeps the number of open maps bounded, so a group
    of hundreds of runs with several snapshot files each cannot exhaust file descriptors; the
    header parsed at validation is reused, so a read costs one mmap, not a header parse.
    """

    def __init__(self, path: Path, rel: str):
        self.path, self.rel = path, rel
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise _BadFile(f"{rel}: file missing", "missing") from None
        except Exception as e:  # any failure to parse means a corrupt file; say which one
            raise _BadFile(f"{rel}: {_npy_problem(path, e)}") from None
        if not isinstance(arr, np.memmap):  # e.g. an .npz archive under a .npy name
            kind = type(arr).__name__
            if hasattr(arr, "close"):
                arr.close()
            raise _BadFile(f"{rel}: expected one .npy array, found {kind}")
        self.shape: tuple[int, ...] = tuple(int(s) for s in arr.shape)
        self.dtype = arr.dtype
        self._offset = int(arr.offset)
        self._order = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
        del arr

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            arr = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape,
                            order=self._order)
        except (OSError, ValueError) as e:  # replaced or truncated since it was validated
            raise _BadFile(f"{self.rel}: cannot be read any more ({type(e).__name__}: {e})") from None
        out = np.array(arr[key])
        del arr
        return out


def _npy_problem(path: Path, err: Exception) -> str:
    """Why np.load refused a file, in words (numpy calls anything without a header "pickled")."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        return f"cannot be opened ({e})"
    if head != b"\x93NUMPY":
        return "not a .npy file (no NUMPY header: truncated, empty or another format)"
    if "allow_pickle" in str(err) or "Python objects" in str(err) or "object" in str(err):
        return "holds Python objects (pickle), which the reducer never loads (allow_pickle=False)"
    return f"corrupt .npy file ({type(err).__name__}: {err})"


class _SnapshotMean:
    """Accelerated-ensemble logits: the mean of k snapshot logits, computed block by block on read.

    Summed in float64 in snapshot order, divided by k, stored as float32 like the saved logits;
    the same inputs therefore always give bit-identical means.
    """

    def __init__(self, parts: Sequence[_Npy]):
        self.parts = list(parts)
        self.rel = ", ".join(p.rel for p in self.parts)
        self.shape = self.parts[0].shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        total = np.array(self.parts[0][key], dtype=np.float64)
        for p in self.parts[1:]:
            total += np.asarray(p[key], dtype=np.float64)
        return (total / len(self.parts)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# runs and groups


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
    category: str  # incomplete | unreadable | corrupt | shape | diverged | labels | missing
    reason: str
    group_key: str = ""


@dataclass
class Group:
    group_key: str
    view_id: str
    members: list[Run]
    label: str = ""
    identity: dict = field(default_factory=dict)
    name: str = ""  # label + disambiguation, set after all groups are known
    stats: M.PairwiseStats | None = None
    used: list[Run] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    acc_sd_se: float = math.nan
    ce_sd_se: float = math.nan
    notes: list[str] = field(default_factory=list)
    n_excluded: int = 0
    stopped: bool = False

    @property
    def source_name(self) -> str:
        return str(self.identity.get("source.name", ""))

    @property
    def row_name(self) -> str:
        disp = view_display(self.view_id)
        return self.name if not disp else f"{self.name} [{disp}]"

    @property
    def seed_key(self) -> int:
        return zlib.crc32(f"{self.group_key}|{self.view_id}".encode())


def view_display(view_id: str) -> str:
    """Table name of a view: "" for the plain single model, "Flip", "Acc.Ens/Flip-Crop81", ..."""
    if view_id == ACC_ENS or view_id.startswith(ACC_ENS + "/"):
        inner = view_id[len(ACC_ENS) + 1:] if "/" in view_id else "plain"
        disp = VIEW_DISPLAY.get(inner, inner)
        return "Acc.Ens" + (f"/{disp}" if disp else "")
    return VIEW_DISPLAY.get(view_id, view_id)


def _view_rank(view_id: str) -> tuple[int, int, str]:
    ens = view_id == ACC_ENS or view_id.startswith(ACC_ENS + "/")
    inner = (view_id.split("/", 1)[1] if "/" in view_id else "plain") if ens else view_id
    pos = VIEW_ORDER.index(inner) if inner in VIEW_ORDER else len(VIEW_ORDER)
    return (int(ens), pos, inner)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _scan(sweep: Path, warnings: list[str]) -> tuple[list[Run], list[Exclusion]]:
    runs_dir = sweep / "runs"
    if not runs_dir.is_dir():
        raise ReduceError(f"{sweep} has no runs/ folder: nothing to reduce (is this a sweep directory?)")
    runs: list[Run] = []
    excluded: list[Exclusion] = []
    for d in list_runs(sweep):
        rid = d.name
        info: dict = {}
        info_err = ""
        try:
            with open(d / "run.json") as f:
                info = json.load(f)
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            info_err = "run.json missing"
        except (OSError, ValueError) as e:
            info_err = f"run.json unreadable ({type(e).__name__}: {e})"
        label = str(info.get("group_label", "")) if info else ""
        if not (d / "DONE").exists():
            state = info.get("state", "unknown") if info else "unknown"
            excluded.append(Exclusion(rid, label, "all", "incomplete", f"no DONE marker (state: {state})",
                                      str(info.get("group_key", "")) if info else ""))
            continue
        if info_err:
            excluded.append(Exclusion(rid, label, "all", "unreadable", f"{_rel(d, sweep)}/{info_err}"))
            continue
        identity = info.get("identity")
        gkey = info.get("group_key")
        if not isinstance(identity, dict) or not gkey:
            excluded.append(Exclusion(rid, label, "all", "unreadable",
                                      f"{_rel(d / 'run.json', sweep)} lacks 'group_key' or 'identity'"))
            continue
        if not label:
            label = str(identity.get("source.label") or identity.get("source.name") or gkey)
        run = Run(str(info.get("run_id", rid)), d, info, str(gkey), label, identity, info.get("seed"))
        # labels: without them nothing of the run can be scored
        try:
            lab = _Npy(d / "labels.npy", _rel(d / "labels.npy", sweep))
            if len(lab.shape) != 1 or not np.issubdtype(lab.dtype, np.integer):
                raise _BadFile(f"{lab.rel}: expected 1-D integer labels, got shape {lab.shape} dtype {lab.dtype}",
                               "shape")
            run.labels = lab[:].astype(np.int64, copy=False)
        except _BadFile as e:
            excluded.append(Exclusion(run.run_id, label, "all", e.category, str(e)))
            continue
        _discover_views(run, sweep, excluded, warnings)
        runs.append(run)
    return runs, excluded


def _discover_views(run: Run, sweep: Path, excluded: list[Exclusion], warnings: list[str]) -> None:
    logits_dir = run.path / "logits"
    files = sorted(logits_dir.glob("*.npy")) if logits_dir.is_dir() else []
    for f in files:
        stem = f.name[:-4]
        m = _SNAPSHOT.match(stem)
        if m:
            inner = m.group(2) or "plain"
            if not _VIEW_NAME.match(inner):
                warnings.append(f"ignored {_rel(f, sweep)}: not a view file name")
                continue
            vid = ACC_ENS if inner == "plain" else f"{ACC_ENS}/{inner}"
            run.views.setdefault(vid, []).append((int(m.group(1)), f))
        elif _VIEW_NAME.match(stem):
            run.views.setdefault(stem, []).append((0, f))
        else:
            warnings.append(f"ignored {_rel(f, sweep)}: not a view file name")
    for parts in run.views.values():
        parts.sort()
    if not run.views:
        excluded.append(Exclusion(run.run_id, run.label, "all", "missing",
                                  f"{_rel(logits_dir, sweep)}/ holds no logits (*.npy)"))
    # what run.json promises must be there; a missing file is named, not silently skipped
    promised = [str(v) for v in run.info.get("views", []) or []] + [str(s) for s in run.info.get("snapshots", []) or []]
    for name in promised:
        if not (logits_dir / f"{name}.npy").exists():
            missing = _rel(logits_dir / f"{name}.npy", sweep)
            excluded.append(Exclusion(run.run_id, run.label, name, "missing",
                                      f"run.json lists {name} but {missing} is missing"))


def _family(identity: dict) -> str:
    """Identity without the source: groups of one family differ only in what varies."""
    return json.dumps({k: v for k, v in identity.items() if not k.startswith("source.")}, sort_keys=True, default=str)


def _sortable(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def _prune_keys(keys: set[str]) -> list[str]:
    """Keep readable keys: if data.name differs, data.num_classes etc. need not be printed."""
    names = {k.split(".", 1)[0] for k in keys if k.endswith(".name") and k.count(".") == 1}
    return sorted(k for k in keys if k.split(".", 1)[0] not in names or (k.endswith(".name") and k.count(".") == 1))


def _differing(identities: Sequence[dict], skip: Callable[[str], bool]) -> set[str]:
    keys = set().union(*identities) if identities else set()
    out = set()
    for k in keys:
        if skip(k):
            continue
        vals = {json.dumps(i.get(k, "<unset>"), sort_keys=True, default=str) for i in identities}
        if len(vals) > 1:
            out.add(k)
    return out


def _fmt_value(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def _name_groups(by_key: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """group_key -> display name: the paper's row label plus whatever distinguishes it.

    When the sweep has several families (e.g. train.epochs=100 and 500), every label gets the
    family keys that vary; labels shared by groups of one family get their differing keys too.
    """
    fam = {k: _family(ident) for k, (_, ident) in by_key.items()}
    reps = {}
    for k, f in fam.items():
        reps.setdefault(f, by_key[k][1])
    fam_keys = _prune_keys(_differing(list(reps.values()), lambda k: k.startswith("source."))) if len(reps) > 1 else []
    by_label: dict[str, list[str]] = {}
    for k, (label, _) in by_key.items():
        by_label.setdefault(label, []).append(k)
    names = {}
    for label, keys in by_label.items():
        same = (_prune_keys(_differing([by_key[k][1] for k in keys], lambda k: k == "source.label"))
                if len(keys) > 1 else [])
        for k in keys:
            ident = by_key[k][1]
            show = list(dict.fromkeys(fam_keys + same))
            suffix = ", ".join(f"{key}={_fmt_value(ident.get(key, '<unset>'))}" for key in show)
            names[k] = f"{label} ({suffix})" if suffix else label
    # identical identities under different keys: fall back to the key itself
    seen = Counter(names.values())
    return {k: (f"{n} [{k[:8]}]" if seen[n] > 1 else n) for k, n in names.items()}


def _build_groups(runs: list[Run]) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        for vid in r.views:
            g = groups.setdefault((r.group_key, vid), Group(r.group_key, vid, []))
            g.members.append(r)
    by_key: dict[str, tuple[str, dict]] = {}
    for r in runs:
        by_key.setdefault(r.group_key, (r.label, r.identity))
    names = _name_groups(by_key)
    for g in groups.values():
        g.label, g.identity = by_key[g.group_key]
        g.name = names[g.group_key]
    fam_order = sorted({_family(i) for _, i in by_key.values()},
                       key=lambda f: [(k, _sortable(v)) for k, v in sorted(json.loads(f).items())])

    def order(g: Group) -> tuple:
        return (fam_order.index(_family(g.identity)), SOURCE_ORDER.get(g.source_name, 8), g.name,
                _view_rank(g.view_id))

    return sorted(groups.values(), key=order)


# --------------------------------------------------------------------------------------------
# one group


def _open_member(run: Run, g: Group, sweep: Path, expected_snaps: tuple[int, ...] | None) -> Any:
    parts = run.views[g.view_id]
    if expected_snaps is not None:
        have = tuple(i for i, _ in parts)
        if have != expected_snaps:
            raise _BadFile(f"has snapshots {list(have)}, the group's runs have {list(expected_snaps)}", "missing")
    arrays = [_Npy(f, _rel(f, sweep)) for _, f in parts]
    n = run.labels.shape[0] if run.labels is not None else -1
    for a in arrays:
        if len(a.shape) != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
            raise _BadFile(f"{a.rel}: wrong shape or dtype {a.shape} {a.dtype}; expected float "
                           f"[n_test={n}, n_classes] matching labels.npy", "shape")
    if expected_snaps is not None:
        if len({a.shape for a in arrays}) > 1:
            raise _BadFile(f"snapshot files differ in shape: {[a.shape for a in arrays]}", "shape")
        return _SnapshotMean(arrays)
    return arrays[0]


def _reduce_group(g: Group, sweep: Path, excluded: list[Exclusion], warnings: list[str], *,
                  n_boot: int, seed: int, block_bytes: int) -> None:
    disp = view_display(g.view_id) or "single model"
    members = [r for r in g.members if r.labels is not None]

    def exclude(r: Run, category: str, reason: str) -> None:
        excluded.append(Exclusion(r.run_id, g.name, disp, category, reason))
        g.n_excluded += 1

    # 1. one test set per group: different labels mean the models cannot be compared
    digests = [M.array_digest(r.labels) for r in members]
    if len(set(digests)) > 1:
        common = Counter(digests).most_common()
        top = common[0][0] if common[0][1] > (common[1][1] if len(common) > 1 else 0) else digests[0]
        odd = [r for r, d in zip(members, digests) if d != top]
        for r in odd:
            exclude(r, "labels", f"{_rel(r.path / 'labels.npy', sweep)} differs from the test labels of "
                                 f"the group's other runs")
        g.stopped = True
        g.notes.append(f"stopped: test labels of {', '.join(r.run_id for r in odd)} differ from the other "
                       f"run(s) of the group (labels.npy); remove or rerun them, then reduce again")
        return

    # 2. accelerated ensembles need the same snapshots in every run
    expected: tuple[int, ...] | None = None
    if g.view_id.startswith(ACC_ENS):
        sets = Counter(tuple(i for i, _ in r.views[g.view_id]) for r in members)
        expected = max(sets.items(), key=lambda kv: (kv[1], len(kv[0])))[0]

    # 3. open files, check shapes, then one pass per model (finite? accuracy, CE, digest)
    opened: list[tuple[Run, Any]] = []
    for r in members:
        try:
            opened.append((r, _open_member(r, g, sweep, expected)))
        except _BadFile as e:
            exclude(r, e.category, str(e))
    shapes = Counter(a.shape for _, a in opened)
    if len(shapes) > 1:
        top_shape = shapes.most_common(1)[0][0]
        for r, a in [(r, a) for r, a in opened if a.shape != top_shape]:
            exclude(r, "shape", f"{a.rel}: logits of shape {list(a.shape)}, the group's other runs have "
                                f"{list(top_shape)}")
        opened = [(r, a) for r, a in opened if a.shape == top_shape]
    used: list[tuple[Run, Any, M.ModelSummary]] = []
    for r, a in opened:
        try:
            used.append((r, a, M.summarize_model(a, r.labels)))
        except M.NonFiniteLogits as e:
            files = ", ".join(_rel(f, sweep) for _, f in r.views[g.view_id])
            exclude(r, "diverged", f"non-finite logits in {files}: {e}")
        except _BadFile as e:
            exclude(r, e.category, str(e))
        except ValueError as e:  # e.g. a label outside the logits' classes
            exclude(r, "shape", f"{', '.join(_rel(f, sweep) for _, f in r.views[g.view_id])}: {e}")
    g.used = [r for r, _, _ in used]
    if g.n_excluded:
        g.notes.append(f"{g.n_excluded} run(s) left out (see excluded.csv)")
    if not used:
        g.notes.append("no usable model")
        return

    if g.view_id == "plain":
        for r, _, s in used:
            res = r.info.get("result") or {}
            if isinstance(res, dict) and isinstance(res.get("test_acc"), (int, float)):
                n = r.labels.shape[0]
                mine = 100.0 * s.n_correct / n
                if abs(100.0 * float(res["test_acc"]) - mine) > 50.0 / n:  # more than half an example
                    warnings.append(f"{r.run_id}: run.json test_acc={res['test_acc']} but logits/plain.npy "
                                    f"gives {mine:.4f}%")

    features = _features(g, used, sweep, warnings) if g.view_id == "plain" else None
    labels = used[0][0].labels
    try:
        g.stats = M.pairwise_stats([a for _, a, _ in used], labels, summaries=[s for _, _, s in used],
                                   features=features, block_bytes=block_bytes)
    except _BadFile as e:  # a file replaced or truncated while we read it (a job still writing?)
        g.used = []
        g.notes.append(f"stopped: {e}")
        warnings.append(f"{g.row_name}: stopped: {e}")
        return
    g.summary = M.group_summary(g.stats)
    if len(used) < 2:
        g.notes.append("only 1 usable model: SDs and pairwise metrics need at least 2")
        return
    rng_seed = [int(seed), g.seed_key]
    g.acc_sd_se = M.bootstrap_sd_se(g.stats.accuracies, n_boot=n_boot, seed=rng_seed)
    g.ce_sd_se = M.bootstrap_sd_se(g.stats.ce, n_boot=n_boot, seed=rng_seed + [1])
    if g.source_name == "none" and g.stats.n_distinct() > 1:
        msg = (f"NOT bit-identical: {g.stats.n_distinct()} distinct logits among {len(used)} runs of the "
               f"determinism control; some randomness is not controlled")
        g.notes.append(msg)
        warnings.append(f"{g.row_name}: {msg}")


def _features(g: Group, used: list, sweep: Path, warnings: list[str]) -> list[Any] | None:
    """Penultimate features of every used run, or None (with a note) if any is missing or bad."""
    feats = []
    missing = [r.run_id for r, _, _ in used if not (r.path / "features.npy").exists()]
    if missing:
        if len(missing) < len(used):
            g.notes.append(f"CKA: features.npy missing for {len(missing)} of {len(used)} runs")
        return None
    for r, _, _ in used:
        f = r.path / "features.npy"
        try:
            arr = _Npy(f, _rel(f, sweep))
            if len(arr.shape) != 2 or arr.shape[0] != r.labels.shape[0] or not np.issubdtype(arr.dtype, np.floating):
                raise _BadFile(f"{arr.rel}: wrong shape or dtype {arr.shape} {arr.dtype}; expected float [n_test, d]",
                               "shape")
            if not np.isfinite(arr[:]).all():
                raise _BadFile(f"{arr.rel}: non-finite features")
        except _BadFile as e:
            g.notes.append(f"CKA not computed: {e}")
            warnings.append(f"{g.row_name}: CKA not computed: {e}")
            return None
        feats.append(arr)
    return feats


# --------------------------------------------------------------------------------------------
# tables


def _row(g: Group) -> dict[str, Any]:
    s = g.summary
    return {
        "group": g.row_name, "source": g.name, "view": view_display(g.view_id), "view_id": g.view_id,
        "group_key": g.group_key, "n_models": len(g.used), "n_excluded": g.n_excluded,
        "n_distinct": g.stats.n_distinct() if g.stats is not None else 0,
        "acc_mean": s.get("acc_mean", math.nan), "acc_sd": s.get("acc_sd", math.nan), "acc_sd_se": g.acc_sd_se,
        "testset_sd": s.get("testset_sd", math.nan), "ce_sd": s.get("ce_sd", math.nan), "ce_sd_se": g.ce_sd_se,
        "disagreement": s.get("disagreement", math.nan), "correlation": s.get("correlation", math.nan),
        "ensemble_delta": s.get("ensemble_delta", math.nan), "cka": s.get("cka", math.nan),
        "baseline": "", "reduction_pct": math.nan, "formula": "", "note": "; ".join(g.notes),
    }


def _apply_baselines(df: pd.DataFrame, groups: list[Group], formula: str, baseline: str | None) -> None:
    names = list(df["group"])

    def reduce_against(i: int, b: int) -> None:
        base = {k: float(df.at[b, k]) for k in M.REDUCTION_KEYS}
        new = {k: float(df.at[i, k]) for k in M.REDUCTION_KEYS}
        df.at[i, "baseline"] = names[b]
        df.at[i, "formula"] = formula
        df.at[i, "reduction_pct"] = M.variability_reduction(base, new, formula)

    if baseline is None:
        plain = {g.group_key: i for i, g in enumerate(groups) if g.view_id == "plain"}
        # Snapshot-trained runs (train.snapshots > 1) are compared, as in the paper, with normally
        # trained single models of the same config when the sweep has them, not with the final
        # model of their own cyclic schedule.
        single = {_without_snapshots(g.identity): i for i, g in enumerate(groups)
                  if g.view_id == "plain" and _snapshots(g.identity) == 1}
        for i, g in enumerate(groups):
            b = single.get(_without_snapshots(g.identity)) if _snapshots(g.identity) > 1 else None
            if b is None and g.view_id != "plain":
                b = plain.get(g.group_key)
            if b is not None and b != i:
                reduce_against(i, b)
        return
    b = _find_baseline(df, groups, baseline)
    for i in range(len(groups)):
        reduce_against(i, b)


def _snapshots(identity: dict) -> int:
    return int(identity.get("train.snapshots", 1) or 1)


def _without_snapshots(identity: dict) -> str:
    return json.dumps({k: v for k, v in identity.items() if k != "train.snapshots"}, sort_keys=True, default=str)


def _find_baseline(df: pd.DataFrame, groups: list[Group], name: str) -> int:
    exact = [i for i, n in enumerate(df["group"]) if n == name]
    if not exact:
        exact = [i for i, n in enumerate(df["group"]) if n.casefold() == name.casefold()]
    if not exact:  # a source label alone means its single-model row
        exact = [i for i, g in enumerate(groups) if g.view_id == "plain" and name.casefold() in
                 (g.name.casefold(), g.label.casefold(), g.source_name.casefold())]
    if len(exact) != 1:
        what = "matches several rows" if exact else "matches no row"
        raise ReduceError(f"--baseline {name!r} {what}; choose one of: " + "; ".join(df["group"]))
    return exact[0]


def _per_model(groups: list[Group]) -> pd.DataFrame:
    recs = []
    for g in groups:
        if g.stats is None:
            continue
        for r, acc, ce in zip(g.used, g.stats.accuracies, g.stats.ce):
            recs.append({"group": g.row_name, "source": g.name, "view_id": g.view_id, "run_id": r.run_id,
                         "seed": r.seed, "acc": float(acc), "ce": float(ce)})
    return pd.DataFrame(recs, columns=["group", "source", "view_id", "run_id", "seed", "acc", "ce"])


def _ablation(groups: list[Group], seed: int) -> pd.DataFrame:
    """N-models ablation: every metric on random N-subsets of the runs already there."""
    recs = []
    for g in groups:
        st = g.stats
        if st is None or st.n_models < 2:
            continue
        N = st.n_models
        for n in [k for k in ABLATION_NS if k < N] + [N]:
            if n < N:
                rng = np.random.default_rng([int(seed), g.seed_key, n])
                subsets = np.argsort(rng.random((ABLATION_SUBSETS, N)), axis=1)[:, :n]
            else:
                subsets = np.arange(N)[None]
            res = M.subset_metrics(st, subsets)
            rec: dict[str, Any] = {"group": g.row_name, "source": g.name, "view_id": g.view_id, "n": n,
                                   "n_subsets": subsets.shape[0]}
            for k in METRIC_COLUMNS:
                v = res[k]
                rec[f"{k}_mean"] = float(v.mean())
                rec[f"{k}_spread"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
            recs.append(rec)
    cols = ["group", "source", "view_id", "n", "n_subsets"] + [
        f"{k}_{s}" for k in METRIC_COLUMNS for s in ("mean", "spread")]
    return pd.DataFrame(recs, columns=cols)


def _claim1(groups: list[Group], n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Claim 1: does each source alone give the accuracy SD of all sources together?"""
    recs, lines = [], []
    fams: dict[str, list[Group]] = {}
    for g in groups:
        if g.view_id == "plain" and g.stats is not None and g.stats.n_models >= 2 and g.source_name != "none":
            fams.setdefault(_family(g.identity), []).append(g)
    reps = [json.loads(f) for f in fams]
    fam_keys = _prune_keys(_differing(reps, lambda k: False)) if len(reps) > 1 else []
    for fam, gs in fams.items():
        ident = json.loads(fam)
        where = (" (" + ", ".join(f"{k}={_fmt_value(ident.get(k, '<unset>'))}" for k in fam_keys) + ")"
                 if fam_keys else "")
        allg = [g for g in gs if g.source_name == "all"]
        ref = allg[0] if allg else None
        for g in gs:
            if ref is not None and g is not ref:
                r, lo, hi = M.bootstrap_sd_ratio_ci(g.stats.accuracies, ref.stats.accuracies, n_boot=n_boot,
                                                    seed=[int(seed), g.seed_key, ref.seed_key])
            else:
                r = lo = hi = math.nan
            recs.append({"group": g.row_name, "reference": ref.row_name if ref else "", "n_models": g.stats.n_models,
                         "acc_sd": g.summary["acc_sd"], "sd_ratio": r, "ci_low": lo, "ci_high": hi})
        if len(gs) < 2:
            lines.append(f"Claim 1{where}: only one source group with >= 2 models; no comparison possible.")
            continue
        try:
            W, p = M.equal_variance_test([g.stats.accuracies for g in gs])
        except ImportError:
            lines.append(f"Claim 1{where}: equal-variance test skipped (scipy is not installed).")
            continue
        if not math.isfinite(p):
            verdict = "test undefined (a group has zero spread around its median)"
        elif p >= 0.05:
            verdict = "no evidence at the 5% level that sources differ (consistent with claim 1)"
        else:
            verdict = "accuracy variances differ at the 5% level (against claim 1)"
        ratio_txt = ""
        mine = [x for x in recs[-len(gs):] if math.isfinite(x["sd_ratio"])]
        if mine:
            outside = [x for x in mine if not (x["ci_low"] <= 1.0 <= x["ci_high"]) and math.isfinite(x["ci_low"])]
            rng = f"{min(x['sd_ratio'] for x in mine):.2f}-{max(x['sd_ratio'] for x in mine):.2f}"
            ratio_txt = (f"; SD / all-sources SD ranges {rng}, "
                         + ("every 95% CI contains 1" if not outside else
                            "95% CI excludes 1 for " + ", ".join(
                                f"{x['group']} ({x['sd_ratio']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}])"
                                for x in outside)))
        lines.append(f"Claim 1{where}: Brown-Forsythe test of equal accuracy variance across {len(gs)} source "
                     f"groups, W={W:.3f}, p={p:.3g}: {verdict}{ratio_txt}.")
    cols = ["group", "reference", "n_models", "acc_sd", "sd_ratio", "ci_low", "ci_high"]
    return pd.DataFrame(recs, columns=cols), lines


# --------------------------------------------------------------------------------------------
# formatting


def _f(v: Any, nd: int) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if not math.isfinite(x) else f"{x:.{nd}f}"


def _pm(v: Any, se: Any, nd: int) -> str:
    s = _f(v, nd)
    return s if s == "-" or not math.isfinite(float(se)) else f"{s} ± {_f(se, nd)}"


def _display_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "Group": df["group"],
        "N": df["n_models"].astype(int).astype(str),
        "Acc %": [_f(v, 2) for v in df["acc_mean"]],
        "Acc SD": [_pm(v, s, 3) for v, s in zip(df["acc_sd"], df["acc_sd_se"])],
        "Test-set SD": [_f(v, 3) for v in df["testset_sd"]],
        "CE SD": [_pm(v, s, 4) for v, s in zip(df["ce_sd"], df["ce_sd_se"])],
        "Disagr. %": [_f(v, 2) for v in df["disagreement"]],
        "Corr.": [_f(v, 4) for v in df["correlation"]],
        "Ens. Δ": [_f(v, 3) for v in df["ensemble_delta"]],
    })
    if np.isfinite(df["cka"].to_numpy(dtype=float)).any():
        out["CKA"] = [_f(v, 4) for v in df["cka"]]
    if np.isfinite(df["reduction_pct"].to_numpy(dtype=float)).any():
        out["Reduction %"] = [_f(v, 1) for v in df["reduction_pct"]]
    return out


def _markdown(table: pd.DataFrame) -> str:
    """Markdown of already formatted strings (no re-parsing of "1.0000" into "1"), numbers right."""
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=("left",) + ("right",) * (table.shape[1] - 1))


def _notes(df: pd.DataFrame) -> list[str]:
    return [f"{g}: {n}" for g, n in zip(df["group"], df["note"]) if isinstance(n, str) and n]


def format_table(df: pd.DataFrame) -> str:
    """The compact terminal table of :func:`reduce_sweep`'s result, notes underneath."""
    from tabulate import tabulate

    if df.empty:
        return "(no groups)"
    disp = _display_frame(df)
    text = tabulate(disp.values.tolist(), headers=list(disp.columns), tablefmt="simple", disable_numparse=True)
    notes = _notes(df)
    if notes:
        text += "\n\nNotes:\n" + "\n".join(f"  {n}" for n in notes)
    return text


def _units_line(formula: str) -> str:
    return ("Acc % = mean test accuracy; SDs are population SDs across models with bootstrap SE (pp; CE in nats); "
            "Test-set SD = SD from test-set sampling alone; Disagr. = mean pairwise % of test examples predicted "
            "differently; Corr. = mean pairwise Pearson r of logits; Ens. Δ = 2-model ensemble gain (pp); "
            f"Reduction = variability reduction vs the baseline row ({formula} formula, docs/metrics.md).")


def _latex(df: pd.DataFrame, caption: str) -> str:
    disp = _display_frame(df)

    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "{": r"\{",
               "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}", "^": r"\^{}", "Δ": r"$\Delta$",
               "±": r"$\pm$"}

    def esc(s: str) -> str:
        return "".join(special.get(ch, ch) for ch in s)

    cols = list(disp.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    for row in disp.itertuples(index=False):
        lines.append(" & ".join(esc(str(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + esc(caption) + "}", r"\end{table}", ""]
    return "\n".join(lines)


def _excluded_summary(excluded: list[Exclusion], limit: int = 15) -> list[str]:
    if not excluded:
        return ["Left out: nothing; every run found was used."]
    lines = [f"Left out ({len(excluded)} entries, full list in report/excluded.csv):"]
    by_cat: dict[str, list[Exclusion]] = {}
    for e in excluded:
        by_cat.setdefault(e.category, []).append(e)
    for cat, es in by_cat.items():
        lines.append(f"  {cat} ({len(es)}):")
        for e in es[:limit]:
            where = f" [{e.group}{'' if e.view in ('all', '') else ' / ' + e.view}]" if e.group else ""
            lines.append(f"    {e.run_id}{where}: {e.reason}")
        if len(es) > limit:
            lines.append(f"    ... and {len(es) - limit} more")
    return lines


# --------------------------------------------------------------------------------------------
# the reducer


def reduce_sweep(sweep_dir: str | os.PathLike, *, formula: str = "paper", n_boot: int = 10_000, seed: int = 0,
                 baseline: str | None = None, block_bytes: int = M.DEFAULT_BLOCK_BYTES) -> pd.DataFrame:
    """Reduce a sweep: write SWEEP_DIR/report/ and return the metrics table (one row per group).

    ``formula`` picks the variability-reduction formula ("paper" or "report", docs/metrics.md);
    ``baseline`` names the row every other row is compared with (default: each TTA / Acc.Ens row
    against the single-model row of its own group). ``n_boot`` resamples with generator seed
    ``seed`` make the bootstrap SEs reproducible. The printed summary (table, claim-1 line, what
    was left out) is in ``df.attrs["summary"]``; the report folder in ``df.attrs["report_dir"]``.
    Raises :class:`ReduceError` when there is nothing to reduce.
    """
    if formula not in M.FORMULAS:
        raise ReduceError(f"--formula must be one of {M.FORMULAS}, got {formula!r}")
    if n_boot < 2:
        raise ReduceError(f"--n-boot must be at least 2, got {n_boot}")
    if seed < 0:
        raise ReduceError(f"--seed must be a non-negative integer, got {seed}")
    sweep = Path(sweep_dir)
    warnings: list[str] = []
    runs, excluded = _scan(sweep, warnings)
    if not runs:
        pending = _excluded_summary(excluded)
        raise ReduceError(f"{sweep}/runs has no complete run to reduce.\n" + "\n".join(pending))

    groups = _build_groups(runs)
    pending = Counter(e.group_key for e in excluded if e.category == "incomplete" and e.group_key)
    complete = Counter(r.group_key for r in runs)
    for g in groups:
        if pending[g.group_key]:
            g.notes.append(f"{pending[g.group_key]} incomplete run(s) not included yet")
        if len(g.members) < complete[g.group_key]:  # views are bookkeeping: runs may differ in them
            g.notes.append(f"view saved by {len(g.members)} of the group's {complete[g.group_key]} complete runs")
        _reduce_group(g, sweep, excluded, warnings, n_boot=n_boot, seed=seed, block_bytes=block_bytes)
    df = pd.DataFrame([_row(g) for g in groups], columns=list(COLUMNS))
    _apply_baselines(df, groups, formula, baseline)
    per_model = _per_model(groups)
    ablation = _ablation(groups, seed)
    claim1, claim1_lines = _claim1(groups, n_boot, seed)
    exc_df = pd.DataFrame([e.__dict__ for e in excluded],
                          columns=["run_id", "group", "view", "category", "reason", "group_key"])

    from ..presets import describe_sweep

    reproduces = describe_sweep(sorted({r.info.get("experiment") or "" for r in runs}))
    summary_lines = [reproduces, "", format_table(df), "", *claim1_lines]
    summary_lines += ["", *_excluded_summary(excluded)]
    if warnings:
        summary_lines += ["", f"Warnings ({len(warnings)}):", *[f"  {w}" for w in warnings]]
    report = sweep / "report"
    summary_lines += ["", f"Report: {report} (metrics.csv/.md/.tex, report.md, plots)"]
    summary = "\n".join(summary_lines)

    outputs: dict[str, bytes] = {}
    caption = (f"Variability over N models per group ({len(runs)} complete runs in {sweep.name}). "
               + _units_line(formula))
    disp = _display_frame(df)
    md_table = _markdown(disp)
    notes = _notes(df)
    outputs["metrics.csv"] = df.to_csv(index=False).encode()
    outputs["metrics.md"] = (md_table + "\n\n" + _units_line(formula) + "\n"
                             + ("\nNotes:\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")).encode()
    outputs["metrics.tex"] = _latex(df, caption).encode()
    outputs["per_model.csv"] = per_model.to_csv(index=False).encode()
    outputs["excluded.csv"] = exc_df.to_csv(index=False).encode()
    outputs["ablation.csv"] = ablation.to_csv(index=False).encode()
    abl_md = _ablation_md(ablation)
    outputs["ablation.md"] = abl_md.encode()
    if not claim1.empty:
        outputs["claim1.csv"] = claim1.to_csv(index=False).encode()
    outputs["summary.txt"] = (summary + "\n").encode()

    from . import plots

    figures = {"metrics.png": plots.group_metrics_png(df), "sd_vs_n.png": plots.sd_vs_n_png(ablation),
               "accuracy_spread.png": plots.accuracy_spread_png(per_model), "claim1.png": plots.claim1_png(claim1),
               "reduction.png": plots.reduction_png(df)}
    outputs.update({k: v for k, v in figures.items() if v is not None})
    outputs["report.md"] = _report_md(sweep, df, md_table, formula, claim1_lines, claim1, abl_md, excluded,
                                      warnings, [k for k, v in figures.items() if v is not None], n_boot, seed).encode()

    for name, data in outputs.items():
        atomic_write(report / name, lambda f, data=data: f.write(data))
    for name in REPORT_FILES:  # a file this run did not produce must not survive from an older one
        if name not in outputs and (report / name).exists():
            (report / name).unlink()

    df.attrs["summary"] = summary
    df.attrs["reproduces"] = reproduces
    df.attrs["report_dir"] = str(report)
    df.attrs["claim1"] = list(claim1_lines)
    df.attrs["excluded"] = [dict(e.__dict__) for e in excluded]
    df.attrs["warnings"] = list(warnings)
    return df


def _ablation_md(ablation: pd.DataFrame) -> str:
    if ablation.empty:
        return "No group has 2 or more models; no N-models ablation.\n"
    cols = {"group": "Group", "n": "N", "n_subsets": "subsets"}
    out = ablation[list(cols)].rename(columns=cols).astype(str)
    for k, nd, title in (("acc_sd", 3, "Acc SD"), ("ce_sd", 4, "CE SD"), ("disagreement", 2, "Disagr. %"),
                         ("correlation", 4, "Corr."), ("ensemble_delta", 3, "Ens. Δ")):
        out[title] = [_pm(m, s, nd) for m, s in zip(ablation[f"{k}_mean"], ablation[f"{k}_spread"])]
    return (_markdown(out) + "\n\nEach cell: mean ± SD of the metric over random N-subsets of the "
            f"group's runs (up to {ABLATION_SUBSETS} subsets; the last row of a group uses all runs).\n")


def _report_md(sweep: Path, df: pd.DataFrame, md_table: str, formula: str, claim1_lines: list[str],
               claim1: pd.DataFrame, abl_md: str, excluded: list[Exclusion], warnings: list[str],
               figures: list[str], n_boot: int, seed: int) -> str:
    parts = [f"# Variability report: {sweep.name}", "",
             f"Bootstrap: {n_boot} resamples, seed {seed}. Reduction formula: {formula}. "
             "Formulas and how to read this page: docs/metrics.md.", "", "## Metrics", "", md_table, "",
             _units_line(formula), ""]
    notes = _notes(df)
    if notes:
        parts += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    if "metrics.png" in figures:
        parts += ["![metrics](metrics.png)", ""]
    if "reduction.png" in figures:
        parts += ["![reduction](reduction.png)", ""]
    parts += ["## Claim 1: every source alone vs all sources together", ""]
    parts += [f"- {ln}" for ln in claim1_lines] or ["No single-model source groups with 2 or more models."]
    parts += [""]
    if not claim1.empty:
        c = claim1.copy()
        c["acc SD"] = [_f(v, 3) for v in c["acc_sd"]]
        c["SD / all"] = [_f(v, 3) for v in c["sd_ratio"]]
        c["95% CI"] = [f"[{_f(a, 3)}, {_f(b, 3)}]" for a, b in zip(c["ci_low"], c["ci_high"])]
        parts += [_markdown(c[["group", "n_models", "acc SD", "SD / all", "95% CI"]].astype(str)), ""]
    if "claim1.png" in figures:
        parts += ["![claim 1](claim1.png)", ""]
    if "accuracy_spread.png" in figures:
        parts += ["![accuracy of every model](accuracy_spread.png)", ""]
    parts += ["## N-models ablation", "", abl_md, ""]
    if "sd_vs_n.png" in figures:
        parts += ["![SD vs N](sd_vs_n.png)", ""]
    parts += ["## Left out", "", *[f"    {ln}" for ln in _excluded_summary(excluded)], ""]
    if warnings:
        parts += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nondet_hpc.reduce",
                                description="Reduce a sweep's logits to metrics tables and plots in SWEEP_DIR/report/.")
    p.add_argument("sweep_dir", help="sweep folder holding runs/<run id>/")
    p.add_argument("--formula", choices=M.FORMULAS, default="paper",
                   help="variability-reduction formula (docs/metrics.md); default: paper")
    p.add_argument("--baseline", default=None,
                   help="row name to compare every row with (default: each TTA/Acc.Ens row against its single model)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap/subsampling seed (default 0)")
    args = p.parse_args(argv)
    try:
        df = reduce_sweep(args.sweep_dir, formula=args.formula, n_boot=args.n_boot, seed=args.seed,
                          baseline=args.baseline)
    except ReduceError as e:
        print(f"nondet_hpc.reduce: {e}", file=sys.stderr)
        return 2
    print(df.attrs["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
