"""Metric formulas against small cases worked out by hand (docs/study.md "Metrics").

Expected values are written out from the definitions, never taken from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nondet_hpc import metrics as M
from nondet_hpc.metrics import formulas as F
from nondet_hpc.metrics import pairwise as PW
from nondet_hpc.registry import metrics as RM


def summary(models: list[np.ndarray], labels: np.ndarray | None = None, features: list | None = None) -> dict:
    """The group's metrics as the reducer computes them (labels do not enter disagreement or correlation)."""
    st = M.pairwise_stats(models, np.zeros(models[0].shape[0], np.int64) if labels is None else labels)
    if features is not None:
        st.add("cka", M.pairwise_cka_matrix(features))
    return M.group_summary(st)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices [n, d1], [n, d2]: the float64 definition, no blocks."""
    X = np.asarray(x, dtype=np.float64)
    Y = np.asarray(y, dtype=np.float64)
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    den = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(np.linalg.norm(Y.T @ X) ** 2 / den) if den > 0 else math.nan


def onehot_logits(preds: list[int], classes: int) -> np.ndarray:
    """Logits whose argmax is ``preds`` (1 on the predicted class, 0 elsewhere)."""
    x = np.zeros((len(preds), classes), np.float32)
    x[np.arange(len(preds)), preds] = 1.0
    return x


# ----------------------------------------------------------------------------------- one model


def test_accuracy_hand_case_with_tie_to_lowest_class():
    logits = np.array([[2, 1, 0], [0, 1, 2], [1, 1, 0]], np.float32)
    labels = np.array([0, 0, 1])
    # predictions 0, 2, 0 (the tie 1 = 1 goes to class 0): only the first is right
    assert M.summarize_model(logits, labels).n_correct == 1


def test_cross_entropy_hand_case():
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = np.array([0, 0])
    # -log(1/2) and -log(3/4)
    assert M.cross_entropy(logits, labels) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-12)


def test_population_sd_hand_case_and_exact_zero():
    assert M.population_sd([1, 2, 3, 4]) == pytest.approx(math.sqrt(1.25), rel=1e-15)  # deviations 1.5, .5
    assert M.population_sd([0.1] * 7) == 0.0
    assert M.population_sd([91.37] * 100) == 0.0


def test_summarize_model_rejects_non_finite():
    x = np.zeros((3, 2), np.float32)
    x[1, 0] = np.nan
    with pytest.raises(M.NonFiniteLogits):
        M.summarize_model(x, np.array([0, 1, 0]))
    x[1, 0] = np.inf
    with pytest.raises(M.NonFiniteLogits):
        M.summarize_model(x, np.array([0, 1, 0]))


def test_labels_outside_classes_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        M.summarize_model(np.zeros((2, 3), np.float32), np.array([0, 3]))


# ----------------------------------------------------------------------------------- bootstrap


def test_bootstrap_se_reproducible_and_seed_dependent():
    vals = np.random.default_rng(5).normal(size=40)
    a = M.bootstrap_sd_se(vals, n_boot=2000, seed=7)
    b = M.bootstrap_sd_se(vals, n_boot=2000, seed=7)
    c = M.bootstrap_sd_se(vals, n_boot=2000, seed=8)
    assert a == b
    assert a != c
    assert M.bootstrap_sd_se(vals, n_boot=2000, seed=[7, 123]) == M.bootstrap_sd_se(vals, n_boot=2000, seed=[7, 123])


def test_bootstrap_se_two_values_worked_out():
    # values {0, 2}: a resample is (0,0), (0,2), (2,0) or (2,2), each with probability 1/4, with
    # population SD 0, 1, 1, 0. The resampled SD is 0 or 1 with probability 1/2: its SD is 1/2.
    se = M.bootstrap_sd_se([0.0, 2.0], n_boot=10_000, seed=0)
    assert se == pytest.approx(0.5, abs=0.01)


def test_bootstrap_se_exactly_zero_for_identical_values():
    assert M.bootstrap_sd_se([0.7] * 30, n_boot=500, seed=1) == 0.0


def test_bootstrap_ratio_ci():
    # point ratio by hand: SD{0,2} = 1, SD{0,4} = 2
    r, lo, hi = M.bootstrap_sd_ratio_ci([0.0, 2.0], [0.0, 4.0], n_boot=200, seed=0)
    assert r == pytest.approx(0.5)
    rng = np.random.default_rng(3)
    a, b = rng.normal(scale=1.0, size=400), rng.normal(scale=2.0, size=400)
    r, lo, hi = M.bootstrap_sd_ratio_ci(a, b, n_boot=2000, seed=1)
    assert lo < 0.5 < hi < 1.0  # true ratio 0.5 inside, equality (1) excluded
    assert M.bootstrap_sd_ratio_ci(a, b, n_boot=500, seed=4) == M.bootstrap_sd_ratio_ci(a, b, n_boot=500, seed=4)


def test_brown_forsythe_against_hand_anova():
    # Brown-Forsythe W = one-way ANOVA F statistic on z = |x - median of its group|
    groups = [np.array([1.0, 2.0, 4.0, 7.0]), np.array([2.0, 2.5, 3.0, 3.5, 10.0]), np.array([0.0, 5.0, 5.0])]
    z = [np.abs(g - np.median(g)) for g in groups]
    k, N = len(z), sum(len(g) for g in z)
    grand = np.concatenate(z).mean()
    between = sum(len(g) * (g.mean() - grand) ** 2 for g in z) / (k - 1)
    within = sum(((g - g.mean()) ** 2).sum() for g in z) / (N - k)
    W, p = M.equal_variance_test(groups)
    assert W == pytest.approx(between / within, rel=1e-12)
    assert 0.0 < p < 1.0


# ----------------------------------------------------------------------------------- pairwise


def test_disagreement_hand_case():
    preds = [[0, 1, 2, 0], [0, 1, 1, 0], [1, 1, 2, 2]]
    models = [onehot_logits(p, 3) for p in preds]
    # pairs (0,1): 1 of 4 differ; (0,2): 2 of 4; (1,2): 3 of 4 -> mean 6/12
    assert summary(models)["disagreement"] == pytest.approx(50.0, abs=1e-12)


def test_correlation_hand_case():
    a = np.array([[1, 2], [3, 4]], np.float32)  # deviations -1.5 -.5 .5 1.5
    b = np.array([[1, 2], [4, 3]], np.float32)  # deviations -1.5 -.5 1.5 .5: sum of products 4, norms^2 5
    c = 2 * a + 1  # perfectly correlated with a
    d = np.array([[1, 0], [0, 1]], np.float32)  # deviations .5 -.5 -.5 .5: uncorrelated with a
    assert summary([a, b])["correlation"] == pytest.approx(0.8, abs=1e-12)
    assert summary([a, b, c])["correlation"] == pytest.approx((0.8 + 1.0 + 0.8) / 3, abs=1e-12)
    assert summary([a, d])["correlation"] == pytest.approx(0.0, abs=1e-12)
    assert summary([a, -a])["correlation"] == pytest.approx(-1.0, abs=1e-12)


def test_ensemble_delta_hand_case():
    labels = np.array([0, 0])
    m0 = np.array([[2, 0], [0, 1]], np.float32)  # right, wrong: 50 %
    m1 = np.array([[0, 1], [3, 0]], np.float32)  # wrong, right: 50 %
    # sum [[2, 1], [3, 1]] -> both right: 100 %; delta = 100 - (50 + 50)/2
    assert summary([m0, m1], labels)["ensemble_delta"] == pytest.approx(50.0)


def test_ensemble_delta_tie_goes_to_lowest_class():
    labels = np.array([1])
    m0 = np.array([[1, 0]], np.float32)  # wrong
    m1 = np.array([[0, 1]], np.float32)  # right
    # sum [1, 1]: argmax picks class 0, wrong -> 0 - (0 + 100)/2
    assert summary([m0, m1], labels)["ensemble_delta"] == pytest.approx(-50.0)


def test_ensemble_delta_three_models_by_hand():
    labels = np.array([0, 1, 2])
    m = [np.array([[3, 0, 0], [0, 0, 2], [0, 1, 0]], np.float32),   # right, wrong, wrong
         np.array([[0, 2, 0], [0, 3, 0], [0, 0, 1]], np.float32),   # wrong, right, right
         np.array([[1, 0, 0], [1, 0, 0], [0, 0, 5]], np.float32)]   # right, wrong, right
    acc = [100 / 3, 200 / 3, 200 / 3]
    # (0,1): sums [3,2,0] [0,3,2] [0,1,1] -> 0 right, 1 right, tie 1=1 -> class 1 wrong: 2/3
    # (0,2): [4,0,0] [1,0,2] [0,1,5] -> right, wrong, right: 2/3
    # (1,2): [1,2,0] [1,3,0] [0,0,6] -> wrong, right, right: 2/3
    ens = [200 / 3] * 3
    expected = np.mean([ens[0] - (acc[0] + acc[1]) / 2, ens[1] - (acc[0] + acc[2]) / 2, ens[2] - (acc[1] + acc[2]) / 2])
    assert summary(m, labels)["ensemble_delta"] == pytest.approx(expected, abs=1e-12)


def test_linear_cka_hand_case():
    X = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float64)  # centred; X^T X = 2 I, ||.||_F = sqrt 8
    Y = np.array([[1], [-1], [0], [0]], np.float64)  # Y^T Y = [2]; Y^T X = [2, 0]
    expected = 4.0 / (math.sqrt(8.0) * 2.0)
    assert linear_cka(X, Y) == pytest.approx(expected, rel=1e-12)
    cka = M.pairwise_cka_matrix([X.astype(np.float32), Y.astype(np.float32)])
    assert cka[0, 1] == pytest.approx(expected, rel=1e-6)
    # invariant to rotation and scale: CKA(X, 3 X Q) = 1
    Q = np.array([[0.6, -0.8], [0.8, 0.6]])
    assert linear_cka(X, 3 * X @ Q) == pytest.approx(1.0, rel=1e-12)
    logits = [np.zeros((4, 2), np.float32)] * 3  # CKA joins any group's pairwise metrics
    got = summary(logits, features=[X, Y, 3 * X @ Q])["cka"]
    assert got == pytest.approx((expected + 1.0 + expected) / 3, rel=1e-6)


def test_testset_sd_hand_case():
    # label 0 everywhere; model 0 right on examples 0, 1, model 1 on examples 0, 2
    models = [onehot_logits([0, 0, 1, 1], 2), onehot_logits([0, 1, 0, 1], 2)]
    # p = 1, .5, .5, 0 -> sum p(1-p) = 0.5 -> 100 * sqrt(0.5) / 4
    assert summary(models, np.zeros(4, np.int64))["testset_sd"] == pytest.approx(100 * math.sqrt(0.5) / 4, rel=1e-12)


def _random_group(n_models: int, n: int, c: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    base = rng.normal(size=(n, c))
    base[np.arange(n), y] += 1.5
    return [(base + rng.normal(size=(n, c))).astype(np.float32) for _ in range(n_models)], y


def test_group_summary_matches_per_pair_definitions():
    models, y = _random_group(6, 300, 5, seed=11)
    s = M.group_summary(M.pairwise_stats(models, y))
    acc = [np.mean(m.argmax(1) == y) * 100 for m in models]
    dis, cor, ens = [], [], []
    for i in range(6):
        for j in range(i + 1, 6):
            dis.append(np.mean(models[i].argmax(1) != models[j].argmax(1)) * 100)
            cor.append(np.corrcoef(models[i].ravel().astype(float), models[j].ravel().astype(float))[0, 1])
            ens.append(np.mean((models[i] + models[j]).argmax(1) == y) * 100 - (acc[i] + acc[j]) / 2)
    assert s["acc_mean"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert s["acc_sd"] == pytest.approx(np.std(acc), abs=1e-12)
    assert s["disagreement"] == pytest.approx(np.mean(dis), abs=1e-12)
    assert s["correlation"] == pytest.approx(np.mean(cor), abs=1e-12)
    assert s["ensemble_delta"] == pytest.approx(np.mean(ens), abs=1e-12)


class _Flat:
    """A flat parameter vector as the final-parameter-distance formula reads it (as a weights file)."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)
        self.n_values = self.values.size

    def flat_range(self, lo: int, hi: int) -> np.ndarray:
        return self.values[lo:hi]


