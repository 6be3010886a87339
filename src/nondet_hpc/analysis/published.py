"""Published values beside ours: the report's Tables 4-10 (Table 6: the paper's, as the report quotes it).

The numbers are package data (``published_tables.csv`` next to this module, cited in its header).
Which tables apply comes from the presets the sweep's runs were made with (run.json ``experiment``,
a ``_quick`` suffix stripped); a published row is matched by what its name means: the source
(``source.name``), the logits view and whether the runs are snapshot-trained, on the same data set,
model and number of epochs. The difference is given in units of our bootstrap SE, or raw where we
have no SE (docs/metrics.md, "Published values").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pandas as pd

from .. import metrics as M
from ..registry.metrics import METRICS
from ..registry.sources import ALL
from . import resample as RS
from .groups import Group
from .scan import ACC_ENS
from .tables import markdown
from .verdicts import Judgement

QUICK = "_quick"
#: preset (run.json experiment) -> the published tables it reproduces
EXPERIMENT_TABLES: dict[str, tuple[int, ...]] = {
    "sources": (4,), "sources_clean": (4,), "bitflip": (5,), "tta": (6, 7), "nmodels": (8,), "epochs": (9,),
    "cifar100": (10,)}
#: published source-row name -> our source.name
SOURCE_ROWS: dict[str, str] = {
    "Determinism": "none", "Parameter Initialization": "init", "Data Shuffling": "shuffle",
    "Data Augmentation": "augment", "cuDNN": "cudnn", "Data Shuffling + cuDNN": "shuffle+cudnn",
    "Data Shuffling + Aug + cuDNN": "shuffle+augment+cudnn", "All Nondeterminism Sources": "all",
    "All Sources": "all", "Random Bit Change": "bitflip"}
#: published TTA-table row name (Tables 6, 7; all sources) -> our view id
VIEW_ROWS: dict[str, str] = {
    "Single Model": "plain", "Single/Flip-TTA": "flip", "Single/Crop25-TTA": "crop25",
    "Single/Crop81-TTA": "crop81", "Single/Flip-Crop25-TTA": "flip-crop25",
    "Single/Flip-Crop81-TTA": "flip-crop81", "Acc.Ens.": ACC_ENS, "Acc.Ens/Flip-TTA": f"{ACC_ENS}/flip",
    "Acc.Ens/Flip-Crop81-TTA": f"{ACC_ENS}/flip-crop81"}
REDUCTION = "reduction_"  # published_tables.csv's reduction columns: reduction_paper, reduction_report
COLUMNS: list[str] = ["table", "origin", "published_row", "group", "n_models", "n_published", "metric", "ours",
                      "ours_se", "published", "published_se", "difference", "se_units", "note"]


def columns() -> list[tuple[str, str, int]]:
    """(published_tables.csv column, title, digits): the registry's published metrics, then the
    variability reduction by each formula (ours from the claim-3 bootstrap)."""
    return ([(m.key, m.header, m.published) for m in METRICS.values() if m.published is not None]
            + [(REDUCTION + f, f"Red. % ({f})", 1) for f in M.FORMULAS])


def load() -> pd.DataFrame:
    """The packaged published tables (one row per table row)."""
    with resources.files(__package__).joinpath("published_tables.csv").open("r", encoding="utf-8") as f:
        return pd.read_csv(f, comment="#")


@dataclass
class Comparison:
    """What report/published.csv and report.md's "Published values" section are written from."""

    rows: pd.DataFrame  # COLUMNS, one row per (published row, metric)
    unmatched: list[str]  # published rows with no row of ours, with why
    unpublished: list[str]  # our rows without a published value
    why_none: str  # non-empty: no comparison applies, and why
    caveat: str = ""  # non-empty: the matched runs are not the authors' experiment (e.g. variant=clean)


def experiments(groups: list[Group]) -> list[str]:
    """The presets (run.json ``experiment``, ``_quick`` stripped) of the sweep's runs, in first-seen order."""
    seen: dict[str, None] = {}
    for g in groups:
        for r in g.members:
            e = str(r.info.get("experiment") or "")
            seen[e.removesuffix(QUICK)] = None
    return list(seen)


