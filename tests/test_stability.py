"""The "stable after" analysis (issue 21, part 3): nondet_hpc.analysis.stability against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nondet_hpc.analysis.resample import draws, percentile_ci
from nondet_hpc.analysis.stability import (PairValues, StabilityError, barrier_columns, row_label, stability_curve,
                                           stability_png, stability_table, stable_after)
from nondet_hpc.sweep import barriers as B


def _sym(rng, n, scale):
    a = rng.uniform(0.5, 1.5, size=(n, n)) * scale
    a = (a + a.T) / 2
    np.fill_diagonal(a, 0.0)
    return a


def _direct_resampled_mean(pv: PairValues, drawn: np.ndarray) -> float:
    """Over every two positions a < b of the resample: the value of the measured pair (r_a, r_b)."""
    lookup = {}
    for i, j, v in zip(pv.i, pv.j, pv.value):
        lookup[(int(i), int(j))] = lookup[(int(j), int(i))] = float(v)
    vals = [lookup[(int(x), int(y))] for x, y in itertools.combinations(drawn, 2) if (int(x), int(y)) in lookup]
    return float(np.mean(vals)) if vals else float("nan")


def test_pair_means_and_resamples_equal_the_direct_computation():
    rng = np.random.default_rng(3)
    full = PairValues.from_matrix(_sym(rng, 6, 2.0))
    assert full.n_pairs == 15 and full.mean() == pytest.approx(np.mean(full.value))
    some = PairValues.from_pairs([("r1", "r2", 0.3), ("r3", "r4", 0.9), ("r1", "r3", 0.5), ("r2", "r2", 7.0)])
    assert some.n_runs == 4 and some.n_pairs == 3 and some.mean() == pytest.approx((0.3 + 0.9 + 0.5) / 3)
    for pv in (full, some):
        idx = draws(pv.n_runs, 200, 11)
        got = pv.resampled_means(idx)
        want = np.array([_direct_resampled_mean(pv, row) for row in idx])
        np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    # every run drawn once: the group's own value
    assert full.resampled_means(np.arange(6)[None])[0] == pytest.approx(full.mean())
    with pytest.raises(StabilityError):
        PairValues(3, np.array([0]), np.array([0]), np.array([1.0]))


def test_stable_after_is_the_first_k_below_the_fraction_of_k0():
    ks = [0, 1, 2, 5, 10, 20]
    means = [10.0, 9.0, 6.0, 4.9, 5.5, 1.0]
    assert stable_after(ks, means, 0.5) == 5  # 4.9 < 5; 5.5 at k=10 is above again
    assert stable_after(ks, means, 0.05) is None
    assert stable_after(list(reversed(ks)), list(reversed(means)), 0.5) == 5  # order of input
    assert stable_after(ks, [0.0] * 6, 0.5) is None  # nothing to fall from
    with pytest.raises(StabilityError, match="k = 0"):
        stable_after([1, 2], [1.0, 0.1])


def test_curve_intervals_and_stable_after_against_direct_resampling():
    rng = np.random.default_rng(5)
    scales = {0: 10.0, 1: 9.0, 5: 6.0, 20: 2.0, 100: 0.5}
    points = {k: PairValues.from_matrix(_sym(rng, 8, s)) for k, s in scales.items()}
    c = stability_curve(points, fraction=0.5, n_boot=400, seed=[7])
    rows = c.rows.set_index("k")
    boot = {}
    for k, pv in points.items():  # the same draws, done here one resample at a time
        idx = draws(pv.n_runs, 400, [7, k])
        boot[k] = np.array([_direct_resampled_mean(pv, row) for row in idx])
        lo, hi = percentile_ci(boot[k])
        assert rows.loc[k, "mean"] == pytest.approx(pv.mean())
        assert (rows.loc[k, "ci_lo"], rows.loc[k, "ci_hi"]) == pytest.approx((lo, hi), rel=1e-12)
        assert rows.loc[k, "ratio"] == pytest.approx(pv.mean() / points[0].mean())
        rlo, rhi = percentile_ci(boot[k] / boot[0])
        assert (rows.loc[k, "ratio_lo"], rows.loc[k, "ratio_hi"]) == pytest.approx((rlo, rhi), rel=1e-12)
    assert c.stable_k == stable_after(list(scales), [points[k].mean() for k in scales], 0.5) == 20
    ks = sorted(scales)
    first = []
    for b in range(400):
        hit = [k for k in ks[1:] if boot[k][b] < 0.5 * boot[0][b]]
        first.append(ks.index(hit[0]) if hit else len(ks))
    q = np.quantile(first, [0.025, 0.975], method="inverted_cdf")
    assert (c.stable_lo, c.stable_hi) == tuple(ks[int(x)] if x < len(ks) else None for x in q)
    assert c.never_share == pytest.approx(np.mean(np.array(first) == len(ks)))
    assert c.stays_below is True


def test_table_summary_labels_and_plot():
    rng = np.random.default_rng(1)
    data = {(src, m): {k: PairValues.from_matrix(_sym(rng, 5, 10.0 / (1 + k))) for k in (0, 1, 2, 5)}
            for src in ("bitflip", "shuffle") for m in ("disagreement", "barrier_loss")}
    table, summary = stability_table(data, fraction=0.5, n_boot=100)
    assert len(table) == 16 and len(summary) == 4
    assert set(summary["stable_after"]) <= {1, 2, 5}
    png = stability_png(table, summary)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert stability_png(table.iloc[0:0], summary) is None
    assert row_label("Random Bit Change", 5) == "Random Bit Change at epoch 5"
    assert row_label("Random Bit Change", 0) == "Random Bit Change"


def test_barrier_columns_from_pair_records(tmp_path):
    """Pair records (sweep/barriers.py) -> one row per group: mean barriers over its pairs."""
    a = B.alphas(3)
    pairs = {("g1", "r1", "r2"): [1.0, 1.6, 1.0], ("g1", "r3", "r4"): [1.0, 1.2, 1.4], ("g2", "r5", "r6"): [2.0, 2.0, 2.0],
             ("g2", "r5", "r5"): [2.0, 2.0, 2.0]}
    for (g, x, y), loss in pairs.items():
        B.write_record(tmp_path, B.make_record(runs=[x, y], fingerprints=["f", "f"], alpha=a, test_loss=loss,
                                               test_error=[10.0, 30.0, 10.0], group_key=g))
    recs, refused = B.read_sweep(tmp_path)
    assert len(recs) == 4 and not refused
    t = barrier_columns(recs, n_boot=50).set_index("group_key")
    assert t.loc["g1", "barrier_loss"] == pytest.approx((0.6 + 0.0) / 2) and t.loc["g1", "barrier_pairs"] == 2
    assert t.loc["g2", "barrier_loss"] == 0.0 and t.loc["g2", "barrier_pairs"] == 1  # the self pair is left out
    assert t.loc["g1", "barrier_error"] == pytest.approx(20.0)
    # a run retrained since (other fingerprint): its pairs are left out
    now = {f"r{i}": "f" for i in range(1, 7)} | {"r2": "new"}
    t = barrier_columns(recs, fingerprints=now, n_boot=50).set_index("group_key")
    assert t.loc["g1", "barrier_pairs"] == 1 and t.loc["g1", "barrier_loss"] == 0.0