def test_final_parameter_distance_worked_by_hand():
    # theta: (3, 4), (0, 0), (3, 0) and a copy of the first; norms 5, 0, 3, 5
    vecs = [_Flat([3, 4]), _Flat([0, 0]), _Flat([3, 0]), _Flat([3, 4])]
    dist, norms = M.flat_distances(vecs, block_bytes=8 * 4)  # one value of each vector per block
    assert norms.tolist() == [5, 0, 3, 5]
    assert dist[0].tolist() == [0, 5, 4, 0] and dist[1, 2] == 3 and dist[3, 0] == 0.0
    rel = M.pairwise_param_distance(vecs, block_bytes=8 * 4)
    # 100 * d / ((|a| + |b|) / 2): (0,1): 5 / 2.5; (0,2): 4 / 4; (1,2): 3 / 1.5; copies exactly 0
    assert rel[0, 1] == pytest.approx(200.0) and rel[0, 2] == pytest.approx(100.0)
    assert rel[1, 2] == pytest.approx(200.0) and rel[0, 3] == 0.0 and np.all(np.diag(rel) == 0)
    assert np.array_equal(rel, rel.T)


def test_the_registry_declares_what_the_formulas_compute():
    models, y = _random_group(4, 50, 3, seed=1)
    st = M.pairwise_stats(models, y)
    made_here = {m.key for m in RM.of_kind(RM.PAIRWISE) if m.pair is None}
    assert set(st.pairs) == made_here  # the one pass over the logits makes exactly these
    for m in RM.METRICS.values():
        if m.pair is not None and m.inputs == RM.LOGITS:
            st.add(m.key, m.pair(models, M.DEFAULT_BLOCK_BYTES), m.value)
    st.add("cka", M.pairwise_cka_matrix([np.random.default_rng(k).normal(size=(50, 3)) for k in range(4)]))
    st.add("param_distance", M.pairwise_param_distance([_Flat(np.random.default_rng(k).normal(size=9)) for k in range(4)]))
    # subset_metrics yields per-model, pairwise, then group metrics (ablation.csv's order)
    want = [m.key for kind in (RM.MODEL, RM.PAIRWISE, RM.GROUP) for m in RM.of_kind(kind)]
    assert list(M.subset_metrics(st, [[0, 1, 2]])) == want
    for m in RM.model_sds():
        assert m.per_model in st.per_model() and m.se is not None


