"""The reducer: SWEEP_DIR/runs/*/logits -> metrics tables and plots in SWEEP_DIR/report/.

    python -m nondet_hpc.reduce SWEEP_DIR [--formula paper|report] [--baseline NAME]
                                          [--n-boot N] [--seed S] [--allow-mixed]
                                          [--slurm-timeout S]

Runs are grouped by everything in their config except the replicate seed (run.json "group_key")
and by logits view, so single models, test-time augmentation (TTA) views and accelerated
(snapshot) ensembles all come out of the same code as rows of one table. Metric formulas live in
:mod:`nondet_hpc.metrics`, the report's metrics are declared in :mod:`nondet_hpc.registry.metrics`,
and both are explained in docs/metrics.md.

What cannot be measured is said, never silently dropped: runs without DONE, diverged runs
(non-finite logits), corrupt or wrongly shaped files, missing snapshots are listed in
report/excluded.csv and in the printed summary; a group whose runs disagree on the test labels is
stopped with the offending run named; a group with fewer than two usable models gets its
accuracy and a note instead of pairwise metrics. The rest of the report is still produced.

Before any statistic (:mod:`.integrity`, :mod:`.accounting`): each model counts once (symbolic
links, copied folders and repeated seeds are exclusions); test labels and data hashes must agree
across the whole sweep; a group whose runs come from different environments (threads, device,
GPU, torch/CUDA/cuDNN, fp32 settings) is refused unless ``allow_mixed``; with SWEEP_DIR/sweep.json
every planned run is accounted for, and a row below its planned N shows ``N`` as ``used/planned*``.

The stages, one module each: :mod:`.scan` (run folders), :mod:`.groups` (rows and their names),
:mod:`.stats` (per-group metrics, baselines; :mod:`.inputs` opens the files other pairwise metrics
read), :mod:`.claims` (ablation, claim 1), :mod:`.tables` (text output), :mod:`.plots` (figures),
:mod:`.verdicts` (the claims judged), :mod:`.resample` (their bootstrap over models),
:mod:`.published` (published values beside ours); this module runs them in order and writes the
report.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import metrics as M
from . import instab_text, report_files, stable_report, tables
from .accounting import (
    DEFAULT_SLURM_TIMEOUT_S,
    NEVER_STARTED,
    Accounting,
    JobStates,
    account,
    summary_lines,
)
from .architectures import architectures_md, architectures_png, architectures_table
from .claims import ablation, claim1
from .groups import VIEW_DISPLAY, Group, build_groups, view_display
from .instab_report import Section, instability_section
from .integrity import MIXED_HINT, Mix, Outlier, data_outliers, mixed_groups
from .published import Comparison, compare, published_md
from .report_files import REPORT_FILES
from .scan import Exclusion, ReduceError, Run, parse_view_file, scan_sweep
from .stats import apply_baselines, columns, group_row, no_variation_lines, per_model, reduce_group
from .tables import format_table
from .verdicts import Judgement, claims_md, judge

__all__ = ["REPORT_FILES", "VIEW_DISPLAY", "ReduceError", "format_table", "reduce_sweep", "view_display"]

EXCLUDED_COLUMNS: list[str] = ["run_id", "group", "view", "category", "reason", "group_key"]


@dataclass
class _Results:
    """Everything the report is written from."""

    sweep: Path
    n_runs: int
    df: pd.DataFrame
    per_model: pd.DataFrame
    ablation: pd.DataFrame
    claim1: pd.DataFrame
    claim1_lines: list[str]
    excluded: list[Exclusion]
    warnings: list[str]
    formula: str
    n_boot: int
    seed: int
    accounting_lines: list[str]
    mixes: list[Mix]
    top: list[str]  # said first: a varied source that produced no variation
    judgement: Judgement | None = None
    published: Comparison | None = None
    architectures: pd.DataFrame | None = None  # analysis/architectures.py: empty without a ladder of models
    instability: Section | None = None
    stability: stable_report.StabilitySection | None = None  # perturbations from epoch k (source.from_epoch)


def reduce_sweep(sweep_dir: str | os.PathLike, *, formula: str = "paper", n_boot: int = 10_000, seed: int = 0,
                 baseline: str | None = None, block_bytes: int = M.DEFAULT_BLOCK_BYTES, allow_mixed: bool = False,
                 slurm_timeout: float = DEFAULT_SLURM_TIMEOUT_S, job_states: JobStates | None = None) -> pd.DataFrame:
    """Reduce a sweep: write SWEEP_DIR/report/ and return the metrics table (one row per group).

    ``formula`` picks the variability-reduction formula ("paper" or "report", docs/metrics.md);
    ``baseline`` names the row every other row is compared with (default: each TTA / Acc.Ens row
    against the single-model row of its own group, a snapshot-trained group's rows against the
    snapshots=1 group of the same config). ``n_boot`` resamples with generator seed ``seed`` make
    the bootstrap SEs reproducible. A group whose runs come from different environments raises
    :class:`ReduceError` naming them, unless ``allow_mixed`` (then the report states the mix).
    ``slurm_timeout``: seconds sacct may take to give the state of planned runs that never started
    (0: do not ask); ``job_states`` is that lookup (the cluster's, passed by the entry points; None:
    SLURM is not asked). The printed summary (table, claim-1 line, what was left out) is in
    ``df.attrs["summary"]``; the report folder in ``df.attrs["report_dir"]``.
    Raises :class:`ReduceError` when there is nothing to reduce or the input cannot be used.
    """
    _check_request(formula, n_boot, seed)
    sweep = Path(sweep_dir)
    report = report_files.check_writable(sweep)  # a link or a file there: found before minutes of work
    warnings: list[str] = []
    runs, excluded = scan_sweep(sweep, warnings)
    mixes = mixed_groups(runs)
    if mixes and not allow_mixed:
        lines = [ln for m in mixes for ln in m.describe()]
        raise ReduceError(f"{len(mixes)} group(s) of {sweep} hold runs of different environments:\n"
                          + "\n".join(lines) + "\n" + MIXED_HINT)
    acc = account(sweep, runs, excluded, slurm_timeout=slurm_timeout, job_states=job_states)
    if acc.problem:  # a damaged sweep.json: the report comes from the run folders alone
        warnings.append(f"{acc.problem}; this report is made from the run folders alone")
    if not runs:
        pending = tables.excluded_summary(excluded)
        raise ReduceError(f"{sweep}/runs has no complete run to reduce.\n" + "\n".join(pending))
    groups = _reduce_groups(runs, sweep, excluded, warnings, data_outliers(runs), n_boot=n_boot, seed=seed,
                            block_bytes=block_bytes)
    _count_rows(groups, excluded, acc, mixes)
    df = pd.DataFrame([group_row(g) for g in groups], columns=columns())
    apply_baselines(df, groups, formula, baseline)
    barrier_cols, barrier_pairs = stable_report.barrier_table(stable_report.read_barriers(sweep, groups, warnings),
                                                              groups, n_boot=n_boot, seed=seed)
    df = stable_report.join_barriers(df, barrier_cols)
    c1, c1_lines = claim1(groups, n_boot, seed)
    res = _Results(sweep, len(runs), df, per_model(groups), ablation(groups, seed), c1, c1_lines, excluded,
                   warnings, formula, n_boot, seed, _accounting_lines(groups, runs, excluded, acc), mixes,
                   no_variation_lines(groups))
    res.stability = stable_report.stability_section(groups, barrier_pairs, n_boot=min(n_boot, 2000), seed=seed)
    _judge_and_compare(res, groups, sweep, warnings)
    # lazy: the preset catalogue is only needed for the summary's first line
    from ..presets import describe_sweep  # torch- and Hydra-free

    reproduces = describe_sweep(sorted({str(r.info.get("experiment") or "") for r in runs}))
    summary = _summary(res, reproduces, report)
    report_files.write(sweep, _report_files(res, summary), warnings)
    df.attrs.update(summary=summary, reproduces=reproduces, report_dir=str(report), claim1=list(c1_lines),
                    claims=[v.text for v in res.judgement.verdicts], excluded=[dict(e.__dict__) for e in excluded],
                    warnings=list(warnings))
    return df


def _judge_and_compare(res: _Results, groups: list[Group], sweep: Path, warnings: list[str]) -> None:
    """The claims, the published values beside ours, the Instability section and the architecture ladder."""
    res.judgement = judge(groups, res.df, res.claim1, res.formula, res.n_boot, res.seed)
    res.published = compare(groups, res.df, res.ablation, res.judgement)
    res.instability = instability_section(groups, sweep, warnings)
    res.architectures = architectures_table(groups, _condition_numbers(res.instability))


def _row_exclusions(g: Group, excluded: list[Exclusion]) -> set[str]:
    """Run ids left out of ``g``'s row: exclusions of the whole run or of this row's view."""
    disp = view_display(g.view_id) or "single model"
    out = set()
    for e in excluded:
        if e.group_key != g.group_key or e.category == NEVER_STARTED:
            continue
        view = parse_view_file(e.view)
        if e.view in ("all", disp) or (view is not None and view[0] == g.view_id):
            out.add(e.run_id)
    return out


def _count_rows(groups: list[Group], excluded: list[Exclusion], acc: Accounting, mixes: list[Mix]) -> None:
    """n_excluded (scan and group exclusions), n_planned, n_never_started and the rows' notes."""
    mixed = {m.group_key: m for m in mixes}
    for g in groups:
        g.n_excluded = len(_row_exclusions(g, excluded))
        if g.n_excluded:
            g.notes.append(f"{g.n_excluded} run(s) left out (see excluded.csv)")
        if g.group_key in mixed:
            g.notes.append(mixed[g.group_key].summary() + " (--allow-mixed)")
        planned = acc.n_planned(g.group_key)
        if planned is None:
            continue
        g.n_planned = float(planned)
        g.n_never_started = acc.never_started.get(g.group_key, 0)
        if len(g.used) < planned:
            g.notes.append(f"* below plan: {len(g.used)} of {planned} planned models used "
                           f"({g.n_never_started} never started, {g.n_excluded} left out; excluded.csv)")


