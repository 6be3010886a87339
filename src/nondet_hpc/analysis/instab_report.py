"""The report's Instability section: divergence over training, the condition number, the control.

From the files every run keeps (records/: ``trajectory.npz``, ``weights.safetensors``) and run.json:

- per single-model group and recorded point (instability.csv, divergence.png): mean pairwise probe
  disagreement and parameter distance from the sketches (:mod:`.divergence`), and at the last
  point the exact distance from the weights files (metric ``param_distance``) with the sketch's
  error against it;
- per family: the condition number of training for the bit change (each bit-change run against its
  unperturbed twin, else pairs within the group), the growth of its distance over the first epoch,
  its e-folding time, and the first point at which its divergence reaches 90 % of the all-sources
  (or init) group's (:mod:`.instability` has the formulas);
- the determinism control checked at every point: the first point at which two replicates'
  fingerprints differ (expected: never); if they ever do, :attr:`Section.alarms` opens the report.

Trajectories are read one run at a time (memory: the sketches of one group, not every file). A
file that is missing, refused or not comparable leaves that run out of this section only, with a
note and a warning; its logits still count in the other sections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from ..records.projection import relative_sd
from ..records.trajectory import Trajectory, read_trajectory
from ..registry.sources import ALL, BITFLIP, CONTROL
from ..rundir import TRAJECTORY, WEIGHTS
from ..safeio import RefusedFile
from .divergence import GroupAccumulator, GroupCurve, InstabilityError
from .groups import Group, family
from .inputs import WeightsVector
from .instability import PairResult, initial_change, pair_result, saturation_step, summary, twin_key
from .scan import BadFile, Run, rel

#: the paper's lower bound of the condition number of training (Summers & Dinneen 2021, Sec. 5)
PAPER_KAPPA = 1e7
SATURATION = 0.9  # "as good as a new seed": the bit change's divergence reaches this fraction of the reference's
REFERENCES = (ALL, "init")  # the group a bit change is measured against, in order of preference
COLUMNS = ["group", "source", "group_key", "point", "step", "epoch", "n_runs", "identical", "probe_disagreement",
           "param_distance", "param_distance_exact", "sketch_error_pct", "distance", "mean_norm"]
PAIR_COLUMNS = ["run", "other", "mode", "initial_distance", "initial_sketch_distance", "initial_norm",
                "final_distance", "final_sketch_distance", "final_norm", "condition_number", "growth_first_epoch",
                "efolding_steps"]


@dataclass
class GroupDivergence:
    """One single-model group's curve and how its last point compares with the exact distances."""

    group: Group
    curve: GroupCurve
    exact: float = math.nan  # metric param_distance over the runs of the curve (percent), from the weights
    sketch_error: float = math.nan  # (sketch estimate - exact) / exact of that mean, percent
    pair_errors: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per pair, relative


@dataclass
class Family:
    """The bit change of one family against its twins and its reference group."""

    where: str
    bit: GroupDivergence
    pairs: list[PairResult]
    mode: str  # "twin" or "within group"
    reference: Optional[GroupDivergence] = None
    saturation: Optional[int] = None  # first step at >= SATURATION x the reference's parameter distance
    saturation_probe: Optional[int] = None  # the same with the probe disagreement

    @property
    def kappa(self) -> dict[str, float]:
        return summary([p.condition_number for p in self.pairs])


@dataclass
class Section:
    curves: list[GroupDivergence]
    families: list[Family]
    alarms: list[str]  # the control's fingerprints differ somewhere: said at the top of the report
    notes: list[str]
    claim2: list[str] = field(default_factory=list)  # the claims section's direct-evidence lines

    def table(self) -> pd.DataFrame:
        rows = []
        for gd in self.curves:
            c, g = gd.curve, gd.group
            for t in range(len(c.step)):
                last = t == len(c.step) - 1
                rows.append({"group": g.row_name, "source": g.source_name, "group_key": g.group_key, "point": t,
                             "step": int(c.step[t]), "epoch": float(c.epoch[t]), "n_runs": c.n_runs,
                             "identical": bool(c.identical[t]), "probe_disagreement": c.disagreement[t],
                             "param_distance": c.rel_distance[t],
                             "param_distance_exact": gd.exact if last else math.nan,
                             "sketch_error_pct": gd.sketch_error if last else math.nan,
                             "distance": c.distance[t], "mean_norm": c.mean_norm[t]})
        return pd.DataFrame(rows, columns=COLUMNS)

    def group_table(self) -> pd.DataFrame:
        """One row per single-model group (instability_groups.csv): the numbers another table can
        join by ``group_key`` (e.g. the condition number beside each architecture)."""
        fam = {id(f.bit.group): f for f in self.families}
        rows = []
        for gd in self.curves:
            f, c = fam.get(id(gd.group)), gd.curve
            k = f.kappa if f else summary([])
            tau = summary([p.efolding_steps for p in f.pairs]) if f else summary([])
            grow = summary([p.growth_first_epoch for p in f.pairs]) if f else summary([])
            rows.append({"group": gd.group.row_name, "source": gd.group.source_name, "group_key": gd.group.group_key,
                         "n_runs": c.n_runs, "first_split_step": c.first_split,
                         "param_distance_exact": gd.exact, "param_distance_sketch": c.rel_distance[-1],
                         "probe_disagreement": c.disagreement[-1], "condition_number_median": k["median"],
                         "condition_number_min": k["min"], "condition_number_max": k["max"],
                         "condition_number_n": k["n"], "pairs": f.mode if f else "",
                         "growth_first_epoch_median": grow["median"], "efolding_steps_median": tau["median"],
                         "saturation_step": f.saturation if f else None,
                         "saturation_reference": f.reference.group.row_name if f and f.reference else ""})
        return pd.DataFrame(rows)

    def pair_table(self) -> pd.DataFrame:
        rows = [{"mode": f.mode, **{k: getattr(p, k) for k in PAIR_COLUMNS if k != "mode"}}
                for f in self.families for p in f.pairs]
        return pd.DataFrame(rows, columns=PAIR_COLUMNS)