def test_blocking_does_not_change_results():
    models, y = _random_group(7, 257, 4, seed=2)
    big = M.pairwise_stats(models, y)
    tiny = M.pairwise_stats(models, y, block_bytes=1)  # one test example per block
    assert np.array_equal(mat(big, 'disagreement'), mat(tiny, 'disagreement'))
    assert np.array_equal(mat(big, 'ensemble_delta'), mat(tiny, 'ensemble_delta'))
    np.testing.assert_allclose(mat(big, 'correlation'), mat(tiny, 'correlation'), atol=1e-13)


def test_subset_metrics_equal_metrics_of_the_subset():
    models, y = _random_group(9, 200, 3, seed=4)
    full = M.pairwise_stats(models, y)
    idx = [7, 1, 4, 2]
    sub = M.group_summary(M.pairwise_stats([models[i] for i in idx], y))
    got = M.subset_metrics(full, [idx])
    for k in ("acc_mean", "acc_sd", "ce_sd", "disagreement", "correlation", "ensemble_delta", "testset_sd"):
        assert got[k][0] == pytest.approx(sub[k], abs=1e-12), k
    with pytest.raises(ValueError):
        M.subset_metrics(full, [[1, 1, 2]])


# ----------------------------------------------------------------------------------- determinism


def test_identical_models_give_exact_zeros_and_one():
    rng = np.random.default_rng(0)
    n, c = 997, 10
    y = rng.integers(0, c, n)
    # awkward values (0.1 multiples, large offset) that make float sums round
    x = (rng.integers(-50, 50, size=(n, c)) * 0.1 + 1000.3).astype(np.float32)
    feats = (rng.normal(size=(n, 16)) * 0.1 + 7.7).astype(np.float32)
    models = [x.copy() for _ in range(5)]
    st = M.pairwise_stats(models, y)
    st.add("cka", M.pairwise_cka_matrix([feats.copy() for _ in range(5)]))
    s = M.group_summary(st)
    assert s["acc_sd"] == 0.0
    assert s["ce_sd"] == 0.0
    assert s["disagreement"] == 0.0
    assert s["correlation"] == 1.0
    assert s["ensemble_delta"] == 0.0
    assert s["cka"] == 1.0
    assert s["testset_sd"] == 0.0
    assert M.bootstrap_sd_se(st.accuracies, n_boot=1000, seed=0) == 0.0
    assert M.bootstrap_sd_se(st.ce, n_boot=1000, seed=0) == 0.0
    assert st.n_distinct() == 1