def _accounting_lines(groups: list[Group], runs: list[Run], excluded: list[Exclusion], acc: Accounting) -> list[str]:
    names = {g.group_key: g.name for g in groups}
    done = Counter(r.group_key for r in runs)
    excl = Counter(gk for gk, _ in {(e.group_key, e.run_id) for e in excluded
                                     if e.group_key and e.category != NEVER_STARTED})
    return summary_lines(acc, names, done, excl)


def _check_request(formula: str, n_boot: int, seed: int) -> None:
    if formula not in M.FORMULAS:
        raise ReduceError(f"--formula must be one of {M.FORMULAS}, got {formula!r}")
    if n_boot < 2:
        raise ReduceError(f"--n-boot must be at least 2, got {n_boot}")
    if seed < 0:
        raise ReduceError(f"--seed must be a non-negative integer, got {seed}")


def _reduce_groups(runs: list[Run], sweep: Path, excluded: list[Exclusion], warnings: list[str],
                   outliers: dict[str, Outlier], *, n_boot: int, seed: int, block_bytes: int) -> list[Group]:
    """Every group's statistics, with notes on runs not (yet) in it."""
    groups = build_groups(runs)
    pending = Counter(e.group_key for e in excluded if e.category == "incomplete" and e.group_key)
    complete = Counter(r.group_key for r in runs)
    for g in groups:
        if pending[g.group_key]:
            g.notes.append(f"{pending[g.group_key]} incomplete run(s) not included yet")
        if len(g.members) < complete[g.group_key]:  # views are bookkeeping: runs may differ in them
            g.notes.append(f"view saved by {len(g.members)} of the group's {complete[g.group_key]} complete runs")
        reduce_group(g, sweep, excluded, warnings, n_boot=n_boot, seed=seed, block_bytes=block_bytes,
                     label_outliers=outliers)
    return groups


