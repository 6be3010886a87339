"""The claims judged in the report and the published values beside ours, on synthetic sweeps.

Every model's logits are built so that its accuracy is set by the test: model i of a group is right
on example k iff u_k < p_i, with one fixed u per example and p_i = P0 + spread * z_i. So a group's
accuracy SD is ``spread`` times the SD of its z's (up to 1/n rounding), and the verdict a rule must
give is known in advance: equal spreads -> consistent, one 5x spread -> against, 4 models -> not
enough models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nondet_hpc import metrics as M
from nondet_hpc.analysis import published as P
from nondet_hpc.analysis import reduce as R
from nondet_hpc.analysis import resample as RS
from nondet_hpc.analysis import verdicts as V

N_TEST, N_CLASSES, P0 = 3000, 10, 0.8
LABELS = np.random.default_rng(5).integers(0, N_CLASSES, N_TEST)
U = np.random.default_rng(6).random(N_TEST)
LABEL_OF = {"none": "Determinism Control", "init": "Parameter Initialization", "shuffle": "Data Shuffling",
            "augment": "Data Augmentation", "cudnn": "cuDNN", "all": "All Nondeterminism Sources",
            "bitflip": "Random Bit Change", "shuffle+cudnn": "Data Shuffling + cuDNN"}
Z = np.random.default_rng(7).standard_normal(200)


def logits_with(p: float, salt: int) -> np.ndarray:
    """Right exactly where U < p (label 3, next class 1; wrong: next class 2, label 1), small noise.

    Wrong models all pick the next class, so two models disagree exactly where one is right and the
    other wrong: disagreement = |p_i - p_j|, and it scales with the spread like the accuracy SD; their
    2-model ensemble (label 4, next 3) is then right, so the ensemble gain is |p_i - p_j| / 2.
    """
    rng = np.random.default_rng(salt)
    x = rng.normal(scale=0.05, size=(N_TEST, N_CLASSES))
    right = U < p
    wrong = (LABELS + 1) % N_CLASSES
    x[np.arange(N_TEST), np.where(right, LABELS, wrong)] += np.where(right, 3.0, 2.0)
    x[np.arange(N_TEST), np.where(right, wrong, LABELS)] += 1.0
    return x.astype(np.float32)


def write_group(sweep: Path, source: str, n: int, spread: float, *, experiment: str = "sources",
                data: str = "digits", epochs: int = 10, snapshots: int = 1, tta_shrink: float | None = None,
                extra_identity: dict | None = None) -> None:
    """``n`` runs of one source whose accuracies are P0 + spread * Z[:n] (fractions)."""
    for i in range(n):
        seed = i + 1
        p = P0 + spread * Z[i]
        views = {"plain": logits_with(p, 1000 * len(source) + seed)}
        if tta_shrink is not None:  # a TTA view: the same model with its spread shrunk
            views["flip"] = logits_with(P0 + tta_shrink * spread * Z[i], 5000 + 1000 * len(source) + seed)
        rid = f"{source}-s{seed:04d}-n{snapshots}"
        d = sweep / "runs" / rid
        (d / "logits").mkdir(parents=True)
        for name, arr in views.items():
            np.save(d / "logits" / f"{name}.npy", arr, allow_pickle=False)
        np.save(d / "labels.npy", LABELS.astype(np.int64), allow_pickle=False)
        info = {"run_id": rid, "state": "done", "seed": seed, "experiment": experiment,
                "group_key": f"{source}-{data}-e{epochs}-n{snapshots}", "group_label": LABEL_OF[source],
                "identity": {"source.name": source, "source.label": LABEL_OF[source], "train.epochs": epochs,
                             "train.snapshots": snapshots, "data.name": data, "model.name": "resnet14",
                             **(extra_identity or {})},
                "views": list(views), "snapshots": [], "result": {}}
        (d / "run.json").write_text(json.dumps(info))
        (d / "DONE").write_text("{}")


def reduce(sweep: Path, **kw) -> pd.DataFrame:
    return R.reduce_sweep(sweep, n_boot=kw.pop("n_boot", 1000), seed=0, **kw)


def verdict(df: pd.DataFrame, claim: int) -> str:
    lines = [t for t in df.attrs["claims"] if t.startswith(f"Claim {claim}")]
    assert len(lines) == 1, df.attrs["claims"]
    return lines[0]


def claims_csv(sweep: Path) -> pd.DataFrame:
    return pd.read_csv(sweep / "report" / "claims.csv", keep_default_na=False, na_values=[""])


# --------------------------------------------------------------------------------------------
# the bootstrap over models


def test_resample_of_every_model_once_is_the_group_itself():
    models = [logits_with(P0 + 0.01 * Z[i], i) for i in range(6)]
    st = M.pairwise_stats(models, LABELS)
    full = RS.resampled(st, np.arange(6)[None])
    summ = M.group_summary(st)
    for k in M.REDUCTION_KEYS:
        assert full[k][0] == pytest.approx(summ[k], rel=1e-12, abs=1e-12), k
    # a resample drawing models 0, 0, 1: the only pairs of distinct models are (0, 1) twice
    two = RS.resampled(st, np.array([[0, 0, 1]]))
    pair = M.group_summary(M.pairwise_stats(models[:2], LABELS))
    for k in ("disagreement", "correlation", "ensemble_delta"):
        assert two[k][0] == pytest.approx(pair[k], rel=1e-12), k
    assert two["acc_sd"][0] == pytest.approx(np.std(st.accuracies[[0, 0, 1]]), rel=1e-12)
    # one model drawn three times: no pair of distinct models, so no pairwise value
    assert math.isnan(RS.resampled(st, np.array([[2, 2, 2]]))["disagreement"][0])


# --------------------------------------------------------------------------------------------
# claim 1


def test_claim1_equal_spreads_is_consistent_and_ignores_the_bit_change(tmp_path):
    for s in ("init", "shuffle", "augment", "cudnn", "all"):
        write_group(tmp_path, s, 60, 0.01)
    write_group(tmp_path, "bitflip", 60, 0.05)  # 5x: claim 2's business, not claim 1's
    write_group(tmp_path, "shuffle+cudnn", 60, 0.05)  # a combination is not a single source either
    df = reduce(tmp_path)
    line = verdict(df, 1)
    assert "consistent with claim 1" in line, line
    c = claims_csv(tmp_path)
    c1 = c[c["claim"] == 1]
    ratios = c1[c1["statistic"] == "acc SD / all-sources acc SD"]
    assert set(ratios["group"]) == {"Parameter Initialization", "Data Shuffling", "Data Augmentation", "cuDNN"}
    assert (ratios["ci_low"] >= 1 / V.RATIO_MARGIN).all() and (ratios["ci_high"] <= V.RATIO_MARGIN).all()
    claim1 = pd.read_csv(tmp_path / "report" / "claim1.csv")
    assert "Random Bit Change" not in set(claim1["group"]) and "Data Shuffling + cuDNN" not in set(claim1["group"])
    # the bit change's 5x spread is judged by claim 2
    assert "against claim 2" in verdict(df, 2)
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.index("## Claims") < report.index("## Metrics")


def test_claim1_one_source_with_five_times_the_spread_is_against(tmp_path):
    for s in ("init", "augment", "all"):
        write_group(tmp_path, s, 30, 0.01)
    write_group(tmp_path, "shuffle", 30, 0.05)
    df = reduce(tmp_path)
    line = verdict(df, 1)
    assert "against claim 1" in line and "Data Shuffling" in line, line
    c = claims_csv(tmp_path)
    shuf = c[(c["claim"] == 1) & (c["group"] == "Data Shuffling")].iloc[0]
    acc = df.set_index("group")["acc_sd"]
    assert shuf["value"] == pytest.approx(acc["Data Shuffling"] / acc["All Nondeterminism Sources"])
    assert shuf["ci_low"] > V.RATIO_MARGIN and shuf["outcome"] == "differs"
    bf = c[(c["claim"] == 1) & (c["outcome"] == "test")].iloc[0]
    assert bf["value"] < 0.05


def test_claim1_tiny_groups_are_not_enough_models(tmp_path):
    for s in ("init", "shuffle", "all"):
        write_group(tmp_path, s, 4, 0.01)
    df = reduce(tmp_path)
    line = verdict(df, 1)
    assert "not enough models: need" in line and f"fewer than {V.MIN_MODELS}" in line, line
    assert "consistent" not in line and "against" not in line


def test_claim1_wide_interval_predicts_the_models_needed(tmp_path):
    write_group(tmp_path, "init", 12, 0.01)
    write_group(tmp_path, "all", 12, 0.011)
    df = reduce(tmp_path)
    c = claims_csv(tmp_path)
    r = c[(c["claim"] == 1) & (c["group"] == "Parameter Initialization")].iloc[0]
    assert r["outcome"] == "unclear" and r["ci_low"] < 1 < r["ci_high"]
    h = (math.log(r["ci_high"]) - math.log(r["ci_low"])) / 2
    target = max(math.log(V.RATIO_MARGIN) - abs(math.log(r["value"])), abs(math.log(r["value"])))
    assert r["n_needed"] == math.ceil(12 * (h / target) ** 2)
    assert f"need about {int(r['n_needed'])} per group" in verdict(df, 1)


# --------------------------------------------------------------------------------------------
# claim 2


def test_claim2_ratios_with_bootstrap_intervals(tmp_path):
    write_group(tmp_path, "all", 40, 0.01)
    write_group(tmp_path, "bitflip", 40, 0.01)
    df = reduce(tmp_path)
    by = df.set_index("group")
    bit, ref = by.loc["Random Bit Change"], by.loc["All Nondeterminism Sources"]
    c = claims_csv(tmp_path)
    c2 = c[c["claim"] == 2].set_index("statistic")
    assert c2.loc["acc SD ratio", "value"] == pytest.approx(bit["acc_sd"] / ref["acc_sd"])
    assert c2.loc["disagreement ratio", "value"] == pytest.approx(bit["disagreement"] / ref["disagreement"])
    assert c2.loc["(1 - correlation) ratio", "value"] == pytest.approx(
        (1 - bit["correlation"]) / (1 - ref["correlation"]))
    for _, r in c2.iterrows():
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["n_models"] == 40 and r["n_reference"] == 40
    assert "consistent with claim 2" in verdict(df, 2)


def test_claim2_bit_change_with_a_fifth_of_the_spread_is_against(tmp_path):
    write_group(tmp_path, "all", 30, 0.01)
    write_group(tmp_path, "bitflip", 30, 0.002)
    df = reduce(tmp_path)
    assert "against claim 2" in verdict(df, 2)
    c2 = claims_csv(tmp_path).query("claim == 2").set_index("statistic")
    assert c2.loc["acc SD ratio", "ci_high"] < 1 / V.RATIO_MARGIN
    assert c2.loc["disagreement ratio", "ci_high"] < 1 / V.RATIO_MARGIN


# --------------------------------------------------------------------------------------------
# claim 3


def test_claim3_reduction_with_bootstrap_interval_both_formulas(tmp_path):
    write_group(tmp_path, "all", 30, 0.01, tta_shrink=0.5)
    df = reduce(tmp_path)
    by = df.set_index("group")
    base, flip = by.loc["All Nondeterminism Sources"], by.loc["All Nondeterminism Sources [Flip]"]
    c3 = claims_csv(tmp_path).query("claim == 3")
    assert len(c3) == 2  # both formulas
    for f in M.FORMULAS:
        r = c3[c3["statistic"] == f"variability reduction % ({f} formula)"].iloc[0]
        want = M.variability_reduction({k: base[k] for k in M.REDUCTION_KEYS},
                                       {k: flip[k] for k in M.REDUCTION_KEYS}, f)
        assert r["value"] == pytest.approx(want, rel=1e-9)
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["ci_low"] > 0 and r["outcome"] == "reduces"
    assert by.loc["All Nondeterminism Sources [Flip]", "reduction_pct"] == pytest.approx(
        c3[c3["statistic"].str.contains("paper")].iloc[0]["value"])
    assert "consistent with claim 3" in verdict(df, 3)


def test_claim3_a_view_that_changes_nothing_is_against(tmp_path):
    write_group(tmp_path, "all", 30, 0.01, tta_shrink=1.0)
    df = reduce(tmp_path)
    r = claims_csv(tmp_path).query("claim == 3").iloc[0]
    assert r["ci_high"] < V.REDUCTION_MARGIN, r
    assert "against claim 3" in verdict(df, 3)


# --------------------------------------------------------------------------------------------
# published values


def test_published_block_for_a_sweep_labelled_as_the_sources_table(tmp_path):
    for s in ("init", "all"):
        write_group(tmp_path, s, 12, 0.002, data="cifar10", epochs=500)
    df = reduce(tmp_path)
    pub = pd.read_csv(tmp_path / "report" / "published.csv")
    table4 = P.load().query("table == 4").set_index("row")
    by = df.set_index("group")
    for ours_row, pub_row in (("Parameter Initialization", "Parameter Initialization"),
                              ("All Nondeterminism Sources", "All Nondeterminism Sources")):
        mine = pub[pub["group"] == ours_row].set_index("metric")
        assert set(mine["table"]) == {4} and set(mine["published_row"]) == {pub_row}
        for k, se_col in (("acc_sd", "acc_sd_se"), ("ce_sd", "ce_sd_se")):
            r = mine.loc[k]
            assert r["published"] == table4.loc[pub_row, k]
            assert r["ours"] == by.loc[ours_row, k] and r["ours_se"] == by.loc[ours_row, se_col]
            assert r["se_units"] == pytest.approx((r["ours"] - r["published"]) / r["ours_se"])
        for k in ("disagreement", "correlation", "ensemble_delta"):  # SEs from the bootstrap over models
            r = mine.loc[k]
            assert r["ours"] == pytest.approx(by.loc[ours_row, k]) and r["ours_se"] > 0
            assert r["se_units"] == pytest.approx((r["ours"] - r["published"]) / r["ours_se"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "### Table 4 (the report)" in report
    # published rows we have no group for are named
    assert "Table 4 Data Augmentation (N=100, 500 epochs): no group of source augment" in report


@pytest.mark.parametrize("clean", [False, True])
def test_published_block_says_when_the_runs_are_not_the_authors_experiment(tmp_path, clean):
    settings = {"train.param_groups": "by_type", "data.augment_draw": "by_image"} if clean else \
        {"train.param_groups": "authors", "data.augment_draw": "by_position"}
    for s in ("init", "all"):
        write_group(tmp_path, s, 12, 0.002, data="cifar10", epochs=500, experiment="sources_clean" if clean
                    else "sources", extra_identity=settings)
    reduce(tmp_path, n_boot=200)
    block = (tmp_path / "report" / "report.md").read_text().split("## Published values")[1]
    assert ("Not the authors' experiment" in block) is clean
    if clean:
        assert "data.augment_draw=by_image" in block and "train.param_groups=by_type" in block


def test_published_rows_at_other_epochs_are_not_matched(tmp_path):
    write_group(tmp_path, "init", 5, 0.01, data="cifar10", epochs=10)
    reduce(tmp_path, n_boot=200)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Parameter Initialization has train.epochs=10, the table 500" in report
    assert not (tmp_path / "report" / "published.csv").exists()


def test_a_digits_sweep_says_no_comparison_applies(tmp_path):
    for s in ("init", "all"):
        write_group(tmp_path, s, 5, 0.01, experiment="sources_quick")
    reduce(tmp_path, n_boot=200)
    report = (tmp_path / "report" / "report.md").read_text()
    block = report[report.index("## Published values"):]
    assert "No published value applies: the published Table(s) 4 are on cifar10; this sweep's runs are on digits" \
        in block
    assert "### Table" not in report and not (tmp_path / "report" / "published.csv").exists()


def test_a_sweep_from_no_preset_says_why_nothing_is_compared(tmp_path):
    write_group(tmp_path, "init", 3, 0.01, experiment="")
    reduce(tmp_path, n_boot=200)
    assert "the runs record no experiment key, which reproduces none" in (
        tmp_path / "report" / "report.md").read_text()


def test_published_tables_are_package_data_with_the_citation():
    df = P.load()
    assert set(df["table"]) == {4, 5, 6, 7, 8, 9, 10}
    assert set(df["row"]) <= set(P.SOURCE_ROWS) | set(P.VIEW_ROWS)  # every published row can be matched
    from importlib import resources

    head = resources.files("nondet_hpc.analysis").joinpath("published_tables.csv").read_text().splitlines()[:3]
    assert any("[RE] Nondeterminism and Instability in Neural Network Optimization" in ln for ln in head)