# ----------------------------------------------------------------------------------- reduction


BASE = {"acc_sd": 0.2, "ce_sd": 0.004, "disagreement": 10.0, "correlation": 0.98, "ensemble_delta": 1.0}
NEW = {"acc_sd": 0.1, "ce_sd": 0.003, "disagreement": 8.0, "correlation": 0.99, "ensemble_delta": 0.5}


def test_variability_reduction_paper_formula_worked_example():
    # 1 - .1/.2 = .5; 1 - .003/.004 = .25; 1 - 8/10 = .2; 1 - (1-.99)/(1-.98) = .5; 1 - .5/1 = .5
    assert M.variability_reduction(BASE, NEW, "paper") == pytest.approx(100 * (0.5 + 0.25 + 0.2 + 0.5 + 0.5) / 5)
    assert M.variability_reduction(BASE, NEW) == M.variability_reduction(BASE, NEW, "paper")


def test_variability_reduction_report_formula_worked_example():
    # correlation term becomes the relative rise (.99 - .98)/.98
    expected = 100 * (0.5 + 0.25 + 0.2 + 0.01 / 0.98 + 0.5) / 5
    assert M.variability_reduction(BASE, NEW, "report") == pytest.approx(expected)
    terms = M.reduction_terms(BASE, NEW, "report")
    assert terms["correlation"] == pytest.approx(0.01 / 0.98)


