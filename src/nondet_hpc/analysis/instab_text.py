"""The Instability section in words: report.md's section, the printed summary's lines, the figure.

Numbers come from :mod:`.instab_report`; the formulas and how to read them are in docs/metrics.md
("Instability").
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from ..registry.sources import CONTROL
from .instab_report import PAPER_KAPPA, SATURATION, Family, GroupDivergence, Section, sketch_sd_pct
from .instability import summary
from .tables import markdown

FIGURE = "divergence.png"


def _g(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 and (x == 0 or abs(x) >= 1e-3) else f"{x:.2e}"


def _epoch(step: int, gd: GroupDivergence) -> str:
    c = gd.curve
    k = np.flatnonzero(c.step == step)
    return f"{c.epoch[k[0]]:.3g}" if len(k) else "?"


def _range(s: dict, digits: int = 3) -> str:
    return f"median {_g(s['median'], digits)} (range {_g(s['min'], digits)} to {_g(s['max'], digits)}, {s['n']} runs)"


def kappa_line(f: Family) -> str:
    k = f.kappa
    if not k["n"]:
        return (f"Condition number of training{f.where}: not measured (no bit-change run with a usable twin or "
                f"partner: both need trajectory.npz and weights.safetensors).")
    who = ("each bit-change run against its unperturbed twin (a run of the same configuration without the bit "
           "change, e.g. the determinism control)" if f.mode == "twin" else
           "pairs of bit-change runs of the group (no unperturbed twin in the sweep; the partner's norms are the "
           "reference)")
    verdict = ("above" if k["min"] >= PAPER_KAPPA else "below" if k["max"] < PAPER_KAPPA else "on both sides of")
    return (f"Condition number of training{f.where} (relative change of the final parameters / relative change of "
            f"the initial ones, {who}): {_range(k)}; the paper bounds it below by about {PAPER_KAPPA:.0e}: ours "
            f"is {verdict} it.")


def speed_lines(f: Family) -> list[str]:
    grow = summary([p.growth_first_epoch for p in f.pairs])
    tau = summary([p.efolding_steps for p in f.pairs])
    lines = [f"Growth of the bit change's distance{f.where} over the first epoch: {_range(grow)} fold; "
             f"e-folding time {_range(tau)} optimizer steps (fitted before the distance reaches half its largest "
             f"value)."]
    if f.reference is None:
        lines.append(f"As good as a new seed{f.where}: not measured (no all-sources or init group with trajectories).")
        return lines
    ref = f.reference.group.row_name
    if f.saturation is None:
        def share(value: str) -> float:
            mine, theirs = getattr(f.bit.curve, value)[-1], getattr(f.reference.curve, value)[-1]
            return 100 * mine / theirs if theirs > 0 else math.nan

        probe = ("" if f.saturation_probe is None else
                 f"; its probe disagreement reached {SATURATION:.0%} of {ref}'s at step {f.saturation_probe}")
        lines.append(f"As good as a new seed{f.where}: not within the recorded training: at the end the bit change's "
                     f"parameter distance is {_g(share('rel_distance'))} % of {ref}'s and its probe disagreement "
                     f"{_g(share('disagreement'))} % (threshold {SATURATION:.0%}){probe}.")
    else:
        probe = ("never" if f.saturation_probe is None else
                 f"step {f.saturation_probe} (epoch {_epoch(f.saturation_probe, f.bit)})")
        lines.append(f"As good as a new seed{f.where}: a one-ulp change is as good as a new seed after "
                     f"{f.saturation} steps (epoch {_epoch(f.saturation, f.bit)}): the first recorded point at which "
                     f"the bit-change group's parameter distance reaches {SATURATION:.0%} of {ref}'s (probe "
                     f"disagreement: {probe}).")
    return lines


def control_lines(sec: Section) -> list[str]:
    out = []
    for gd in sec.curves:
        if gd.group.source_name != CONTROL:
            continue
        c = gd.curve
        if c.n_runs < 2:
            out.append(f"{gd.group.row_name}: {c.n_runs} run with a trajectory; two are needed to check determinism.")
        elif c.first_split is None:
            out.append(f"{gd.group.row_name}: the fingerprints (SHA-256 of the parameters) of its {c.n_runs} runs are "
                       f"identical at every one of the {len(c.step)} recorded points: training is bit-identical.")
        else:
            out.append(f"{gd.group.row_name}: fingerprints differ from step {c.first_split} on (see the warning at "
                       f"the top).")
    return out


def summary_lines(sec: Optional[Section]) -> list[str]:
    """The printed summary's lines (after the claims)."""
    if sec is None:
        return []
    lines = [*sec.alarms, *control_lines(sec)]
    for f in sec.families:
        lines += [kappa_line(f), *speed_lines(f)]
    return ["", "Instability:", *[f"  {ln}" for ln in lines]] if lines else []


def _pivot(sec: Section, value: str, digits: int) -> str:
    steps = sorted({int(s) for gd in sec.curves for s in gd.curve.step})
    cols: dict[str, list[str]] = {"step": [str(s) for s in steps]}
    first = sec.curves[0]
    cols["epoch"] = [_epoch(s, first) if s in set(first.curve.step.tolist()) else "" for s in steps]
    for gd in sec.curves:
        vals = dict(zip(gd.curve.step.tolist(), getattr(gd.curve, value)))
        cols[gd.group.row_name] = [_g(vals[s], digits) if s in vals else "" for s in steps]
    return markdown(pd.DataFrame(cols))


