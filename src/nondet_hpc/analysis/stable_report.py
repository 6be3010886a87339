"""The report's "When does training become stable?" section, and the barrier columns of the group table.

For each source perturbed from epoch k (``source.from_epoch``; groups (source, k) of one family:
configs equal but for the source, k and the seed) and each k, the final divergence of the group's
runs, as pairwise values (:mod:`.stability` does the statistics):

- ``disagreement``: % of test examples two runs predict differently (the group's pair matrix);
- ``distance``: the exact final parameter distance, % of the pair's mean norm (metric
  ``param_distance``, from the weights files);
- ``barrier_loss`` / ``barrier_error``: the loss and error barriers of the pairs measured
  (SWEEP_DIR/barriers/, :mod:`nondet_hpc.sweep.barriers`; a record of weights that are no longer
  the run's is left out).

Files: report/stability.csv (every source, metric and k: mean, bootstrap interval, ratio to k = 0),
report/stability_summary.csv (stable after: the first k whose mean is below ``FRACTION`` x the k = 0
value, its interval over resamples), report/stability.png. With barriers measured, metrics.csv
gains each group's mean loss and error barrier with their intervals (:func:`join_barriers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..safeio import RefusedFile
from ..sweep import barriers as barrier_files
from .groups import Group, family
from .stability import DEFAULT_FRACTION, METRICS, PairValues, barrier_columns, barrier_values, stability_png, \
    stability_table

FRACTION = DEFAULT_FRACTION
FIGURE = "stability.png"
#: metrics.csv's barrier columns (tables.BARRIER_DISPLAY: how the printed table shows them)
BARRIER_COLUMNS = ["barrier_pairs", "barrier_runs", "barrier_loss", "barrier_loss_lo", "barrier_loss_hi",
                   "barrier_error", "barrier_error_lo", "barrier_error_hi"]


@dataclass
class StabilitySection:
    table: pd.DataFrame  # stability.csv
    summary: pd.DataFrame  # stability_summary.csv
    notes: list[str] = field(default_factory=list)


def read_barriers(sweep: Path, groups: list[Group], warnings: list[str]) -> list:
    """The sweep's pair records (refused files become warnings) of the runs' current weights."""
    try:
        records, refused = barrier_files.read_sweep(sweep)
    except (OSError, RefusedFile) as e:
        warnings.append(f"barriers/ unreadable ({e}): no barriers in this report")
        return []
    warnings += [f"barriers: {Path(p).name} left out: {why}" for p, why in refused]
    return records


def current_fingerprints(groups: list[Group]) -> dict[str, str]:
    """run id -> the fingerprint of its final weights (run.json ``record``), for the runs in the report."""
    out = {}
    for g in groups:
        for r in g.used or g.members:
            fp = (r.info.get("record") or {}).get("fingerprint")
            if isinstance(fp, str):
                out[r.run_id] = fp
    return out


def _pairs(g: Group) -> dict[str, PairValues]:
    """The group's final divergences as pair values (test disagreement %, parameter distance %)."""
    out: dict[str, PairValues] = {}
    if g.stats is None or g.stats.n_models < 2:
        return out
    agree = g.stats.pairs.get("disagreement")
    if agree is not None:
        n = float(g.stats.n_examples)
        out["disagreement"] = PairValues.from_matrix(100.0 * (n - agree.matrix.astype(np.float64)) / n)
    dist = g.stats.pairs.get("param_distance")
    if dist is not None:
        out["distance"] = PairValues.from_matrix(np.asarray(dist.matrix, dtype=np.float64))
    return out


def stability_section(groups: list[Group], barriers: dict[str, dict[str, PairValues]], *, n_boot: int,
                      seed: int) -> Optional[StabilitySection]:
    """The section for the sweep's single-model groups; None when no run was perturbed later."""
    plain = [g for g in groups if g.view_id == "plain" and not g.stopped]
    if not any(g.from_epoch for g in plain):
        return None
    curves: dict[tuple[str, str], dict[int, Group]] = {}
    for g in plain:
        curves.setdefault((family(g.identity), g.source_name), {})[g.from_epoch] = g
    data: dict[tuple[str, str], dict[int, PairValues]] = {}
    notes = []
    for (_, source), by_k in curves.items():
        if not any(by_k):
            continue
        if 0 not in by_k:
            g = next(iter(by_k.values()))
            notes.append(f"{g.label}: no group perturbed at the start (source.from_epoch=0) to compare with; "
                         f"stable-after needs it (add source.from_epoch=0 to the sweep)")
            continue
        name = by_k[0].name
        for k, g in by_k.items():
            values = {**_pairs(g), **barriers.get(g.group_key, {})}
            for metric, pv in values.items():
                data.setdefault((name, metric), {})[k] = pv
    data = {key: pts for key, pts in data.items() if 0 in pts and len(pts) > 1}
    if not data:
        return StabilitySection(pd.DataFrame(), pd.DataFrame(), notes)
    table, summary = stability_table(data, fraction=FRACTION, n_boot=n_boot, seed=seed)
    return StabilitySection(table, summary, notes)


