"""The planner (nondet_hpc.analysis.planning): the precision model on synthetic values with a known
SD, and the CLI on a small synthetic sweep reduced by the real reducer.

Expected numbers come from the statistics (the 1/sqrt(N) law, the SE of a normal SD) or from the
reducer's own report files, not from the planner's code paths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nondet_hpc import metrics as M
from nondet_hpc.analysis import planning as P
from nondet_hpc.analysis.reduce import reduce_sweep
from nondet_hpc.presets import gpu_hours_per_model

# --------------------------------------------------------------------------------------------
# the precision model


def test_law_reproduces_table8_from_25_to_100_models():
    # report Table 8, all sources: acc-SD SE 0.034 at N=25; the law predicts 0.017 at N=100
    # (the report measured 0.018), i.e. N = 25 * (0.034 / 0.017)^2 = 100 models for SE 0.017
    assert P.needed_n(25, 0.034, 0.017) == pytest.approx(100.0)
    assert P.needed_n(25, 0.034, 0.018) == pytest.approx(89.2, abs=0.1)


def test_bootstrap_se_of_a_normal_sd_follows_the_delta_method():
    # SE(SD) ~= SD * sqrt((kurtosis - 1) / (4 N)); normal kurtosis 3 gives SD / sqrt(2 N)
    sigma, n = 0.25, 400
    v = np.random.default_rng(3).normal(93.0, sigma, n)
    se = M.bootstrap_sd_se(v, n_boot=4000, seed=0)
    assert se == pytest.approx(sigma / math.sqrt(2 * n), rel=0.15)


def test_predicted_n_interval_covers_the_subsampling_truth():
    # 100 "models" with known SD; the SE all 100 give is the truth a pilot of 25 must predict:
    # with that SE as the target, the interval of N needed must contain 100
    sigma, N, n = 0.25, 100, 25
    full = np.random.default_rng(11).normal(93.0, sigma, N)
    truth = M.bootstrap_sd_se(full, n_boot=10_000, seed=0)
    assert truth == pytest.approx(sigma / math.sqrt(2 * N), rel=0.25)  # the known SD shows through
    rng = np.random.default_rng(12)
    covered, wrong_covered, points = 0, 0, []
    for k in range(16):
        sub = full[rng.permutation(N)[:n]]
        res = P.plan_sd_se(sub, truth, n_boot=4000, seed=k, level=0.9)
        assert res["n_low"] <= res["n_needed_bias_corrected"] <= res["n_high"]
        covered += res["n_low"] <= N <= res["n_high"]
        # a wrong truth (3x the SE, i.e. N ~ 11) must mostly fall outside: the check can fail
        wrong = P.plan_sd_se(sub, 3 * truth, n_boot=2000, seed=k, level=0.9)
        wrong_covered += wrong["n_low"] <= N <= wrong["n_high"]
        points.append(res["n_needed"])
    # nominal 90%; the double bootstrap measures about 75-80% on normal data at n = 25
    # (docs/experiments/planning.md), so 10 of 16 is the bar
    assert covered >= 10, covered
    assert wrong_covered <= 3, wrong_covered
    assert 50 <= np.median(points) <= 160


def test_subsample_check_predicts_the_full_se():
    v = np.random.default_rng(21).normal(0.0, 1.0, 60)
    c = P.subsample_check(v, 30, n_subsets=8, seed=0)
    assert c["N"] == 60 and c["n"] == 30
    assert c["se_at_N"] == pytest.approx(M.bootstrap_sd_se(v, n_boot=2000, seed=0))
    assert c["predicted_median"] == pytest.approx(c["se_at_N"], rel=0.35)
    assert c["coverage"] >= 0.5
    with pytest.raises(ValueError):
        P.subsample_check(v, 60)


def test_bit_identical_group_meets_any_target():
    res = P.plan_sd_se(np.full(8, 91.5), 0.01)
    assert res["now"] == 0.0 and res["met"] and res["n_needed"] == 2.0


def test_ratio_target_shrinks_with_n_like_the_law():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1.0, 20), rng.normal(0, 1.0, 20)
    res = P.plan_ratio(a, b, 0.1, n_boot=4000, level=0.9)
    lo, hi = M.bootstrap_sd_ratio_ci(a, b, n_boot=4000, seed=0)[1:]
    assert res["now"] == pytest.approx((hi - lo) / 2)
    assert res["n_eff"] == pytest.approx(20.0)  # equal group sizes: the common N is the law's
    assert res["n_needed"] == math.ceil(20 * (res["now"] / 0.1) ** 2)
    assert res["n_low"] <= res["n_needed_bias_corrected"] <= res["n_high"]


@pytest.mark.parametrize("text", ["acc_sd=0.02", "acc_sd_se", "acc_sd_se=abc", "acc_sd_se=-1", "acc_sd_se=inf"])
def test_bad_target_is_a_plan_error_naming_the_valid_ones(text):
    with pytest.raises(P.PlanError) as e:
        P.parse_target(text)
    assert all(k in str(e.value) for k in P.TARGETS)


def test_parse_target():
    assert P.parse_target("ce_sd_se=5e-4") == ("ce_sd_se", 5e-4)
    assert P.parse_target(" ratio_ci=0.25") == ("ratio_ci", 0.25)


# --------------------------------------------------------------------------------------------
# a synthetic sweep, reduced by the real reducer

N_TEST, N_CLASSES = 150, 5
_LABELS = np.random.default_rng(0).integers(0, N_CLASSES, N_TEST)


def _write_run(sweep: Path, source: str, seed: int, data: str) -> None:
    rid = f"{source}-s{seed:04d}-{data}"
    d = sweep / "runs" / rid
    (d / "logits").mkdir(parents=True)
    base = np.random.default_rng(1).normal(size=(N_TEST, N_CLASSES))
    base[np.arange(N_TEST), _LABELS] += 1.2
    noise = np.random.default_rng([seed, len(source), len(data)]).normal(size=(N_TEST, N_CLASSES))
    np.save(d / "logits" / "plain.npy", (base + 0.8 * noise).astype(np.float32), allow_pickle=False)
    np.save(d / "labels.npy", _LABELS.astype(np.int64), allow_pickle=False)
    label = {"init": "Parameter Initialization", "all": "All Nondeterminism Sources"}[source]
    identity = {"source.name": source, "source.label": label, "data.name": data, "data.num_classes": 10,
                "model.name": "resnet14", "train.epochs": 500 if data == "cifar10" else 3, "train.snapshots": 1}
    info = {"run_id": rid, "state": "done", "seed": seed, "group_key": f"{source}-{data}", "group_label": label,
            "identity": identity, "views": ["plain"], "snapshots": [], "threads": 1,
            "timings": {"train_s": 10.0 + seed, "eval_s": 1.0}}
    (d / "run.json").write_text(json.dumps(info))
    (d / "DONE").write_text("{}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    for s in range(1, 13):
        _write_run(root / "cifar", "init", s, "cifar10")
        _write_run(root / "cifar", "all", s, "cifar10")
    for s in range(1, 7):
        _write_run(root / "digits", "init", s, "digits")
    reduce_sweep(root / "cifar", n_boot=10_000, seed=0)
    reduce_sweep(root / "digits", n_boot=10_000, seed=0)
    return root


def test_se_now_equals_the_reducers_and_costs_follow_the_presets(sweep):
    plan = P.plan_sweep(sweep / "cifar", {"acc_sd_se": 0.5, "ce_sd_se": 0.01, "ratio_ci": 0.2}, n_outer=200,
                        n_inner=100, check_subsets=4)
    metrics = pd.read_csv(sweep / "cifar" / "report" / "metrics.csv")
    claim1 = pd.read_csv(sweep / "cifar" / "report" / "claim1.csv")
    by = {e["group"]: e for e in plan["groups"]}
    assert set(by) == set(metrics["group"])
    per_model = gpu_hours_per_model("resnet14", 500, num_classes=10, snapshots=1, views=["plain"])
    for _, row in metrics.iterrows():
        e = by[row["group"]]
        assert e["n_now"] == 12
        assert e["targets"]["acc_sd_se"]["now"] == row["acc_sd_se"]  # same seed, same resamples
        assert e["targets"]["ce_sd_se"]["now"] == row["ce_sd_se"]
        assert e["cost_unit"] == "V100 GPU-h" and e["cost_per_model"] == pytest.approx(per_model)
        t = e["targets"]["acc_sd_se"]
        assert t["n_needed"] == math.ceil(12 * (row["acc_sd_se"] / 0.5) ** 2)
        assert t["cost_needed"] == pytest.approx(t["n_needed"] * per_model)
        assert "acc_sd_se" in e["check"]  # N = 12 >= 10: the subsampling check ran
    init = by["Parameter Initialization"]["targets"]["ratio_ci"]
    c = claim1[claim1["group"] == "Parameter Initialization"].iloc[0]
    assert init["reference"] == "All Nondeterminism Sources"
    assert init["now"] == pytest.approx((c["ci_high"] - c["ci_low"]) / 2)
    assert "ratio_ci" not in by["All Nondeterminism Sources"]["targets"]
    # the study: the all-sources group must grow with the ratio's need, so both groups count
    st = plan["study"]["targets"]["ratio_ci"]
    assert st["n_groups"] == 2 and st["models_needed"] == 2 * max(init["n_needed"], 12)
    acc = plan["study"]["targets"]["acc_sd_se"]
    assert acc["common_n_needed"] == max(e["targets"]["acc_sd_se"]["n_needed"] for e in plan["groups"])


def test_digits_cost_is_cpu_seconds(sweep):
    plan = P.plan_sweep(sweep / "digits", {"acc_sd_se": 0.5}, n_outer=100, n_inner=50)
    (e,) = plan["groups"]
    assert e["cost_unit"] == "CPU-s" and "not GPU-hours" in e["cost_model"]
    assert e["cost_per_model"] == pytest.approx(np.median([11.0 + s for s in range(1, 7)]))
    assert "check" in e and not e["check"]  # N = 6: too few for the subsampling check
    assert any("fewer than 10" in n for n in plan["notes"])


def test_cli_json_has_the_fields(sweep, capsys):
    rc = P.main([str(sweep / "cifar"), "--target", "acc_sd_se=0.5,ratio_ci=0.2", "--json", "--n-outer", "100",
                 "--n-inner", "50", "--no-check"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"sweep", "targets", "level", "groups", "study", "notes"} <= set(out)
    assert out["targets"] == {"acc_sd_se": 0.5, "ratio_ci": 0.2}
    for g in out["groups"]:
        assert {"group", "n_now", "cost_per_model", "cost_unit", "targets"} <= set(g)
        t = g["targets"]["acc_sd_se"]
        assert {"now", "target", "n_needed", "n_low", "n_high", "n_needed_bias_corrected", "cost_needed",
                "met", "level"} <= set(t)
    assert {"common_n_needed", "models_needed", "cost_needed", "cost_extra"} <= set(out["study"]["targets"]["acc_sd_se"])


def test_cli_text_names_every_group_and_target(sweep, capsys):
    assert P.main([str(sweep / "cifar"), "--target", "acc_sd_se=0.5,ratio_ci=0.2", "--n-outer", "100",
                   "--n-inner", "50", "--no-check"]) == 0
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if " <= " in ln and ln.lstrip().startswith(("Parameter", "All"))]
    assert len(rows) == 3  # two acc_sd_se rows and one ratio row
    assert sum("ratio_ci vs All Nondeterminism Sources <= 0.2" in r for r in rows) == 1
    for g in ("Parameter Initialization", "All Nondeterminism Sources"):
        assert any(r.lstrip().startswith(g) and "acc_sd_se <= 0.5" in r for r in rows)
    assert "V100 GPU-h" in text


def test_missing_report_says_to_run_the_reducer(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert P.main([str(tmp_path), "--target", "acc_sd_se=0.02"]) == 2
    err = capsys.readouterr().err
    assert "per_model.csv" in err and "python -m nondet_hpc.reduce" in err and "Traceback" not in err


def test_cli_bad_target_exits_2_naming_valid_targets(sweep, capsys):
    assert P.main([str(sweep / "cifar"), "--target", "acc_sd=0.02"]) == 2
    err = capsys.readouterr().err
    assert "acc_sd_se" in err and "ce_sd_se" in err and "ratio_ci" in err
    assert P.main([str(sweep / "cifar")]) == 2  # no target at all
    assert "valid targets" in capsys.readouterr().err


def test_plan_module_is_the_entry_point():
    import nondet_hpc.plan as entry

    assert entry.main is P.main