def section_md(sec: Optional[Section], figures: list[str], claim2: list[str]) -> list[str]:
    """report.md's "Instability" section."""
    if sec is None:
        return []
    n = sum(gd.curve.n_runs for gd in sec.curves)
    parts = ["## Instability", "",
             (f"From the trajectories ({n} runs; trajectory.npz: parameters' fingerprint, norms, a count sketch "
              f"and probe logits at each recorded point) and the final weights (weights.safetensors). Parameter "
              f"distance: mean over pairs of ||theta_a - theta_b|| in % of the pair's mean norm, estimated from the "
              f"sketches (one SD of a pair's estimate: {sketch_sd_pct(sec.curves):.1f} % of it) and exact at the end "
              f"from the weights. Probe disagreement: % of the probe test images two runs predict differently, mean "
              f"over pairs. docs/metrics.md, 'Instability', gives the formulas."), ""]
    parts += [f"- {ln}" for ln in control_lines(sec)]
    for f in sec.families:
        parts += [f"- {kappa_line(f)}", *[f"- {ln}" for ln in speed_lines(f)]]
    parts += [f"- {ln}" for ln in claim2]
    parts += ["", "Parameter distance (% of norm) at each recorded point:", "", _pivot(sec, "rel_distance", 3), ""]
    exact = [gd for gd in sec.curves if math.isfinite(gd.exact)]
    if exact:
        parts += ["At the end, exactly (weights files) and the sketch's error against it:", "",
                  markdown(pd.DataFrame({"group": [gd.group.row_name for gd in exact],
                                         "exact %": [_g(gd.exact, 4) for gd in exact],
                                         "sketch %": [_g(gd.curve.rel_distance[-1], 4) for gd in exact],
                                         "error of the mean %": [_g(gd.sketch_error, 2) for gd in exact],
                                         "largest pair error %": [_g(100 * np.max(np.abs(gd.pair_errors)), 2)
                                                                  if len(gd.pair_errors) else "-" for gd in exact]})),
                  ""]
    parts += ["Probe disagreement (%) at each recorded point:", "", _pivot(sec, "disagreement", 3), ""]
    if FIGURE in figures:
        parts += [f"![divergence]({FIGURE})", ""]
    parts += [f"- {n}" for n in sec.notes]
    return parts + ([""] if sec.notes else [])


def claim2_lines(stats: pd.DataFrame) -> list[str]:
    """The direct evidence of claim 2 from claims.csv's rows (the final parameter distance ratio)."""
    rows = stats[stats["statistic"] == "final parameter distance ratio"] if not stats.empty else stats
    return [f"Claim 2{r['where']}, direct evidence: final parameter distance of {r['group']} / {r['reference']} = "
            f"{_g(r['value'])} [{_g(r['ci_low'])}, {_g(r['ci_high'])}] (95% bootstrap CI over models, N "
            f"{r['n_models']}/{r['n_reference']}; outcome: {r['outcome']})." for _, r in rows.iterrows()]


def divergence_png(sec: Optional[Section]) -> Optional[bytes]:
    """Parameter distance (log) and probe disagreement against optimizer steps + 1 (log), one line
    per group; a group at exactly 0 (the control) is drawn on the bottom edge of the left panel."""
    from matplotlib.figure import Figure

    from .plots import _png

    if sec is None or not any(gd.curve.n_runs >= 2 for gd in sec.curves):
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    curves = [gd for gd in sec.curves if gd.curve.n_runs >= 2]
    positive = [v for gd in curves for v in gd.curve.rel_distance if v > 0 and math.isfinite(v)]
    floor = min(positive) / 3 if positive else 1e-9
    for gd in curves:
        c = gd.curve
        x = c.step + 1.0
        zero = not np.any(c.rel_distance > 0)
        # a group at 0 everywhere sits on the bottom edge; other groups' zeros (before they part) are not drawn
        y = np.full(len(x), floor) if zero else np.where(c.rel_distance > 0, c.rel_distance, np.nan)
        left.plot(x, y, marker="o", ms=3, ls="--" if zero else "-",
                  label=gd.group.row_name + (" (0 at every point)" if zero else ""))
        right.plot(x, c.disagreement, marker="o", ms=3, label=gd.group.row_name)
        if math.isfinite(gd.exact) and gd.exact > 0:
            left.plot([x[-1]], [gd.exact], marker="*", ms=10, color=left.lines[-1].get_color(), ls="none")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("optimizer steps + 1 (log)")
        ax.grid(alpha=0.3, which="both")
    left.set_yscale("log")
    left.set_ylabel("parameter distance, % of norm (log)")
    left.set_title("Parameters: mean pairwise distance (sketch; * exact)", fontsize=10)
    right.set_ylabel("probe disagreement (%)")
    right.set_title("Predictions: mean pairwise probe disagreement", fontsize=10)
    left.legend(fontsize=7, loc="best")
    return _png(fig)