# --------------------------------------------------------------------------------------------- reading
class _Files:
    """Trajectories and weights of the runs, opened with checks; problems become notes and warnings."""

    def __init__(self, sweep: Path, warnings: list[str]):
        self.sweep, self.warnings = sweep, warnings
        self.weights: dict[str, Optional[WeightsVector]] = {}
        self.kept: dict[str, Optional[Trajectory]] = {}  # the twins' trajectories, read once
        self.refused: list[str] = []

    def kept_trajectory(self, r: Run) -> Optional[Trajectory]:
        if r.run_id not in self.kept:
            self.kept[r.run_id] = self.trajectory(r)
        return self.kept[r.run_id]

    def trajectory(self, r: Run) -> Optional[Trajectory]:
        path = r.path / TRAJECTORY
        if not path.exists() and not path.is_symlink():
            return None
        try:
            t = read_trajectory(path)
        except RefusedFile as e:
            self._refuse(f"{rel(path, self.sweep)}: {e.why}")
            return None
        if t.run_id != r.run_id:
            self._refuse(f"{rel(path, self.sweep)}: recorded by run {t.run_id}, not {r.run_id} (copied?)")
            return None
        if not t.complete:
            self._refuse(f"{rel(path, self.sweep)}: incomplete (recording began when the run resumed from a "
                         f"checkpoint written without it)")
            return None
        return t

    def weights_of(self, r: Run) -> Optional[WeightsVector]:
        if r.run_id not in self.weights:
            path, got = r.path / WEIGHTS, None
            if path.exists() or path.is_symlink():
                try:
                    got = WeightsVector(path, rel(path, self.sweep), r.run_id)
                except BadFile as e:
                    self._refuse(str(e))
            self.weights[r.run_id] = got
        return self.weights[r.run_id]

    def _refuse(self, why: str) -> None:
        self.refused.append(why)
        self.warnings.append(f"Instability: {why}; left out of the Instability section")


def _runs(g: Group) -> list[Run]:
    return list(g.used or g.members)


def _stream(g: Group, files: _Files, missing: list[str]) -> Iterator[Trajectory]:
    for r in _runs(g):
        t = files.trajectory(r)
        if t is None:
            missing.append(r.run_id)
        else:
            yield t


def _curve(g: Group, files: _Files, notes: list[str]) -> Optional[GroupDivergence]:
    acc, missing = GroupAccumulator(), []
    for t in _stream(g, files, missing):
        try:
            acc.add(t)
        except InstabilityError as e:  # another grid, probe, projection or model than the group's first run
            files._refuse(str(e))
            missing.append(t.run_id)
    if missing and len(missing) < len(_runs(g)):
        notes.append(f"{g.row_name}: {len(missing)} of {len(_runs(g))} runs without a usable {TRAJECTORY} "
                     f"(record.trajectory=false, an older version, or refused: see the warnings)")
    if acc.ref is None:
        return None
    gd = GroupDivergence(g, acc.curve())
    _exact(gd, g)
    return gd


def _exact(gd: GroupDivergence, g: Group) -> None:
    """The exact final distances of the curve's runs from the group's ``param_distance`` matrix."""
    pairs = g.stats.pairs.get("param_distance") if g.stats is not None else None
    if pairs is None or gd.curve.n_runs < 2:
        return
    pos = {r.run_id: k for k, r in enumerate(g.used)}
    if not all(rid in pos for rid in gd.curve.run_ids):
        return
    idx = np.array([pos[rid] for rid in gd.curve.run_ids])
    pct = pairs.matrix[np.ix_(idx, idx)]
    iu = np.triu_indices(len(idx), 1)
    gd.exact = float(pct[iu].mean())
    norms = gd.curve.final_norms
    absolute = pct / 100.0 * (norms[:, None] + norms[None, :]) / 2.0
    sketch = gd.curve.final_sketch_distances
    keep = absolute[iu] > 0
    gd.pair_errors = (sketch[iu][keep] - absolute[iu][keep]) / absolute[iu][keep]
    if gd.exact > 0:
        gd.sketch_error = 100.0 * (gd.curve.rel_distance[-1] - gd.exact) / gd.exact


