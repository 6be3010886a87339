"""Variability metrics of the study, as pure functions on arrays (docs/study.md, "Metrics").

The formulas are in :mod:`.formulas` (one file to check against the paper; docs/metrics.md writes
them out), the blocked pass over a group's logits in :mod:`.pairwise`, a group's results and its
metrics on any subset in :mod:`.groups`, the bootstrap of per-model values in :mod:`.bootstrap`.
This package holds no list of the report's metrics: which metrics there are, and how the report
prints them, is declared once in :mod:`nondet_hpc.registry.metrics`. Usage::

    from nondet_hpc import metrics as M
    stats = M.pairwise_stats(logits, labels)   # one [n_test, n_classes] array per model
    M.group_summary(stats)                     # {"acc_mean": ..., "acc_sd": ..., "disagreement": ...}
    M.variability_reduction(base, new, formula="paper")
"""

from .blocks import DEFAULT_BLOCK_BYTES
from .bootstrap import bootstrap_sd_ratio_ci, bootstrap_sd_se, equal_variance_test
from .formulas import (
    FORMULAS,
    REDUCTION_KEYS,
    ModelSummary,
    NonFiniteLogits,
    PairSums,
    array_digest,
    cross_entropy,
    flat_distances,
    pair_mean,
    pairwise_cka_matrix,
    pairwise_param_distance,
    population_sd,
    relative_distances,
    reduction_terms,
    summarize_model,
    variability_reduction,
)
from .groups import PairwiseStats, Pairs, group_summary, subset_metrics
from .pairwise import pairwise_stats, progress_line

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "REDUCTION_KEYS",
    "FORMULAS",
    "ModelSummary",
    "NonFiniteLogits",
    "PairSums",
    "PairwiseStats",
    "Pairs",
    "array_digest",
    "bootstrap_sd_ratio_ci",
    "bootstrap_sd_se",
    "cross_entropy",
    "equal_variance_test",
    "flat_distances",
    "group_summary",
    "pair_mean",
    "pairwise_cka_matrix",
    "pairwise_param_distance",
    "pairwise_stats",
    "population_sd",
    "progress_line",
    "relative_distances",
    "reduction_terms",
    "subset_metrics",
    "summarize_model",
    "variability_reduction",
]
