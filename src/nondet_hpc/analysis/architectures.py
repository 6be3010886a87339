"""Where instability begins: each architecture's bit-change variability over its init variability.

The report's architectures table (experiment=architectures, docs/experiments/architectures.md):
for every model of a sweep that has an init group and a bit-change group of the same config
(the plain single-model view), the one-ulp change's variability as a fraction of a new
initialisation's:

    acc_sd_ratio = acc_sd(bit change) / acc_sd(init),  disagreement_ratio = disagreement(bit change) / disagreement(init)

A ratio near 1: one ulp of one weight ends as far away as a new random init (unstable training,
the paper's claim 2); near 0: the change dies out (stable; a convex model such as ``linearnet``
should be). The SE of a ratio is the delta method's, ``ratio * sqrt((se_a/a)^2 + (se_b/b)^2)``,
from the groups' bootstrap SEs of the SDs (the disagreement has no SE column: none there). The
control group (``none``) beside them must show exactly 0.

The condition-number column is the slot for the instability section's per-group result (issue 20:
the condition number of training, measured on the bit-change group's trajectories):
``architectures_table(groups, condition_numbers={group_key: value})`` fills it; without it the
column is NaN and the Markdown says it was not measured.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from ..presets import ARCHITECTURES
from ..registry.models import MODELS
from ..registry.sources import BITFLIP, CONTROL
from .groups import Group, family

INIT = "init"
COLUMNS = ["model", "n_parameters", "n_init", "n_bitflip", "acc_sd_init", "acc_sd_bitflip", "acc_sd_ratio",
           "acc_sd_ratio_se", "disagreement_init", "disagreement_bitflip", "disagreement_ratio", "control_acc_sd",
           "control_disagreement", "condition_number"]


def _ratio(a: float, b: float) -> float:
    return a / b if np.isfinite(a) and np.isfinite(b) and b > 0 else math.nan


def _ratio_se(r: float, a: float, sa: float, b: float, sb: float) -> float:
    if not (np.isfinite(r) and a > 0 and b > 0 and np.isfinite(sa) and np.isfinite(sb)):
        return math.nan
    return r * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)


def _order(name: str) -> tuple[int, int]:
    ladder = list(ARCHITECTURES)
    return (ladder.index(name), 0) if name in ladder else (len(ladder), list(MODELS).index(name) if name in MODELS else 0)


def architectures_table(groups: list[Group], condition_numbers: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per model (and config) that has both an init and a bit-change group; empty otherwise."""
    by_family: dict[str, dict[str, Group]] = {}
    for g in groups:
        if g.view_id == "plain" and g.source_name in (INIT, BITFLIP, CONTROL):
            by_family.setdefault(family(g.identity), {})[g.source_name] = g
    rows = []
    for fam in by_family.values():
        init, bit, ctrl = fam.get(INIT), fam.get(BITFLIP), fam.get(CONTROL)
        if init is None or bit is None:
            continue
        a, b = bit.summary.get("acc_sd", math.nan), init.summary.get("acc_sd", math.nan)
        da, db = bit.summary.get("disagreement", math.nan), init.summary.get("disagreement", math.nan)
        ratio = _ratio(a, b)
        n_params = next((r.info.get("n_parameters") for r in bit.used or bit.members if r.info.get("n_parameters")),
                        None)
        rows.append({
            "model": str(bit.identity.get("model.name", "?")), "n_parameters": n_params,
            "n_init": len(init.used), "n_bitflip": len(bit.used),
            "acc_sd_init": b, "acc_sd_bitflip": a, "acc_sd_ratio": ratio,
            "acc_sd_ratio_se": _ratio_se(ratio, a, bit.se.get("acc_sd_se", math.nan), b,
                                         init.se.get("acc_sd_se", math.nan)),
            "disagreement_init": db, "disagreement_bitflip": da, "disagreement_ratio": _ratio(da, db),
            "control_acc_sd": ctrl.summary.get("acc_sd", math.nan) if ctrl else math.nan,
            "control_disagreement": ctrl.summary.get("disagreement", math.nan) if ctrl else math.nan,
            "condition_number": float((condition_numbers or {}).get(bit.group_key, math.nan)),
        })
    df = pd.DataFrame(rows, columns=COLUMNS)
    if len(df) < 2:  # one architecture is not a ladder: the other tables say everything about it
        return pd.DataFrame(columns=COLUMNS)
    return df.iloc[sorted(range(len(df)), key=lambda i: _order(df["model"].iloc[i]))].reset_index(drop=True)