def compare(groups: list[Group], df: pd.DataFrame, ablation: pd.DataFrame, judgement: Judgement) -> Comparison:
    """Every applicable published value beside ours (module docstring: which, and how matched)."""
    exps = experiments(groups)
    tables = sorted({t for e in exps for t in EXPERIMENT_TABLES.get(e, ())})
    if not tables:
        named = ", ".join(f"experiment={e}" for e in exps if e) or "no experiment key"
        return Comparison(pd.DataFrame(columns=COLUMNS), [], [],
                          f"the runs record {named}, which reproduces none of the published "
                          f"tables ({', '.join(sorted(EXPERIMENT_TABLES))} do)")
    pub = load()
    pub = pub[pub["table"].isin(tables)]
    datasets = sorted({str(g.identity.get("data.name", "")) for g in groups})
    if not set(datasets) & set(pub["dataset"]):
        return Comparison(pd.DataFrame(columns=COLUMNS), [], [],
                          f"the published Table(s) {', '.join(map(str, tables))} are on "
                          f"{', '.join(sorted(set(pub['dataset'])))}; this sweep's runs are on {', '.join(datasets)}")
    row_of = {g.row_name: i for i, g in enumerate(groups)}
    recs: list[dict[str, Any]] = []
    unmatched: list[str] = []
    used: set[str] = set()
    for p in pub.to_dict("records"):
        g, why = _match(p, groups)
        label = f"Table {p['table']} {p['row']} (N={p['n_models']}, {p['epochs']} epochs)"
        if g is None:
            unmatched.append(f"{label}: {why}")
            continue
        used.add(g.row_name)
        if int(p["n_models"]) < g.stats.n_models and int(p["table"]) == 8:
            recs += _ablation_rows(p, g, ablation)
        elif int(p["table"]) == 8 and int(p["n_models"]) > g.stats.n_models:
            unmatched.append(f"{label}: our {g.row_name} has only {g.stats.n_models} models")
        else:
            recs += _rows(p, g, df.iloc[row_of[g.row_name]], judgement)
    mine = [g.row_name for g in groups if g.row_name not in used and g.stats is not None]
    return Comparison(pd.DataFrame(recs, columns=COLUMNS), unmatched, mine, "",
                      _variant_caveat([g for g in groups if g.row_name in used]))


#: the authors' training behaviours (docs/study.md, Training): other values are our variant
AUTHORS_SETTINGS = {"train.param_groups": "authors", "data.augment_draw": "by_position"}


def _variant_caveat(groups: list[Group]) -> str:
    """Say so when the compared runs differ from the authors' experiment in a training behaviour."""
    other = sorted({f"{k}={g.identity[k]}" for g in groups for k, v in AUTHORS_SETTINGS.items()
                    if k in g.identity and g.identity[k] != v})
    if not other:
        return ""
    authors = ", ".join(f"{k}={v}" for k, v in AUTHORS_SETTINGS.items())
    return (f"These runs use {', '.join(other)}, not the authors' settings ({authors}): the published values are "
            f"of the authors' experiment, so differences are expected by design (with augment_draw=by_image the "
            f"Data Shuffling row measures data order only).")


def _match(p: dict[str, Any], groups: list[Group]) -> tuple[Group | None, str]:
    """Our group for a published row, or None and why not."""
    table, name = int(p["table"]), str(p["row"])
    if table in (6, 7):
        source, view = ALL, VIEW_ROWS.get(name)
        snap = view is not None and view.startswith(ACC_ENS)
    else:
        source, view, snap = SOURCE_ROWS.get(name), "plain", False
    if source is None or view is None:
        return None, "this row name is not one we know how to match"
    cands = [g for g in groups if g.source_name == source and g.view_id == view and g.stats is not None
             and (int(g.identity.get("train.snapshots", 1) or 1) > 1) == snap]
    if not cands:
        what = f"source {source}" + (f", view {view}" if view != "plain" else "")
        return None, f"no group of {what}" + (" from snapshot-trained runs" if snap else "")
    for key, want in (("data.name", p["dataset"]), ("model.name", p["model"]), ("train.epochs", p["epochs"])):
        have = [g for g in cands if str(g.identity.get(key)) == str(want)]
        if not have:
            return None, f"our {cands[0].row_name} has {key}={cands[0].identity.get(key)}, the table {want}"
        cands = have
    if len(cands) > 1:
        return None, "several of our groups fit (" + "; ".join(g.row_name for g in cands) + "): compare by hand"
    return cands[0], ""


def _diff(ours: float, se: float, published: float) -> tuple[float, float]:
    d = ours - published if math.isfinite(ours) and math.isfinite(published) else math.nan
    return d, (d / se if math.isfinite(d) and math.isfinite(se) and se > 0 else math.nan)


