"""Per-group statistics (formulas in :mod:`nondet_hpc.metrics`), baselines and variability reduction.

:func:`reduce_group` turns one group's runs into its metrics, leaving out (with a reason) every
run whose files cannot be used; :func:`apply_baselines` compares rows with their baseline rows.
The metrics and their columns are those of :mod:`nondet_hpc.registry.metrics`. The N-models
ablation and the claim-1 test are in :mod:`nondet_hpc.analysis.claims`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import metrics as M
from ..registry.metrics import METRICS, model_sds
from ..registry.sources import CONTROL
from ..rundir import LABELS, RUN_JSON
from .groups import Group, family, view_display
from .inputs import add_pairs, open_inputs
from .scan import (
    ACC_ENS,
    BadFile,
    Exclusion,
    Logits,
    Npy,
    ReduceError,
    Run,
    SnapshotMean,
    rel,
)

#: metrics.csv: these columns, then each metric of the registry (its SE column after it), then TAIL
HEAD: tuple[str, ...] = ("group", "source", "view", "view_id", "group_key", "n_models", "n_excluded", "n_planned",
                         "n_never_started", "n_distinct", "n_duplicates")
TAIL: tuple[str, ...] = ("baseline", "reduction_pct", "formula", "note")

Exclude = Callable[[Run, str, str], None]  # (run, category, reason): leave a run out of one group
Used = list[tuple[Run, Logits, M.ModelSummary]]  # a group's usable models with their one-pass summaries


def open_member(run: Run, g: Group, sweep: Path, expected_snaps: tuple[int, ...] | None) -> Logits:
    """A run's logits for the group's view, shape-checked against its labels (BadFile if not usable)."""
    parts = run.views[g.view_id]
    if expected_snaps is not None:
        have = tuple(i for i, _ in parts)
        if have != expected_snaps:
            raise BadFile(f"has snapshots {list(have)}, the group's runs have {list(expected_snaps)}", "missing")
    arrays = [Npy(f, rel(f, sweep)) for _, f in parts]
    n = run.labels.shape[0] if run.labels is not None else -1
    for a in arrays:
        if len(a.shape) != 2 or a.shape[0] != n or not np.issubdtype(a.dtype, np.floating):
            raise BadFile(f"{a.rel}: wrong shape or dtype {a.shape} {a.dtype}; expected float "
                          f"[n_test={n}, n_classes] matching labels.npy", "shape")
    if expected_snaps is not None:
        if len({a.shape for a in arrays}) > 1:
            raise BadFile(f"snapshot files differ in shape: {[a.shape for a in arrays]}", "shape")
        return SnapshotMean(arrays)
    return arrays[0]


def reduce_group(g: Group, sweep: Path, excluded: list[Exclusion], warnings: list[str], *,
                 n_boot: int, seed: int, block_bytes: int, label_outliers: Mapping[str, Any]) -> None:
    """Fill ``g.stats``, ``g.summary``, the SEs and notes; runs left out go to ``excluded``.

    ``label_outliers``: run id -> :class:`~nondet_hpc.analysis.integrity.Outlier` (its test labels or
    data hash disagree with the sweep's other runs of the same data); such a run stops its group.
    """
    disp = view_display(g.view_id) or "single model"
    members = [r for r in g.members if r.labels is not None]

    def exclude(r: Run, category: str, reason: str) -> None:
        excluded.append(Exclusion(r.run_id, g.name, disp, category, reason, g.group_key))

    if not _same_test_set(g, members, sweep, exclude, label_outliers):
        return
    used = _one_model_each(g, _usable_models(g, members, sweep, exclude), sweep, exclude)
    g.used = [r for r, _, _ in used]
    g.digests = [s.digest for _, _, s in used]
    if not used:
        g.notes.append("no usable model")
        return
    if g.view_id == "plain":
        _check_recorded_accuracy(used, warnings)
    inputs = open_inputs(g, [r for r, _, _ in used], [a for _, a, _ in used], sweep, warnings)
    labels = used[0][0].labels
    try:
        # a progress line on stderr once a group takes more than a few seconds (large sweeps)
        g.stats = M.pairwise_stats([a for _, a, _ in used], labels, summaries=[s for _, _, s in used],
                                   block_bytes=block_bytes,
                                   progress=M.progress_line(f"{g.row_name}: pairwise metrics"))
        add_pairs(g.stats, inputs, block_bytes)
    except BadFile as e:  # a file replaced or truncated while we read it (a job still writing?)
        g.used = []
        g.notes.append(f"stopped: {e}")
        warnings.append(f"{g.row_name}: stopped: {e}")
        return
    g.summary = M.group_summary(g.stats)
    if len(used) < 2:
        g.notes.append("only 1 usable model: SDs and pairwise metrics need at least 2")
        return
    _spread_and_control(g, len(used), warnings, n_boot=n_boot, seed=seed)


def _same_test_set(g: Group, members: list[Run], sweep: Path, exclude: Exclude,
                   label_outliers: Mapping[str, Any]) -> bool:
    """One test set per sweep: models scored on other labels cannot be compared (stop the group).

    The reference is the labels most runs of the whole sweep with this test set have, so a group
    whose every run has other labels is stopped too, not only a group that disagrees inside.
    """
    odd = [r for r in members if r.run_id in label_outliers]
    if not odd:
        return True
    for r in odd:
        o = label_outliers[r.run_id]
        where = rel(r.path / (LABELS if o.category == "labels" else RUN_JSON), sweep)
        exclude(r, o.category, f"{where}: {o.reason}")
    g.stopped = True
    g.notes.append(f"stopped: test labels or data of {name_some([r.run_id for r in odd])} differ from the "
                   f"sweep's other runs of the same data (labels.npy, run.json data.sha256; excluded.csv); "
                   f"remove or rerun them, then reduce again")
    return False


def name_some(ids: list[str], limit: int = 8) -> str:
    """Up to ``limit`` run ids, then how many more (messages stay readable for 1000-run sweeps)."""
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _usable_models(g: Group, members: list[Run], sweep: Path, exclude: Exclude) -> Used:
    """Open every member's files, keep the majority shape, then one pass per model (finite? acc, CE)."""
    expected: tuple[int, ...] | None = None
    if g.view_id.startswith(ACC_ENS):  # accelerated ensembles need the same snapshots in every run
        sets = Counter(tuple(i for i, _ in r.views[g.view_id]) for r in members)
        expected = max(sets.items(), key=lambda kv: (kv[1], len(kv[0])))[0]
    opened: list[tuple[Run, Logits]] = []
    for r in members:
        try:
            opened.append((r, open_member(r, g, sweep, expected)))
        except BadFile as e:
            exclude(r, e.category, str(e))
    shapes = Counter(a.shape for _, a in opened)
    if len(shapes) > 1:
        top_shape = shapes.most_common(1)[0][0]
        for r, a in [(r, a) for r, a in opened if a.shape != top_shape]:
            exclude(r, "shape", f"{a.rel}: logits of shape {list(a.shape)}, the group's other runs have "
                                f"{list(top_shape)}")
        opened = [(r, a) for r, a in opened if a.shape == top_shape]
    used: Used = []
    for r, a in opened:
        try:
            used.append((r, a, M.summarize_model(a, r.labels)))
        except M.NonFiniteLogits as e:
            files = ", ".join(rel(f, sweep) for _, f in r.views[g.view_id])
            exclude(r, "diverged", f"non-finite logits in {files}: {e}")
        except BadFile as e:
            exclude(r, e.category, str(e))
        except ValueError as e:  # e.g. a label outside the logits' classes
            exclude(r, "shape", f"{', '.join(rel(f, sweep) for _, f in r.views[g.view_id])}: {e}")
    return used


def _one_model_each(g: Group, used: Used, sweep: Path, exclude: Exclude) -> Used:
    """In a group whose source varies, runs with bit-identical logits are one model: the first
    (folder order) is kept, the others are excluded as duplicates naming it. A hard-linked copy of
    a run with an edited run.json, or a source that made no difference on this hardware, so never
    counts as N independent models. The determinism control keeps every run: its runs are meant
    to be identical, and how many are is its result."""
    if g.source_name == CONTROL:
        return used
    first: dict[bytes, Run] = {}
    keep: Used = []
    for r, a, s in used:
        if s.digest in first:
            files = ", ".join(rel(f, sweep) for _, f in r.views[g.view_id])
            exclude(r, "duplicate", f"{files}: logits bit-identical to {rel(first[s.digest].path, sweep)}'s: one model "
                                    f"(a source that varies gives distinct models), counted once")
            g.n_duplicates += 1
        else:
            first[s.digest] = r
            keep.append((r, a, s))
    return keep


def no_variation_lines(groups: list[Group]) -> list[str]:
    """What the report says first: each varied source whose runs all gave one model (single-model
    rows), and whether that model is the control's."""
    control = {(family(g.identity), g.view_id): set(g.digests) for g in groups if g.source_name == CONTROL}
    out = []
    for g in groups:
        if g.source_name == CONTROL or g.view_id != "plain" or len(g.used) != 1 or not g.n_duplicates:
            continue
        same = g.digests[0] in control.get((family(g.identity), g.view_id), set())
        out.append(f"On this hardware the {g.name} source made no difference: its {g.n_duplicates + 1} runs are "
                   f"bit-identical{' to the control' if same else ' to one another'}. It counts as 1 model "
                   f"(N {1}/{g.n_duplicates + 1}), and no claim uses it as evidence of variability.")
    return out


def _check_recorded_accuracy(used: Used, warnings: list[str]) -> None:
    """Warn where run.json's test_acc and the saved plain logits disagree by more than half an example."""
    for r, _, s in used:
        res = r.info.get("result") or {}
        if isinstance(res, dict) and isinstance(res.get("test_acc"), (int, float)):
            n = r.labels.shape[0]
            mine = 100.0 * s.n_correct / n
            if abs(100.0 * float(res["test_acc"]) - mine) > 50.0 / n:
                warnings.append(f"{r.run_id}: run.json test_acc={res['test_acc']} but logits/plain.npy "
                                f"gives {mine:.4f}%")


def _spread_and_control(g: Group, n_used: int, warnings: list[str], *, n_boot: int, seed: int) -> None:
    """Bootstrap SEs of the SDs; a determinism control with distinct logits is flagged."""
    values = g.stats.per_model()
    for m in model_sds():
        g.se[m.se] = M.bootstrap_sd_se(values[m.per_model], n_boot=n_boot, seed=[int(seed), g.seed_key, *m.stream])
    if g.source_name == CONTROL and g.stats.n_distinct() > 1:
        msg = (f"NOT bit-identical: {g.stats.n_distinct()} distinct logits among {n_used} runs of the "
               f"determinism control; some randomness is not controlled")
        g.notes.append(msg)
        warnings.append(f"{g.row_name}: {msg}")


def columns() -> list[str]:
    """metrics.csv's columns: HEAD, every metric of the registry followed by its SE column, TAIL."""
    metrics = [c for m in METRICS.values() for c in (m.key, m.se) if c is not None]
    return [*HEAD, *metrics, *TAIL]


def group_row(g: Group) -> dict[str, Any]:
    """The group's row of metrics.csv (:func:`columns`); baseline and reduction are filled in later."""
    row: dict[str, Any] = {
        "group": g.row_name, "source": g.name, "view": view_display(g.view_id), "view_id": g.view_id,
        "group_key": g.group_key, "n_models": len(g.used), "n_excluded": g.n_excluded,
        "n_planned": g.n_planned, "n_never_started": g.n_never_started,
        "n_distinct": g.stats.n_distinct() if g.stats is not None else 0, "n_duplicates": g.n_duplicates,
    }
    for m in METRICS.values():
        row[m.key] = g.summary.get(m.key, math.nan)
        if m.se is not None:
            row[m.se] = g.se.get(m.se, math.nan)
    return {**row, "baseline": "", "reduction_pct": math.nan, "formula": "", "note": "; ".join(g.notes)}


def apply_baselines(df: pd.DataFrame, groups: list[Group], formula: str, baseline: str | None) -> None:
    """Fill ``baseline``, ``formula`` and ``reduction_pct`` of every row compared with a baseline row.

    Default: a row of a snapshot-trained group (train.snapshots > 1) against the single-model row
    of the snapshots=1 group of the same config, when the sweep has it; otherwise a TTA / Acc.Ens
    row against the single-model row of its own group. ``baseline`` names one row for all.
    """
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
    b = find_baseline(df, groups, baseline)
    for i in range(len(groups)):
        reduce_against(i, b)


def _snapshots(identity: dict) -> int:
    return int(identity.get("train.snapshots", 1) or 1)


def _without_snapshots(identity: dict) -> str:
    return json.dumps({k: v for k, v in identity.items() if k != "train.snapshots"}, sort_keys=True, default=str)


def find_baseline(df: pd.DataFrame, groups: list[Group], name: str) -> int:
    """Row index of ``--baseline NAME``: a row name (any case), or a source label's single-model row."""
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


def per_model(groups: list[Group]) -> pd.DataFrame:
    """per_model.csv: accuracy and CE of every used model of every group."""
    recs = []
    for g in groups:
        if g.stats is None:
            continue
        for r, acc, ce in zip(g.used, g.stats.accuracies, g.stats.ce):
            recs.append({"group": g.row_name, "source": g.name, "view_id": g.view_id, "run_id": r.run_id,
                         "seed": r.seed, "acc": float(acc), "ce": float(ce)})
    return pd.DataFrame(recs, columns=["group", "source", "view_id", "run_id", "seed", "acc", "ce"])