# ------------------------------------------------------------------------------------- the bit change
def _twins(groups: list[Group]) -> dict[str, Run]:
    """twin_key -> an unperturbed run (no bit change) of any single-model group."""
    out: dict[str, Run] = {}
    for g in groups:
        for r in _runs(g):
            if g.view_id == "plain" and r.info.get("bitflip") is None:
                out.setdefault(twin_key(r.info), r)
    return out


def _pair(a: Run, b: Run, files: _Files, initial: float) -> Optional[PairResult]:
    ta, tb = files.trajectory(a), files.kept_trajectory(b)
    wa, wb = files.weights_of(a), files.weights_of(b)
    if ta is None or tb is None or wa is None or wb is None:
        return None
    try:
        return pair_result(ta, tb, wa, wb, initial)
    except (InstabilityError, BadFile) as e:
        files._refuse(f"{a.run_id} against {b.run_id}: {e}")
        return None


def _bit_pairs(bit: Group, twins: dict[str, Run], files: _Files) -> tuple[list[PairResult], str]:
    """Each bit-change run against its twin; without twins, each run against the next one."""
    runs = [r for r in _runs(bit) if isinstance(r.info.get("bitflip"), dict)]
    with_twin = [(r, twins[twin_key(r.info)]) for r in runs if twin_key(r.info) in twins]
    out: list[PairResult] = []
    if with_twin:
        for r, t in with_twin:
            p = _pair(r, t, files, initial_change(r.info["bitflip"]))
            if p is not None:
                out.append(p)
        return out, "twin"
    for a, b in zip(runs, runs[1:]):
        try:
            initial = initial_change(a.info["bitflip"], b.info["bitflip"])
        except (InstabilityError, KeyError, TypeError, ValueError):
            continue
        p = _pair(a, b, files, initial)
        if p is not None:
            out.append(p)
    return out, "within group"


def _family(where: str, gds: list[GroupDivergence], twins: dict[str, Run], files: _Files) -> Optional[Family]:
    # the bit change at initialisation (a bit change from epoch k > 0 is the Stable-after section's)
    bit = next((gd for gd in gds if gd.group.source_name == BITFLIP and not gd.group.from_epoch), None)
    if bit is None:
        return None
    pairs, mode = _bit_pairs(bit.group, twins, files)
    fam = Family(where, bit, pairs, mode)
    fam.reference = next((gd for name in REFERENCES for gd in gds if gd.group.source_name == name), None)
    if fam.reference is not None:
        c, r = bit.curve, fam.reference.curve
        fam.saturation = saturation_step(c.step, c.rel_distance, r.step, r.rel_distance, SATURATION)
        fam.saturation_probe = saturation_step(c.step, c.disagreement, r.step, r.disagreement, SATURATION)
    return fam


# ---------------------------------------------------------------------------------------------- entry
def instability_section(groups: list[Group], sweep: Path, warnings: list[str]) -> Optional[Section]:
    """The section for the sweep's single-model groups; None when no run kept a trajectory."""
    files = _Files(sweep, warnings)
    notes: list[str] = []
    plain = [g for g in groups if g.view_id == "plain" and not g.stopped and _runs(g)]
    curves = [gd for gd in (_curve(g, files, notes) for g in plain) if gd is not None]
    if not curves:
        return None
    alarms = []
    for gd in curves:
        c = gd.curve
        if gd.group.source_name == CONTROL and c.first_split is not None:
            alarms.append(f"WARNING: the determinism control '{gd.group.row_name}' is not deterministic: its "
                          f"replicates' parameters differ from step {c.first_split} (epoch "
                          f"{c.first_split / max(1, _spe(c)):g}) on. A source of nondeterminism is not controlled; "
                          f"every other row includes it. Find where with: python -m nondet_hpc.compare "
                          f"{sweep / 'runs' / c.run_ids[0]} {sweep / 'runs' / c.split_run}")
    by_family: dict[str, list[GroupDivergence]] = {}
    for gd in curves:
        by_family.setdefault(family(gd.group.identity), []).append(gd)
    twins = _twins(plain)
    fams = [f for f in (_family(_where(k, by_family), gds, twins, files) for k, gds in by_family.items())
            if f is not None]
    return Section(curves, fams, alarms, notes)


def _spe(c: GroupCurve) -> int:
    """Steps per epoch of a curve (from a point with epoch > 0)."""
    k = np.flatnonzero(c.epoch > 0)
    return int(round(c.step[k[0]] / c.epoch[k[0]])) if len(k) else 1


def _where(key: str, by_family: dict[str, list[GroupDivergence]]) -> str:
    """" (train.epochs=100)" when the sweep has several families, else ""."""
    if len(by_family) < 2:
        return ""
    first = by_family[key][0].group.name
    base = by_family[key][0].group.label
    return first[len(base):] if first.startswith(base) else f" ({first})"


def sketch_sd_pct(curves: list[GroupDivergence]) -> float:
    """One SD of the sketch's relative distance error, percent (the smallest sketch of the runs)."""
    return 100.0 * relative_sd(min(gd.curve.sketch_dim for gd in curves))