def barrier_table(records: list, groups: list[Group], *, n_boot: int, seed: int
                  ) -> tuple[pd.DataFrame, dict[str, dict[str, PairValues]]]:
    """(barrier columns per group key, the pair values per group key) of the records of current weights."""
    fps = current_fingerprints(groups)
    return (barrier_columns(records, fingerprints=fps, n_boot=n_boot, seed=seed),
            barrier_values(records, fingerprints=fps))


def join_barriers(df: pd.DataFrame, barriers: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv with each group's barrier columns (single-model rows; NaN where none was measured)."""
    if barriers.empty:
        return df
    b = barriers.set_index("group_key")
    out = df.copy()
    plain = out["view_id"] == "plain"
    for col in BARRIER_COLUMNS:
        out[col] = [b.at[k, col] if p and k in b.index else math.nan for k, p in zip(out["group_key"], plain)]
    return out


# --- text ------------------------------------------------------------------------------------------
def _k(v) -> str:
    return "never" if v is None or (isinstance(v, float) and math.isnan(v)) else f"epoch {int(v)}"


def _g(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}g}"


def _line(s: pd.Series) -> str:
    title, unit = METRICS.get(s["metric"], (s["metric"], ""))
    ref = f"{_g(s['k0_mean'])}{' ' + unit if unit else ''}"
    head = f"{s['source']}, {title}"
    if not s["k0_mean"] > 0:
        return f"{head}: its value with the perturbation at the start (k=0) is {ref}: nothing to fall from"
    where = f"{s['fraction']:g} x its k=0 value {ref}"
    lo, hi = _k(s["stable_lo"]), _k(s["stable_hi"])
    if s["stable_after"] is None or pd.isna(s["stable_after"]):
        return (f"{head}: at no k measured below {where} (95% interval of the first such k: {lo} .. {hi}; never "
                f"in {100 * s['never_share']:.0f}% of resamples)")
    stays = "stays below at every later k" if s["stays_below"] else "rises above it again at a later k"
    return (f"{head}: stable after {_k(s['stable_after'])}, the first k below {where} ({stays}; 95% interval "
            f"{lo} .. {hi}, never in {100 * s['never_share']:.0f}% of resamples)")


def summary_lines(sec: Optional[StabilitySection]) -> list[str]:
    """One line per (source, metric): where its divergence falls below the stated fraction of k = 0."""
    if sec is None:
        return []
    lines = [_line(s) for _, s in sec.summary.iterrows()] + sec.notes
    return ["", "When does training become stable?", *[f"  {ln}" for ln in lines]] if lines else []


def section_md(sec: Optional[StabilitySection], figures: list[str]) -> list[str]:
    """report.md's section."""
    if sec is None:
        return []
    parts = ["## When does training become stable?", "",
             f"Each source applied from epoch k (source.from_epoch; the first k epochs are the determinism "
             f"control's, trained once by the parent run). Final divergence of the runs of each (source, k): "
             f"disagreement (% of test examples two runs predict differently), parameter distance (% of the pair's "
             f"mean norm, exact from the final weights) and, where measured, the loss and error barriers on the "
             f"straight line between two final models; mean over pairs with a 95% bootstrap interval over runs. "
             f"Stable after: the first k whose mean is below {FRACTION:g} x the k = 0 value (docs/metrics.md, "
             f"'Stable after'). stability.csv and stability_summary.csv hold the numbers.", ""]
    if not sec.table.empty:
        t = sec.table
        rows = [f"| {r.source} | {METRICS.get(r.metric, (r.metric, ''))[0]} | {r.k} | {r.n_runs} | {_g(r.mean)} "
                f"[{_g(r.ci_lo)}, {_g(r.ci_hi)}] | {_g(r.ratio)} |" for r in t.itertuples()]
        parts += ["| source | divergence | k | N | mean [95% CI] | / k=0 |", "|:--|:--|--:|--:|--:|--:|", *rows, ""]
    parts += [f"- {ln.strip()}" for ln in summary_lines(sec)[2:]]
    if FIGURE in figures:
        parts += ["", f"![stability]({FIGURE})"]
    return parts + [""]


def figure(sec: Optional[StabilitySection]) -> Optional[bytes]:
    return stability_png(sec.table, sec.summary) if sec is not None and not sec.table.empty else None
