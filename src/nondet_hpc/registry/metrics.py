"""The metrics of the report: each declared once, with everything the report needs to know of it.

docs/metrics.md, "Per-group metrics". The formulas are in :mod:`nondet_hpc.metrics`; an entry here
says what the report calls a metric, how it prints and plots it, how it is bootstrapped, which
claims and published tables use it, and, for a pairwise metric, how its pair matrix is computed.
metrics.csv, the printed tables, ablation.md, the figures, the claims, the published comparison,
the bootstrap over models and the planner's targets all read :data:`METRICS` (in its order, which
is metrics.csv's column order) instead of keeping lists of their own.

A new pairwise metric (as ``param_distance``, the distance between the runs' final weights) is
one entry with a ``pair`` function (its formula, in :mod:`nondet_hpc.metrics.formulas`) over a
per-run ``inputs``: the row's logits, or a file of each run folder declared in :data:`INPUTS`. Its matrix is then
averaged over pairs by the same code as every other pairwise metric, in the whole group, the
N-models ablation and the bootstrap, and it gets a column in metrics.csv and the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..metrics import PairSums, pair_mean, pairwise_cka_matrix, pairwise_param_distance
from ..rundir import FEATURES, WEIGHTS

#: what a metric is computed from: each model's own values (a mean or SD over models), every pair
#: of models, or the group as a whole (per-example correctness across its models)
MODEL, PAIRWISE, GROUP = "per-model", "pairwise", "group"
#: the ``inputs`` of a pairwise metric computed from the logits of the row (every row has them)
LOGITS = "logits"


@dataclass(frozen=True)
class Input:
    """A per-run file a pairwise metric reads (besides the row's logits).

    It belongs to the run, not to a logits view, so its metrics are measured in the single-model
    (plain) row only; a run whose file is missing or unusable leaves the metric empty, with a note.
    """

    name: str  # as notes name it ("non-finite features")
    file: str  # its path in a run folder (nondet_hpc.rundir)
    shape: str  # the shape it must have, as messages print it
    ndim: int  # its number of axes
    per_example: bool  # its first axis is the test examples (as many as labels.npy)
    #: how analysis/inputs.py opens it: NPY (a .npy array, memory-mapped, allow_pickle=False) or
    #: WEIGHTS_FILE (a weights file of records/weights.py: its flat parameter vector, read by ranges)
    format: str = "npy"


#: the formats of INPUTS files that analysis/inputs.py knows how to open
NPY, WEIGHTS_FILE = "npy", "weights"

INPUTS: dict[str, Input] = {i.name: i for i in (
    Input("features", FEATURES, "[n_test, d]", 2, True),
    Input("weights", WEIGHTS, "float32 parameters (safetensors, records/weights.py)", 1, False, WEIGHTS_FILE),
)}


@dataclass(frozen=True)
class Metric:
    """One metric of the report. Whether it is one of the five terms of the variability reduction is
    part of that formula (metrics.REDUCTION_KEYS), not a field here."""

    key: str  # column of metrics.csv, key of metrics.group_summary and subset_metrics
    header: str  # column title of the printed tables (terminal, metrics.md/.tex, ablation.md, published)
    name: str  # short name in sentences and in claims.csv's statistics ("acc SD ratio")
    label: str  # long name on the figures
    unit: str  # "pp", "nats", "%", or "" for a ratio or a similarity
    decimals: int  # digits the tables print
    kind: str  # MODEL, PAIRWISE or GROUP
    legend: str = ""  # its clause of the units line under the tables; "" when another's covers it
    per_model: str | None = None  # a MODEL SD: the per-model value (per_model.csv column) it is the SD of
    se: str | None = None  # its bootstrap SE column in metrics.csv (the MODEL SDs)
    stream: tuple[int, ...] = ()  # appended to the bootstrap seed: each SD's resamples are its own
    similarity: bool = False  # higher means less variable (r, CKA): figures and claims use 1 - value
    optional: bool = False  # printed only when some row has a value (CKA needs features.npy)
    beside: str | None = None  # drawn as a marker on that metric's figure panel (test-set SD on acc SD)
    ablation: bool = False  # a column of ablation.md (ablation.csv has every metric)
    claims: tuple[int, ...] = ()  # the claims whose statistics are about it (report.md, "Claims")
    published: int | None = None  # digits beside the published values (published_tables.csv column: key)
    inputs: str = LOGITS  # PAIRWISE: what `pair` reads per run, LOGITS or a key of INPUTS
    pair: Callable[[Sequence[Any], int], np.ndarray] | None = None  # PAIRWISE: (arrays, block_bytes) ->
    #   the [N, N] pair matrix; None: made by metrics.pairwise_stats' one pass over the logits
    value: Callable[[PairSums], np.ndarray] = pair_mean  # PAIRWISE with `pair`: the metric from its pair sums


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("acc_mean", "Acc %", "accuracy", "mean test accuracy", "%", 2, MODEL,
           legend="Acc % = mean test accuracy"),
    Metric("acc_sd", "Acc SD", "acc SD", "accuracy SD", "pp", 3, MODEL,
           legend="SDs are population SDs across models with bootstrap SE (pp; CE in nats)", per_model="acc",
           se="acc_sd_se", ablation=True, claims=(1, 2), published=3),
    Metric("testset_sd", "Test-set SD", "test-set SD", "test-set sampling SD", "pp", 3, GROUP,
           legend="Test-set SD = SD from test-set sampling alone", beside="acc_sd"),
    Metric("ce_sd", "CE SD", "CE SD", "cross-entropy SD", "nats", 4, MODEL, per_model="ce", se="ce_sd_se",
           stream=(1,), ablation=True, published=4),
    Metric("disagreement", "Disagr. %", "disagreement", "pairwise disagreement", "%", 2, PAIRWISE,
           legend="Disagr. = mean pairwise % of test examples predicted differently", ablation=True, claims=(2,),
           published=2),
    Metric("correlation", "Corr.", "correlation", "pairwise correlation", "", 4, PAIRWISE,
           legend="Corr. = mean pairwise Pearson r of logits", similarity=True, ablation=True, claims=(2,),
           published=3),
    Metric("ensemble_delta", "Ens. Δ", "ensemble delta", "2-model ensemble delta", "pp", 3, PAIRWISE,
           legend="Ens. Δ = 2-model ensemble gain (pp)", ablation=True, published=2),
    Metric("cka", "CKA", "CKA", "pairwise CKA", "", 4, PAIRWISE, similarity=True, optional=True,
           inputs="features", pair=pairwise_cka_matrix),
    Metric("param_distance", "Param dist. %", "final parameter distance", "final parameter distance", "%", 2,
           PAIRWISE, legend="Param dist. = mean pairwise L2 distance of the final weights, % of the pair's mean norm",
           optional=True, claims=(2,), inputs="weights", pair=pairwise_param_distance),
)}


def of_kind(kind: str) -> list[Metric]:
    """The metrics of one kind, in table order."""
    return [m for m in METRICS.values() if m.kind == kind]


def model_sds() -> list[Metric]:
    """The SDs of per-model values (acc SD, CE SD): bootstrapped by resampling the models' values."""
    return [m for m in METRICS.values() if m.per_model is not None]


def in_claim(claim: int) -> list[Metric]:
    """The metrics whose statistics claim ``claim`` judges, in table order."""
    return [m for m in METRICS.values() if claim in m.claims]