def test_variability_reduction_undefined_and_invalid():
    zero = dict(BASE, acc_sd=0.0)
    assert math.isnan(M.variability_reduction(zero, NEW))
    assert M.variability_reduction(BASE, BASE) == 0.0
    with pytest.raises(ValueError):
        M.variability_reduction(BASE, NEW, "mean")
    with pytest.raises(KeyError):
        M.variability_reduction({"acc_sd": 1.0}, NEW)


# ----------------------------------------------------------------------------------- fast path


def mat(st: M.PairwiseStats, key: str) -> np.ndarray:
    """The pair matrix metric ``key`` is computed from (agreement counts, right-ensemble counts, r)."""
    return st.pairs[key].matrix


def per_pair_reference(models: list[np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
    """The plain definitions, one pair at a time (what the Gram/torch fast path must reproduce)."""
    N = len(models)
    agree = np.zeros((N, N), np.int64)
    ens = np.zeros((N, N), np.int64)
    corr = np.zeros((N, N))
    for i in range(N):
        for j in range(i + 1, N):
            a, b = models[i], models[j]
            agree[i, j] = agree[j, i] = np.count_nonzero(a.argmax(1) == b.argmax(1))
            # the sum in the logits' dtype; numpy's argmax breaks ties towards the lowest class
            ens[i, j] = ens[j, i] = np.count_nonzero((a + b).argmax(1) == y)
            if np.array_equal(a, b):
                corr[i, j] = corr[j, i] = 1.0
            else:
                with np.errstate(invalid="ignore", divide="ignore"):  # constant model: r undefined
                    corr[i, j] = corr[j, i] = np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]
    return {"agree": agree, "ens": ens, "corr": corr}


def adversarial_group(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Models built to hit every branch: ties, identical copies, constants, near-ties, huge values."""
    rng = np.random.default_rng(seed)
    n, c = 240, 4
    y = rng.integers(0, c, n)
    models = []
    for _ in range(5):  # small integers: many exact ties inside a model and in pair sums
        models.append(rng.integers(-2, 3, size=(n, c)).astype(np.float32))
    models.append(models[0].copy())  # identical to model 0
    models.append(models[0].copy())
    models.append(np.full((n, c), 0.25, np.float32))  # constant: argmax 0 everywhere
    base = rng.normal(size=(n, c)).astype(np.float32)
    base[np.arange(n), y] += 2.0
    models.append(base)
    # right by less than the rounding of a float32 sum: only the exact evaluation gets these right
    near = base.copy()
    near[np.arange(n), y] = np.nextafter(near.max(axis=1), np.float32(np.inf))
    models.append(near)
    models.append((base * 1e30).astype(np.float32))  # sums near float32 overflow
    models.append(np.where(rng.random((n, c)) < 0.5, 1.0, -1.0).astype(np.float32))
    return models, y


@pytest.mark.parametrize("kind", ["random", "adversarial"])
def test_fast_path_equals_per_pair_reference(kind):
    if kind == "random":
        models, y = _random_group(13, 301, 7, seed=21)
    else:
        models, y = adversarial_group(seed=3)
    ref = per_pair_reference(models, y)
    st = M.pairwise_stats(models, y)
    assert np.array_equal(mat(st, 'disagreement'), ref["agree"])
    assert np.array_equal(mat(st, 'ensemble_delta'), ref["ens"])
    finite = np.isfinite(ref["corr"])
    assert np.array_equal(finite, np.isfinite(mat(st, 'correlation')))  # a constant model has undefined r (NaN)
    np.testing.assert_allclose(mat(st, 'correlation')[finite], ref["corr"][finite], rtol=1e-12, atol=1e-14)


def test_fast_path_ties_against_hand_counts():
    y = np.array([1, 0, 2])
    a = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    b = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0]], np.float32)
    # sums [1, 1, 0] -> tie, class 0 wins, label 1: wrong; [1, 1, 0] -> class 0 = label: right;
    # [1, 0, 1] -> class 0, label 2: wrong. One right of three.
    assert mat(M.pairwise_stats([a, b], y), "ensemble_delta")[0, 1] == 1


def test_identical_models_exact_on_the_fast_path():
    models, y = adversarial_group(seed=5)
    st = M.pairwise_stats([models[8]] * 4, y)  # same float32 array four times
    s = M.group_summary(st)
    assert (s["disagreement"], s["correlation"], s["ensemble_delta"]) == (0.0, 1.0, 0.0)


def test_block_sizes_1_7_n_identical():
    models, y = adversarial_group(seed=9)
    N, (n, c) = len(models), models[0].shape
    per_example = N * c * (3 * 4 + 8 + 8 + 4) + N * 16  # pairwise_stats' bytes per test example
    results = [M.pairwise_stats(models, y, block_bytes=rows * per_example) for rows in (1, 7, n)]
    for st in results[1:]:
        assert np.array_equal(mat(st, 'disagreement'), mat(results[0], 'disagreement'))
        assert np.array_equal(mat(st, 'ensemble_delta'), mat(results[0], 'ensemble_delta'))
        # the float64 Gram is summed in another order: equal to rounding, not bit for bit
        np.testing.assert_allclose(mat(st, 'correlation'), mat(results[0], 'correlation'), rtol=1e-13, atol=1e-15)


def test_progress_called_per_block_up_to_total():
    models, y = _random_group(4, 50, 3, seed=1)
    seen = []
    M.pairwise_stats(models, y, block_bytes=1, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 50) for k in range(1, 51)]


def test_memory_bounded_for_2000_models():
    # 2,000 models of 64 x 10 logits, 8 MiB blocks. What must be held is N^2: the float64
    # correlation matrix (32 MB) and two float32 count accumulators (16 MB each) that become the
    # int32 results in place, 64 MB, plus blocks of about 8 MiB and per-block count temporaries.
    # Measured 130 MiB; 160 MiB leaves room for allocator noise but fails if any [N, N] copy
    # (16-32 MB) or any [N, N, m] array (1 GB) is added.
    rng = np.random.default_rng(0)
    n, c, N = 64, 10, 2000
    y = rng.integers(0, c, n)
    base = rng.normal(size=(n, c)).astype(np.float32)
    models = [base + rng.normal(scale=0.5, size=(n, c)).astype(np.float32) for _ in range(N)]
    summaries = [M.summarize_model(m, y) for m in models]
    import tracemalloc

    tracemalloc.start()
    st = M.pairwise_stats(models, y, summaries=summaries, block_bytes=8 * 2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert mat(st, 'disagreement').dtype == np.int32 and mat(st, 'ensemble_delta').dtype == np.int32
    assert peak < 160 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_long_test_set_flushes_float32_counts(monkeypatch):
    # counts are exact in float32 only up to 2^24 examples; pretend the limit is 20 so the
    # int32 flush path runs, and check it changes nothing
    models, y = adversarial_group(seed=4)
    want = M.pairwise_stats(models, y)
    monkeypatch.setattr(PW, "_F32_EXACT", 20)
    got = M.pairwise_stats(models, y)
    assert np.array_equal(mat(got, 'disagreement'), mat(want, 'disagreement'))
    assert np.array_equal(mat(got, 'ensemble_delta'), mat(want, 'ensemble_delta'))


def test_bootstrap_chunking_changes_no_value():
    # the chunked draws (bounded memory for 10,000 models) must reproduce one big draw exactly;
    # the one-draw reference uses the module's SD helper so that equality can be exact (np.std
    # rounds differently, and a quantile of near-equal ratios could then pick another resample)
    v = np.random.default_rng(2).normal(size=3001)
    rng = np.random.default_rng([4, 5])
    sds = F.sd_rows(v[rng.integers(0, v.size, size=(3000, v.size))])
    want_se = float(F.sd_rows(sds[None])[0] * math.sqrt(3000 / 2999))
    assert M.bootstrap_sd_se(v, n_boot=3000, seed=[4, 5], chunk=7) == want_se
    w = np.random.default_rng(3).normal(size=2999)
    rng = np.random.default_rng(9)
    ra = F.sd_rows(v[rng.integers(0, v.size, size=(2000, v.size))])
    rb = F.sd_rows(w[rng.integers(0, w.size, size=(2000, w.size))])
    alpha = (1 - 0.95) / 2  # as the function computes it (0.025000000000000022: another order statistic)
    want = np.quantile(ra / rb, [alpha, 1 - alpha], method="inverted_cdf")
    _, lo, hi = M.bootstrap_sd_ratio_ci(v, w, n_boot=2000, seed=9)
    assert (lo, hi) == tuple(want)