def _num(v: float, fmt: str) -> str:
    return format(v, fmt) if v is not None and np.isfinite(v) else "-"


def architectures_md(df: pd.DataFrame) -> str:
    """The table as Markdown, with what its columns mean; "" when there is no ladder."""
    if df.empty:
        return ""
    head = ("| model | parameters | N init / bit | acc SD init (pp) | acc SD bit (pp) | bit / init (acc SD) | "
            "disagreement init (%) | disagreement bit (%) | bit / init (disagr.) | control acc SD / disagr. | "
            "condition number |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in df.itertuples():
        ratio = _num(r.acc_sd_ratio, ".2f") + (f" ± {r.acc_sd_ratio_se:.2f}" if np.isfinite(r.acc_sd_ratio_se) else "")
        params = f"{int(r.n_parameters):,}" if r.n_parameters is not None and np.isfinite(r.n_parameters) else "?"
        lines.append(f"| `{r.model}` | {params} | {r.n_init} / {r.n_bitflip} | "
                     f"{_num(r.acc_sd_init, '.3f')} | {_num(r.acc_sd_bitflip, '.3f')} | {ratio} | "
                     f"{_num(r.disagreement_init, '.2f')} | {_num(r.disagreement_bitflip, '.2f')} | "
                     f"{_num(r.disagreement_ratio, '.2f')} | {_num(r.control_acc_sd, '.3f')} / "
                     f"{_num(r.control_disagreement, '.2f')} | {_num(r.condition_number, '.3g')} |")
    measured = np.isfinite(df["condition_number"].to_numpy(dtype=float)).any()
    notes = ["", "Each architecture's variability under the one-ulp bit change as a fraction of its variability "
             "under a new initialisation (plain single models; ± the delta-method SE from the bootstrap SEs of the "
             "two SDs). Near 1: training is unstable, one ulp ends as far away as a new init; near 0: the change "
             "dies out (stable). The control (source none) must be exactly 0.",
             "" if measured else "The condition number of training (the bit-change group's, from its recorded "
             "trajectories) was not measured in this sweep: '-'."]
    return "\n".join(lines + notes).rstrip() + "\n"


def architectures_png(df: pd.DataFrame) -> bytes | None:
    """Bars per architecture (ladder order): bit-change accuracy SD and disagreement over init's, with
    the acc-SD ratio's SE; a line at 1 (as variable as a new init). None when there is no ladder."""
    if df.empty:
        return None
    from matplotlib.figure import Figure

    from .plots import _png

    x = np.arange(len(df))
    fig = Figure(figsize=(1.1 * len(df) + 3.0, 3.6), layout="constrained")
    ax = fig.subplots()
    acc = df["acc_sd_ratio"].to_numpy(dtype=float)
    dis = df["disagreement_ratio"].to_numpy(dtype=float)
    err = df["acc_sd_ratio_se"].to_numpy(dtype=float)
    ax.bar(x - 0.2, np.nan_to_num(acc), 0.4, yerr=np.where(np.isfinite(err), err, 0), capsize=3,
           label="accuracy SD: bit change / init")
    ax.bar(x + 0.2, np.nan_to_num(dis), 0.4, label="disagreement: bit change / init")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [str(m) for m in df["model"]], rotation=30, ha="right")
    ax.set_ylabel("bit change / init")
    ax.set_title("Where instability begins (1 = one ulp varies as much as a new init)")
    ax.legend(fontsize=8)
    return _png(fig)