def _summary(res: _Results, reproduces: str, report: Path) -> str:
    """The printed summary (and summary.txt): what the sweep reproduces, the table, claim 1, left out."""
    alarms = res.instability.alarms if res.instability else []
    lines = [*alarms, *([""] if alarms else []), reproduces, *(["", *res.top] if res.top else []), "",
             format_table(res.df), "", *res.claim1_lines]
    lines += [v.text for v in res.judgement.verdicts] if res.judgement else []
    lines += _claim2_direct(res)
    lines += instab_text.summary_lines(res.instability)
    lines += stable_report.summary_lines(res.stability)
    if res.accounting_lines:
        lines += ["", *res.accounting_lines]
    lines += ["", *tables.excluded_summary(res.excluded)]
    if res.warnings:
        lines += ["", f"Warnings ({len(res.warnings)}):", *[f"  {w}" for w in res.warnings]]
    lines += ["", f"Report: {report} (metrics.csv/.md/.tex, report.md, plots)"]
    return "\n".join(lines)


def _report_files(res: _Results, summary: str) -> dict[str, bytes]:
    """File name -> content of every report file this reduction produces."""
    from . import plots

    df = res.df
    caption = (f"Variability over N models per group ({res.n_runs} complete runs in {res.sweep.name}). "
               + tables.units_line(res.formula))
    md_table = tables.markdown(tables.display_frame(df))
    abl_md = tables.ablation_md(res.ablation)
    exc_df = pd.DataFrame([e.__dict__ for e in res.excluded], columns=EXCLUDED_COLUMNS)
    csv = tables.csv_bytes  # every CSV: a cell that starts like a spreadsheet formula is escaped
    outputs: dict[str, bytes] = {
        "metrics.csv": csv(df),
        "metrics.md": tables.metrics_md(md_table, df, res.formula).encode(),
        "metrics.tex": tables.latex(df, caption).encode(),
        "per_model.csv": csv(res.per_model),
        "excluded.csv": csv(exc_df),
        "ablation.csv": csv(res.ablation),
        "ablation.md": abl_md.encode(),
    }
    if not res.claim1.empty:
        outputs["claim1.csv"] = csv(res.claim1)
    if res.judgement is not None and not res.judgement.stats.empty:
        outputs["claims.csv"] = csv(res.judgement.stats)
    if res.published is not None and not res.published.rows.empty:
        outputs["published.csv"] = csv(res.published.rows)
    if res.architectures is not None and not res.architectures.empty:
        outputs["architectures.csv"] = csv(res.architectures)
        outputs["architectures.md"] = architectures_md(res.architectures).encode()
        outputs["architectures.png"] = architectures_png(res.architectures)
    outputs["summary.txt"] = (summary + "\n").encode()
    if res.instability is not None:
        outputs["instability.csv"] = csv(res.instability.table())
        outputs["instability_groups.csv"] = csv(res.instability.group_table())
        outputs["instability_pairs.csv"] = csv(res.instability.pair_table())
    if res.stability is not None and not res.stability.table.empty:
        outputs["stability.csv"] = csv(res.stability.table)
        outputs["stability_summary.csv"] = csv(res.stability.summary)
    figures = {"metrics.png": plots.group_metrics_png(df), "sd_vs_n.png": plots.sd_vs_n_png(res.ablation),
               "accuracy_spread.png": plots.accuracy_spread_png(res.per_model),
               "claim1.png": plots.claim1_png(res.claim1), "reduction.png": plots.reduction_png(df),
               instab_text.FIGURE: instab_text.divergence_png(res.instability),
               stable_report.FIGURE: stable_report.figure(res.stability)}
    drawn = {k: v for k, v in figures.items() if v is not None}
    outputs.update(drawn)
    alarms = [f"> **{a}**" for a in res.instability.alarms] + [""] if res.instability and res.instability.alarms \
        else []
    outputs["report.md"] = (tables.report_md(res.sweep, df, md_table, res.formula, res.claim1_lines, res.claim1,
                                             abl_md, res.excluded, res.warnings, list(drawn), res.n_boot,
                                             res.seed, claims=alarms + (claims_md(res.judgement) if res.judgement
                                                                        else []),
                                             published=published_md(res.published) if res.published else [],
                                             top=res.top)
                            + _extra_sections(res, list(drawn))).encode()
    return outputs


