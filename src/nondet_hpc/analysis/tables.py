"""Table output of the reducer: the terminal table, Markdown, LaTeX and report.md, from its DataFrames.

Numbers are formatted once (:func:`display_frame`) and every output prints those strings, so the
terminal, Markdown and LaTeX tables always show the same digits. Columns, titles, digits and the
units line come from :mod:`nondet_hpc.registry.metrics`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..registry.metrics import METRICS
from .claims import ABLATION_SUBSETS
from .scan import Exclusion

#: metrics.csv's loss barrier columns (analysis/stable_report.py joins them) as the table shows them:
#: (column, header, decimals); shown only when some group has a measured barrier
BARRIER_DISPLAY = (("barrier_loss", "Loss barrier", 3), ("barrier_error", "Err. barrier pp", 2))


def _f(v: Any, nd: int) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if not math.isfinite(x) else f"{x:.{nd}f}"


def _pm(v: Any, se: Any, nd: int) -> str:
    s = _f(v, nd)
    return s if s == "-" or not math.isfinite(float(se)) else f"{s} ± {_f(se, nd)}"


def _n(n: Any, planned: Any, distinct: Any = math.nan, duplicates: Any = 0) -> str:
    """N as printed: "1/8" (distinct models / runs) when some runs' logits are identical (the
    control's, or copies merged as one model; the row's note says which), else "2/3*" when fewer
    models than sweep.json planned were used (see the row's note), else the number of models."""
    n = int(n)
    p = float(planned)
    total = n + int(duplicates or 0)
    d = float(distinct)
    below = math.isfinite(p) and total < p
    if math.isfinite(d) and n > 0 and int(d) < total:
        return f"{int(d)}/{total}" + ("*" if below else "")
    return f"{n}/{int(p)}*" if math.isfinite(p) and n < p else str(n)


# ------------------------------------------------------------------------------ CSV files
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(v: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (starting with = + - @, a tab or CR),
    prefixed with ' so it is shown as text; a cell already starting with ' gets one more, so
    :func:`unescape_cell` restores every text exactly. Numbers are left alone."""
    if isinstance(v, str) and v and (v[0] in _FORMULA_START or v[0] == "'"):
        return "'" + v
    return v


def unescape_cell(v: Any) -> Any:
    if isinstance(v, str) and len(v) > 1 and v[0] == "'" and (v[1] in _FORMULA_START or v[1] == "'"):
        return v[1:]
    return v


def _textual(col: pd.Series) -> bool:
    return col.dtype == object or pd.api.types.is_string_dtype(col.dtype)


def csv_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as CSV (no index), every text cell and column name escaped (:func:`escape_cell`):
    the one way the package writes a CSV (a run folder named =HYPERLINK(...) stays text)."""
    out = df.rename(columns=lambda c: escape_cell(str(c)))
    for col in out.columns:
        if _textual(out[col]):
            out[col] = out[col].map(escape_cell)
    return out.to_csv(index=False).encode()


def read_csv(data: bytes, **kwargs: Any) -> pd.DataFrame:
    """A CSV written by :func:`csv_bytes` (its bytes), text cells unescaped."""
    df = pd.read_csv(io.BytesIO(data), **kwargs)
    df = df.rename(columns=unescape_cell)
    for col in df.columns:
        if _textual(df[col]):
            df[col] = df[col].map(unescape_cell)
    return df


def _finite(col: pd.Series) -> bool:
    return bool(np.isfinite(col.to_numpy(dtype=float)).any())


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The metrics table as printed: formatted strings (``± SE`` where a metric has one); an
    optional metric's column (CKA) and the Reduction column only when some row has a value."""
    out = pd.DataFrame({
        "Group": df["group"],
        "N": [_n(n, p, d, k) for n, p, d, k in zip(df["n_models"], _col(df, "n_planned", math.nan),
                                                    _col(df, "n_distinct", math.nan), _col(df, "n_duplicates", 0))],
    })
    for m in METRICS.values():
        if m.optional and not _finite(df[m.key]):
            continue
        if m.se is not None:
            out[m.header] = [_pm(v, s, m.decimals) for v, s in zip(df[m.key], df[m.se])]
        else:
            out[m.header] = [_f(v, m.decimals) for v in df[m.key]]
    for key, header, decimals in BARRIER_DISPLAY:  # measured by python -m nondet_hpc.barriers (some groups)
        if key in df and _finite(df[key]):
            out[header] = [_f(v, decimals) for v in df[key]]
    if _finite(df["reduction_pct"]):
        out["Reduction %"] = [_f(v, 1) for v in df["reduction_pct"]]
    return out


def _col(df: pd.DataFrame, name: str, default: Any) -> list:
    return list(df[name]) if name in df else [default] * len(df)


def markdown(table: pd.DataFrame) -> str:
    """Markdown of already formatted strings (no re-parsing of "1.0000" into "1"), numbers right."""
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=("left",) + ("right",) * (table.shape[1] - 1))


def notes(df: pd.DataFrame) -> list[str]:
    return [f"{g}: {n}" for g, n in zip(df["group"], df["note"]) if isinstance(n, str) and n]


def format_table(df: pd.DataFrame) -> str:
    """The compact terminal table of :func:`reduce_sweep`'s result, notes underneath."""
    from tabulate import tabulate

    if df.empty:
        return "(no groups)"
    disp = display_frame(df)
    text = tabulate(disp.values.tolist(), headers=list(disp.columns), tablefmt="simple", disable_numparse=True)
    lines = notes(df)
    if lines:
        text += "\n\nNotes:\n" + "\n".join(f"  {n}" for n in lines)
    return text


def units_line(formula: str) -> str:
    """The line under every table: each metric's legend, then the reduction's."""
    return "; ".join([*(m.legend for m in METRICS.values() if m.legend),
                      f"Reduction = variability reduction vs the baseline row ({formula} formula, docs/metrics.md)."])


def metrics_md(md_table: str, df: pd.DataFrame, formula: str) -> str:
    """metrics.md: the Markdown table, the units line and the rows' notes."""
    lines = notes(df)
    return (md_table + "\n\n" + units_line(formula) + "\n"
            + ("\nNotes:\n" + "\n".join(f"- {n}" for n in lines) + "\n" if lines else ""))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "{": r"\{",
                  "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}", "^": r"\^{}", "Δ": r"$\Delta$",
                  "±": r"$\pm$"}


