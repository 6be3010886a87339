"""The inputs of the pairwise metrics declared with a ``pair`` function (CKA, and any new one).

:mod:`nondet_hpc.registry.metrics` says what each reads: the row's logits, or a file of each run
folder (:data:`~nondet_hpc.registry.metrics.INPUTS`), which belongs to the run and so is measured in
the single-model row only. A file that some runs lack, or that cannot be used, leaves the metric
empty with a note (and a warning when a file is bad); the rest of the row is unaffected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import PairwiseStats
from ..records.weights import WeightsFile
from ..registry.metrics import INPUTS, LOGITS, METRICS, WEIGHTS_FILE, Input
from ..safeio import RefusedFile
from .groups import Group
from .scan import BadFile, Npy, Run, rel


def open_inputs(g: Group, runs: list[Run], logits: list[Any], sweep: Path, warnings: list[str]) -> dict[str, list]:
    """Declared metric key -> the arrays its ``pair`` function reads, one per run, for every
    declared pairwise metric this row can have; notes (and warnings) on the row say why not."""
    out: dict[str, list] = {}
    files: dict[str, list | BadFile | int | None] = {}
    for m in METRICS.values():
        if m.pair is None:
            continue
        if m.inputs == LOGITS:
            out[m.key] = list(logits)
            continue
        if g.view_id != "plain":
            continue
        inp = INPUTS[m.inputs]
        if inp.name not in files:
            files[inp.name] = _open(inp, runs, sweep)
        got = files[inp.name]
        if isinstance(got, list):
            out[m.key] = got
        elif isinstance(got, BadFile):
            g.notes.append(f"{m.header} not computed: {got}")
            warnings.append(f"{g.row_name}: {m.header} not computed: {got}")
        elif got:  # some runs lack the file (none: the runs did not save it, nothing to say)
            g.notes.append(f"{m.header}: {inp.file} missing for {got} of {len(runs)} runs")
    return out


def _open(inp: Input, runs: list[Run], sweep: Path) -> list | BadFile | int | None:
    """Every run's file, checked; or the first bad file; or how many runs lack it (None: all)."""
    missing = [r.run_id for r in runs if not (r.path / inp.file).exists()]
    if missing:
        return len(missing) if len(missing) < len(runs) else None
    arrays: list = []
    for r in runs:
        f = r.path / inp.file
        if inp.format == WEIGHTS_FILE:
            try:
                arrays.append(WeightsVector(f, rel(f, sweep), r.run_id))
            except BadFile as e:
                return e
            continue
        try:
            arr = Npy(f, rel(f, sweep))
            if (len(arr.shape) != inp.ndim or (inp.per_example and arr.shape[0] != r.labels.shape[0])
                    or not np.issubdtype(arr.dtype, np.floating)):
                raise BadFile(f"{arr.rel}: wrong shape or dtype {arr.shape} {arr.dtype}; expected float {inp.shape}",
                              "shape")
            if not np.isfinite(arr[:]).all():
                raise BadFile(f"{arr.rel}: non-finite {inp.name}")
        except BadFile as e:
            return e
        arrays.append(arr)
    odd = [r.run_id for r, a in zip(runs, arrays) if getattr(a, "layout", None) != getattr(arrays[0], "layout", None)]
    if odd:
        return BadFile(f"{inp.file} of {', '.join(odd[:3])} has other parameter tensors than {runs[0].run_id}'s",
                       "shape")
    return arrays


def add_pairs(stats: PairwiseStats, arrays: dict[str, list], block_bytes: int) -> None:
    """Compute each declared metric's pair matrix from its arrays and add it to the group's stats."""
    for key, a in arrays.items():
        m = METRICS[key]
        stats.add(key, m.pair(a, block_bytes), m.value)


class WeightsVector:
    """A run's weights file as the final-parameter-distance formula reads it (``n_values``,
    ``flat_range``), checked once here: a weights file of this package (safetensors header),
    of this run (its run id), whose parameters are finite and match its fingerprint. Each read
    reopens it (hundreds of runs never hold hundreds of descriptors) and must find the same header.
    """

    def __init__(self, path: Path, rel_path: str, run_id: str):
        self.path, self.rel = path, rel_path
        try:
            with WeightsFile(path) as f:
                if f.run_id != run_id:
                    raise BadFile(f"{rel_path}: holds the weights of run {f.run_id or '(none recorded)'}, not of "
                                  f"{run_id} (copied from another run?)", "identity")
                f.check_parameters()
                self.layout, self.fingerprint = f.layout, f.fingerprint_hex
        except RefusedFile as e:
            raise BadFile(f"{rel_path}: {e.why}", "unreadable" if "regular file" in e.why else "corrupt") from None
        self.n_values = self.layout.n_values

    def flat_range(self, lo: int, hi: int):
        try:
            with WeightsFile(self.path) as f:
                if f.fingerprint_hex != self.fingerprint or f.layout != self.layout:
                    raise RefusedFile(self.path, "was replaced since it was checked")
                return f.flat_range(lo, hi)
        except RefusedFile as e:
            raise BadFile(f"{self.rel}: cannot be read any more ({e.why})") from None