def _condition_numbers(section: Section | None) -> dict[str, float]:
    """group_key -> the median condition number of training of a bit-change group (Instability)."""
    if section is None:
        return {}
    t = section.group_table()
    if t.empty:
        return {}
    t = t[t["condition_number_median"].notna()]
    return {str(k): float(v) for k, v in zip(t["group_key"], t["condition_number_median"])}


def _claim2_direct(res: _Results) -> list[str]:
    return instab_text.claim2_lines(res.judgement.stats) if res.judgement is not None else []


def _extra_sections(res: _Results, figures: list[str]) -> str:
    """report.md's sections on the sweep as a whole: instability, the architecture ladder, planned runs and
    mixed environments."""
    parts: list[str] = instab_text.section_md(res.instability, figures, _claim2_direct(res))
    parts += stable_report.section_md(res.stability, figures)
    if res.architectures is not None and not res.architectures.empty:
        parts += ["## Where instability begins: bit change / init per architecture", "",
                  architectures_md(res.architectures), "![architectures](architectures.png)", ""]
    if res.accounting_lines:
        parts += ["## Planned runs", "", *[f"    {ln}" for ln in res.accounting_lines], ""]
    if res.mixes:
        parts += ["## Mixed environments (--allow-mixed)", "",
                  "These groups average over runs computed in different environments:", ""]
        parts += [f"    {ln}" for m in res.mixes for ln in m.describe()] + [""]
    from ..sweep.waves import report_section  # torch-free; the study's record in sweep.json

    parts += report_section(res.sweep)
    return "\n" + "\n".join(parts) if parts else ""