def _tex(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s)


def latex(df: pd.DataFrame, caption: str) -> str:
    """metrics.tex: the printed table as a booktabs LaTeX table with ``caption``."""
    disp = display_frame(df)
    cols = list(disp.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for row in disp.itertuples(index=False):
        lines.append(" & ".join(_tex(str(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _tex(caption) + "}", r"\end{table}", ""]
    return "\n".join(lines)


def excluded_summary(excluded: list[Exclusion], limit: int = 15) -> list[str]:
    """What was left out, by category, at most ``limit`` entries each (the rest: excluded.csv)."""
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


def ablation_md(ablation: pd.DataFrame) -> str:
    """ablation.md: each cell the mean ± SD of a metric over the N-subsets."""
    if ablation.empty:
        return "No group has 2 or more models; no N-models ablation.\n"
    cols = {"group": "Group", "n": "N", "n_subsets": "subsets"}
    out = ablation[list(cols)].rename(columns=cols).astype(str)
    for m in METRICS.values():
        if m.ablation:
            out[m.header] = [_pm(v, s, m.decimals) for v, s in zip(ablation[f"{m.key}_mean"],
                                                                   ablation[f"{m.key}_spread"])]
    return (markdown(out) + "\n\nEach cell: mean ± SD of the metric over random N-subsets of the "
            f"group's runs (up to {ABLATION_SUBSETS} subsets; the last row of a group uses all runs).\n")


def _claim1_section(claim1_lines: list[str], claim1: pd.DataFrame, figures: list[str]) -> list[str]:
    parts = ["## Claim 1: every source alone vs all sources together", ""]
    parts += [f"- {ln}" for ln in claim1_lines] or ["No single-model source groups with 2 or more models."]
    parts += [""]
    if not claim1.empty:
        c = claim1.copy()
        c["acc SD"] = [_f(v, 3) for v in c["acc_sd"]]
        c["SD / all"] = [_f(v, 3) for v in c["sd_ratio"]]
        c["95% CI"] = [f"[{_f(a, 3)}, {_f(b, 3)}]" for a, b in zip(c["ci_low"], c["ci_high"])]
        parts += [markdown(c[["group", "n_models", "acc SD", "SD / all", "95% CI"]].astype(str)), ""]
    if "claim1.png" in figures:
        parts += ["![claim 1](claim1.png)", ""]
    if "accuracy_spread.png" in figures:
        parts += ["![accuracy of every model](accuracy_spread.png)", ""]
    return parts


def report_md(sweep: Path, df: pd.DataFrame, md_table: str, formula: str, claim1_lines: list[str],
              claim1: pd.DataFrame, abl_md: str, excluded: list[Exclusion], warnings: list[str],
              figures: list[str], n_boot: int, seed: int, *, claims: Sequence[str] = (),
              published: Sequence[str] = (), top: Sequence[str] = ()) -> str:
    """report.md: what must be said first (``top``: a varied source without variation), the claims
    judged (``claims``), every table, the published values beside ours (``published``), the
    figures that were drawn."""
    parts = [f"# Variability report: {sweep.name}", "", *[f"**{t}**" for t in top], *([""] if top else []),
             (f"Bootstrap: {n_boot} resamples, seed {seed}. Reduction formula: {formula}. "
              "Formulas and how to read this page: docs/metrics.md."), "", *claims, "## Metrics", "", md_table, "",
             units_line(formula), ""]
    lines = notes(df)
    if lines:
        parts += ["Notes:", "", *[f"- {n}" for n in lines], ""]
    if "metrics.png" in figures:
        parts += ["![metrics](metrics.png)", ""]
    if "reduction.png" in figures:
        parts += ["![reduction](reduction.png)", ""]
    parts += [*published]
    parts += _claim1_section(claim1_lines, claim1, figures)
    parts += ["## N-models ablation", "", abl_md, ""]
    if "sd_vs_n.png" in figures:
        parts += ["![SD vs N](sd_vs_n.png)", ""]
    parts += ["## Left out", "", *[f"    {ln}" for ln in excluded_summary(excluded)], ""]
    if warnings:
        parts += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    return "\n".join(parts)
