"""Grouping runs into table rows: one row per (group_key, logits view), named like the paper.

A group is the set of runs whose configs differ only in the replicate seed (run.json
``group_key``), seen through one view (plain, a TTA view, or the accelerated ensemble). Row names
are the paper's source label, plus the config keys that tell apart groups of the same label or
of different families (docs/metrics.md, "Groups").
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import metrics as M
from ..registry.sources import source_order
from ..viewspec import VIEWS
from .scan import ACC_ENS, Run

VIEW_DISPLAY: dict[str, str] = {"plain": "", "flip": "Flip", "crop25": "Crop25", "crop81": "Crop81",
                                "flip-crop25": "Flip-Crop25", "flip-crop81": "Flip-Crop81"}


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
    se: dict[str, float] = field(default_factory=dict)  # bootstrap SE column (acc_sd_se, ...) -> value
    notes: list[str] = field(default_factory=list)
    n_excluded: int = 0  # distinct runs left out of this row, found while scanning or reducing
    n_planned: float = math.nan  # runs sweep.json plans for the group (NaN without sweep.json)
    n_never_started: int = 0  # planned runs without a run folder
    n_duplicates: int = 0  # runs of a varied source whose logits equal another run's: one model (excluded.csv)
    digests: list[bytes] = field(default_factory=list)  # the logits digest of each used model
    stopped: bool = False

    @property
    def source_name(self) -> str:
        return str(self.identity.get("source.name", ""))

    @property
    def from_epoch(self) -> int:
        """The epoch from which the source applied (source.from_epoch; 0: from the start)."""
        return int(self.identity.get("source.from_epoch", 0) or 0)

    @property
    def row_name(self) -> str:
        disp = view_display(self.view_id)
        return self.name if not disp else f"{self.name} [{disp}]"

    @property
    def seed_key(self) -> int:
        return seed_key(self.group_key, self.view_id)


def seed_key(group_key: str, view_id: str) -> int:
    """The row's bootstrap seed, from its own name: adding a group leaves the others' SEs alone."""
    return zlib.crc32(f"{group_key}|{view_id}".encode())


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
    pos = VIEWS.index(inner) if inner in VIEWS else len(VIEWS)
    return (int(ens), pos, inner)


def family(identity: dict) -> str:
    """Identity without the source: groups of one family differ only in what varies."""
    return json.dumps({k: v for k, v in identity.items() if not k.startswith("source.")}, sort_keys=True, default=str)


def _sortable(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def prune_keys(keys: set[str]) -> list[str]:
    """Keep readable keys: if data.name differs, data.num_classes etc. need not be printed."""
    names = {k.split(".", 1)[0] for k in keys if k.endswith(".name") and k.count(".") == 1}
    return sorted(k for k in keys if k.split(".", 1)[0] not in names or (k.endswith(".name") and k.count(".") == 1))


def differing(identities: Sequence[dict], skip: Callable[[str], bool]) -> set[str]:
    """Identity keys (other than ``skip``'s) whose values are not the same in all ``identities``."""
    keys = set().union(*identities) if identities else set()
    out = set()
    for k in keys:
        if skip(k):
            continue
        vals = {json.dumps(i.get(k, "<unset>"), sort_keys=True, default=str) for i in identities}
        if len(vals) > 1:
            out.add(k)
    return out


def fmt_value(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)


def name_groups(by_key: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """group_key -> display name: the paper's row label plus whatever distinguishes it.

    When the sweep has several families (e.g. train.epochs=100 and 500), every label gets the
    family keys that vary; labels shared by groups of one family get their differing keys too.
    """
    fam = {k: family(ident) for k, (_, ident) in by_key.items()}
    reps = {}
    for k, f in fam.items():
        reps.setdefault(f, by_key[k][1])
    fam_keys = prune_keys(differing(list(reps.values()), lambda k: k.startswith("source."))) if len(reps) > 1 else []
    by_label: dict[str, list[str]] = {}
    for k, (label, _) in by_key.items():
        by_label.setdefault(label, []).append(k)
    names = {}
    for label, keys in by_label.items():
        same = (prune_keys(differing([by_key[k][1] for k in keys], lambda k: k == "source.label"))
                if len(keys) > 1 else [])
        for k in keys:
            ident = by_key[k][1]
            show = list(dict.fromkeys(fam_keys + same))
            suffix = ", ".join(f"{key}={fmt_value(ident.get(key, '<unset>'))}" for key in show)
            names[k] = f"{label} ({suffix})" if suffix else label
    # identical identities under different keys: fall back to the key itself
    seen = Counter(names.values())
    return {k: (f"{n} [{k[:8]}]" if seen[n] > 1 else n) for k, n in names.items()}


def build_groups(runs: list[Run]) -> list[Group]:
    """The table's groups, named and in row order: family, the paper's source order, name, view."""
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        for vid in r.views:
            g = groups.setdefault((r.group_key, vid), Group(r.group_key, vid, []))
            g.members.append(r)
    by_key: dict[str, tuple[str, dict]] = {}
    for r in runs:
        by_key.setdefault(r.group_key, (r.label, r.identity))
    names = name_groups(by_key)
    for g in groups.values():
        g.label, g.identity = by_key[g.group_key]
        g.name = names[g.group_key]
    fam_order = sorted({family(i) for _, i in by_key.values()},
                       key=lambda f: [(k, _sortable(v)) for k, v in sorted(json.loads(f).items())])

    def order(g: Group) -> tuple:
        return (fam_order.index(family(g.identity)), source_order(g.source_name), g.from_epoch, g.name,
                _view_rank(g.view_id))

    return sorted(groups.values(), key=order)