def _rows(p: dict[str, Any], g: Group, row: pd.Series, j: Judgement) -> list[dict[str, Any]]:
    """One record per metric the published row gives: ours, our SE, theirs, difference, SE units."""
    boot = j.resamples.of(g)
    out = []
    for key, _, _ in columns():
        published = float(p.get(key, math.nan))
        if not math.isfinite(published):
            continue
        note = ""
        if key.startswith(REDUCTION):
            red = j.reductions.get(g.row_name, {}).get(key.removeprefix(REDUCTION))
            ours, se = (red[0], red[1]) if red else (math.nan, math.nan)
            if red is None:
                note = "no reduction of ours for this row"
        else:
            se_col = METRICS[key].se
            ours = float(row[key])
            se = float(row[se_col]) if se_col is not None else RS.bootstrap_se(boot[key])
        d, z = _diff(ours, se, published)
        out.append({"table": int(p["table"]), "origin": p["origin"], "published_row": p["row"], "group": g.row_name,
                    "n_models": g.stats.n_models, "n_published": int(p["n_models"]), "metric": key, "ours": ours,
                    "ours_se": se, "published": published, "published_se": float(p.get(f"{key}_se", math.nan)),
                    "difference": d, "se_units": z, "note": note})
    return out


def _ablation_rows(p: dict[str, Any], g: Group, ablation: pd.DataFrame) -> list[dict[str, Any]]:
    """Table 8 rows below our N: the ablation's mean over N-subsets, raw difference (no sampling SE)."""
    a = ablation[(ablation["group"] == g.row_name) & (ablation["n"] == int(p["n_models"]))]
    out = []
    for key, _, _ in columns():
        published = float(p.get(key, math.nan))
        col = f"{key}_mean"
        if not math.isfinite(published) or a.empty or col not in a.columns:
            continue
        ours = float(a.iloc[0][col])
        d, _ = _diff(ours, math.nan, published)
        out.append({"table": 8, "origin": p["origin"], "published_row": p["row"], "group": g.row_name,
                    "n_models": int(p["n_models"]), "n_published": int(p["n_models"]), "metric": key, "ours": ours,
                    "ours_se": math.nan, "published": published,
                    "published_se": float(p.get(f"{key}_se", math.nan)), "difference": d,
                    "se_units": math.nan, "note": f"ablation mean over {g.stats.n_models}-model group's subsets"})
    return out


# --------------------------------------------------------------------------------------------
# text


def _fmt(v: float, nd: int) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{nd}f}"


def _delta(r: dict[str, Any], nd: int) -> str:
    if math.isfinite(r["se_units"]):
        return f"{r['se_units']:+.1f}"
    return "-" if not math.isfinite(r["difference"]) else f"({r['difference']:+.{nd}f})"


def published_md(c: Comparison) -> list[str]:
    """report.md's "Published values" section: per table ours, theirs and the difference in SE units."""
    parts = ["## Published values", ""]
    if c.why_none:
        return parts + [f"No published value applies: {c.why_none}.", ""]
    cols = columns()
    titles = {k: (t, nd) for k, t, nd in cols}
    if c.caveat:
        parts += [f"**Not the authors' experiment.** {c.caveat}", ""]
    for (table, origin), rows in c.rows.groupby(["table", "origin"], sort=True):
        metrics = [k for k, _, _ in cols if k in set(rows["metric"])]
        out = []
        for (prow, group, n, npub), rs in rows.groupby(["published_row", "group", "n_models", "n_published"],
                                                       sort=False):
            rec = {"published row": prow, "our row": group, "N ours/pub.": f"{n}/{npub}"}
            by = {r["metric"]: r for r in rs.to_dict("records")}
            for k in metrics:
                t, nd = titles[k]
                r = by.get(k)
                rec[t] = _fmt(r["ours"], nd) if r else ""
                rec[f"{t} pub."] = _fmt(r["published"], nd) if r else ""
                rec[f"{t} Δ/SE"] = _delta(r, nd) if r else ""
            out.append(rec)
        who = "the paper's values as quoted by the report" if origin == "paper" else "the report"
        parts += [f"### Table {table} ({who})", "", markdown(pd.DataFrame(out).astype(str)), ""]
    parts += [("Δ/SE = (ours - published) / our bootstrap SE; in parentheses: the raw difference, where we have "
               "no SE (rows of Table 8 below our N compare the N-models ablation's mean). Published values: the "
               "reproducibility report, Tables 4-10 (package data nondet_hpc/analysis/published_tables.csv)."), ""]
    if c.unmatched:
        parts += ["Published rows without a row of ours:", "", *[f"- {u}" for u in c.unmatched], ""]
    if c.unpublished:
        parts += ["Our rows without a published value: " + "; ".join(c.unpublished) + ".", ""]
    return parts
