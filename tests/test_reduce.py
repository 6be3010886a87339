"""The reducer on tiny synthetic sweeps written by the run-directory contract (docs/contracts.md;
the writer: tests/synthetic_sweep.py).

Expected values are computed here from the arrays the test wrote, with plain numpy, not by the
reducer's own code paths.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nondet_hpc import metrics as M
from nondet_hpc import rundir
from nondet_hpc.analysis import cli, scan, tables
from nondet_hpc.analysis import reduce as R
from nondet_hpc.analysis import resample as RS
from nondet_hpc.registry import metrics as RM
from synthetic_sweep import LABELS, N_CLASSES, N_TEST, excluded, logits_for, row, write_run

# --------------------------------------------------------------------------------------------
# a healthy sweep, reduced once for several tests


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("healthy")
    for s in range(1, 4):
        write_run(sweep, "none", s, snapshots=2, features=True)
    for s in range(1, 13):
        write_run(sweep, "init", s, snapshots=2, features=True)
    for s in range(1, 6):
        write_run(sweep, "all", s, snapshots=2, features=True)
        write_run(sweep, "shuffle", s, snapshots=2)
    df = R.reduce_sweep(sweep, n_boot=300, seed=0)
    return sweep, df


def test_rows_named_like_the_paper(healthy):
    _, df = healthy
    names = list(df["group"])
    assert names[:5] == ["Determinism Control", "Determinism Control [Flip]", "Determinism Control [Acc.Ens]",
                         "Determinism Control [Acc.Ens/Flip]", "Parameter Initialization"]
    for n in ("Parameter Initialization", "Parameter Initialization [Flip]", "Parameter Initialization [Acc.Ens]",
              "Data Shuffling", "All Nondeterminism Sources"):
        assert n in names
    # paper order: control, single sources, all
    assert names.index("Parameter Initialization") < names.index("Data Shuffling") < names.index(
        "All Nondeterminism Sources")
    # individual snapshots are not groups of their own
    assert not any("snapshot" in n for n in names)


def test_determinism_group_exact(healthy):
    _, df = healthy
    for g in ("Determinism Control", "Determinism Control [Flip]", "Determinism Control [Acc.Ens]",
              "Determinism Control [Acc.Ens/Flip]"):
        r = row(df, g)
        assert r["n_models"] == 3
        assert r["acc_sd"] == 0.0 and r["ce_sd"] == 0.0 and r["disagreement"] == 0.0
        assert r["correlation"] == 1.0 and r["ensemble_delta"] == 0.0
        assert r["acc_sd_se"] == 0.0 and r["ce_sd_se"] == 0.0
        assert r["n_distinct"] == 1
    assert row(df, "Determinism Control")["cka"] == 1.0


def test_values_match_numpy_on_the_written_arrays(healthy):
    sweep, df = healthy
    plain = [logits_for("init", s, 10) for s in range(1, 13)]
    acc = np.array([np.mean(x.argmax(1) == LABELS) * 100 for x in plain])
    r = row(df, "Parameter Initialization")
    assert r["n_models"] == 12
    assert r["acc_mean"] == pytest.approx(acc.mean(), abs=1e-10)
    assert r["acc_sd"] == pytest.approx(acc.std(), abs=1e-10)
    dis = [np.mean(plain[i].argmax(1) != plain[j].argmax(1)) * 100 for i in range(12) for j in range(i + 1, 12)]
    assert r["disagreement"] == pytest.approx(np.mean(dis), abs=1e-10)
    # accelerated ensemble = mean of the snapshot logits
    ens = [(logits_for("init", s, 1010) + logits_for("init", s, 2010)) / 2 for s in range(1, 13)]
    acc_e = np.array([np.mean(x.argmax(1) == LABELS) * 100 for x in ens])
    assert row(df, "Parameter Initialization [Acc.Ens]")["acc_mean"] == pytest.approx(acc_e.mean(), abs=1e-10)
    # test-set SD from per-example correctness
    p = np.mean([x.argmax(1) == LABELS for x in plain], axis=0)
    assert r["testset_sd"] == pytest.approx(100 * np.sqrt(np.sum(p * (1 - p))) / N_TEST, rel=1e-10)
    assert 0.0 < r["cka"] < 1.0
    assert math.isnan(row(df, "Data Shuffling")["cka"])  # shuffle runs saved no features


def test_report_files_and_units(healthy):
    sweep, df = healthy
    rep = sweep / "report"
    for f in ("metrics.csv", "metrics.md", "metrics.tex", "excluded.csv", "ablation.csv", "report.md",
              "summary.txt", "metrics.png", "per_model.csv", "claim1.csv", "sd_vs_n.png", "claim1.png",
              "accuracy_spread.png", "reduction.png"):
        assert (rep / f).is_file(), f
    csv = pd.read_csv(rep / "metrics.csv")
    for col in ("group", "view", "n_models", "acc_mean", "acc_sd", "acc_sd_se", "ce_sd", "ce_sd_se", "disagreement",
                "correlation", "ensemble_delta", "cka", "testset_sd", "reduction_pct"):
        assert col in csv.columns
    assert len(csv) == len(df)
    assert 0 < csv["acc_mean"].max() <= 100  # percent, not a fraction
    assert (rep / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\\begin{tabular}" in (rep / "metrics.tex").read_text()
    assert "Parameter Initialization" in (rep / "metrics.md").read_text()
    assert not list(rep.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_default_baseline_is_the_single_model_of_the_same_group(healthy):
    _, df = healthy
    r = row(df, "Parameter Initialization [Flip]")
    b = row(df, "Parameter Initialization")
    assert r["baseline"] == "Parameter Initialization"
    terms = [1 - r["acc_sd"] / b["acc_sd"], 1 - r["ce_sd"] / b["ce_sd"], 1 - r["disagreement"] / b["disagreement"],
             1 - (1 - r["correlation"]) / (1 - b["correlation"]), 1 - r["ensemble_delta"] / b["ensemble_delta"]]
    assert r["reduction_pct"] == pytest.approx(100 * np.mean(terms))
    assert math.isnan(b["reduction_pct"])  # single-model rows are baselines, not compared
    # bit-identical baseline: reduction undefined, not a number made up
    assert math.isnan(row(df, "Determinism Control [Flip]")["reduction_pct"])


def test_ablation_and_claim1(healthy):
    sweep, df = healthy
    ab = pd.read_csv(sweep / "report" / "ablation.csv")
    init = ab[ab["group"] == "Parameter Initialization"]
    assert list(init["n"]) == [10, 12]  # N < group size, plus all
    full = init[init["n"] == 12].iloc[0]
    r = row(df, "Parameter Initialization")
    assert full["acc_sd_mean"] == pytest.approx(r["acc_sd"]) and full["acc_sd_spread"] == 0.0
    assert init[init["n"] == 10].iloc[0]["n_subsets"] > 1
    assert list(ab[ab["group"] == "All Nondeterminism Sources"]["n"]) == [5]
    lines = df.attrs["claim1"]
    assert len(lines) == 1 and "Brown-Forsythe" in lines[0] and "p=" in lines[0]
    c1 = pd.read_csv(sweep / "report" / "claim1.csv")
    assert set(c1["group"]) == {"Parameter Initialization", "Data Shuffling", "All Nondeterminism Sources"}
    pi = c1[c1["group"] == "Parameter Initialization"].iloc[0]
    allsd = row(df, "All Nondeterminism Sources")["acc_sd"]
    assert pi["sd_ratio"] == pytest.approx(r["acc_sd"] / allsd)
    assert pi["ci_low"] <= pi["sd_ratio"] <= pi["ci_high"]


def test_bootstrap_se_reproducible_through_the_reducer(healthy, tmp_path):
    sweep, df = healthy
    again = R.reduce_sweep(sweep, n_boot=300, seed=0)
    other = R.reduce_sweep(sweep, n_boot=300, seed=1)
    r0, r1, r2 = (row(d, "Parameter Initialization") for d in (df, again, other))
    assert r0["acc_sd_se"] == r1["acc_sd_se"] and r0["ce_sd_se"] == r1["ce_sd_se"]
    assert r0["acc_sd_se"] != r2["acc_sd_se"]
    assert r0["acc_sd"] == r2["acc_sd"]


def test_explicit_baseline_and_report_formula(healthy):
    sweep, _ = healthy
    df = R.reduce_sweep(sweep, n_boot=50, formula="report", baseline="All Nondeterminism Sources")
    assert set(df["baseline"]) == {"All Nondeterminism Sources"}
    r, b = row(df, "Parameter Initialization"), row(df, "All Nondeterminism Sources")
    terms = [1 - r["acc_sd"] / b["acc_sd"], 1 - r["ce_sd"] / b["ce_sd"], 1 - r["disagreement"] / b["disagreement"],
             (r["correlation"] - b["correlation"]) / b["correlation"], 1 - r["ensemble_delta"] / b["ensemble_delta"]]
    assert r["reduction_pct"] == pytest.approx(100 * np.mean(terms))
    assert b["reduction_pct"] == 0.0
    with pytest.raises(R.ReduceError, match="matches no row"):
        R.reduce_sweep(sweep, n_boot=50, baseline="No Such Group")


def test_cli_prints_table_and_returns_zero(healthy, capsys):
    sweep, _ = healthy
    assert cli.main([str(sweep), "--n-boot", "50", "--formula", "report"]) == 0
    out = capsys.readouterr().out
    assert "Parameter Initialization [Acc.Ens/Flip]" in out
    assert "Claim 1" in out
    assert "Left out: nothing" in out


# --------------------------------------------------------------------------------------------
# grouping details


def test_same_label_different_epochs_get_disambiguated(tmp_path):
    for s in (1, 2):
        write_run(tmp_path, "init", s, epochs=100)
        write_run(tmp_path, "init", s, epochs=500)
    stale = tmp_path / "report" / "claim1.png"  # from an older reduce that had an all-sources group
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert not stale.exists()
    names = set(df["group"])
    assert "Parameter Initialization (train.epochs=100)" in names
    assert "Parameter Initialization (train.epochs=500) [Flip]" in names


# --------------------------------------------------------------------------------------------
# robustness: each failure is named, the rest of the report is still produced


def test_incomplete_runs_listed_and_left_out(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    write_run(tmp_path, "init", 4, done=False)
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 3
    ex = excluded(tmp_path)
    hit = ex[ex["run_id"] == "init-s0004-e10"]
    assert list(hit["category"]) == ["incomplete"] and "no DONE" in hit["reason"].iloc[0]
    assert "init-s0004-e10" in df.attrs["summary"] and "incomplete" in df.attrs["summary"]


def test_diverged_run_reported_and_left_out(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    bad = logits_for("init", 4)
    bad[5, 1] = np.nan
    write_run(tmp_path, "init", 4, views={"plain": bad})
    df = R.reduce_sweep(tmp_path, n_boot=20)
    r = row(df, "Parameter Initialization")
    assert r["n_models"] == 3 and r["n_excluded"] == 1 and math.isfinite(r["correlation"])
    ex = excluded(tmp_path)
    hit = ex[ex["run_id"] == "init-s0004-e10"]
    assert list(hit["category"]) == ["diverged"]
    assert "runs/init-s0004-e10/logits/plain.npy" in hit["reason"].iloc[0]


def test_differing_labels_stop_the_group_and_name_the_run(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
        write_run(tmp_path, "shuffle", s)
    other = LABELS.copy()
    other[:3] = (other[:3] + 1) % N_CLASSES
    write_run(tmp_path, "init", 4, labels=other)
    df = R.reduce_sweep(tmp_path, n_boot=20)
    r = row(df, "Parameter Initialization")
    assert "stopped" in r["note"] and "init-s0004-e10" in r["note"]
    assert math.isnan(r["acc_sd"]) and math.isnan(r["disagreement"])
    ok = row(df, "Data Shuffling")  # other groups unaffected
    assert ok["n_models"] == 3 and math.isfinite(ok["disagreement"])
    ex = excluded(tmp_path)
    assert "labels" in set(ex[ex["run_id"] == "init-s0004-e10"]["category"])


def test_group_of_one_model_gets_accuracy_and_explanation(tmp_path):
    write_run(tmp_path, "bitflip", 1)
    for s in (1, 2):
        write_run(tmp_path, "init", s)
    df = R.reduce_sweep(tmp_path, n_boot=20)
    r = row(df, "Random Bit Change")
    expected = np.mean(logits_for("bitflip", 1, 10).argmax(1) == LABELS) * 100
    assert r["n_models"] == 1
    assert r["acc_mean"] == pytest.approx(expected)
    assert math.isnan(r["acc_sd"]) and math.isnan(r["correlation"]) and math.isnan(r["ensemble_delta"])
    assert "only 1 usable model" in r["note"]
    assert "only 1 usable model" in tables.format_table(df)


def test_corrupt_and_wrongly_shaped_files_are_named(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    d4 = write_run(tmp_path, "init", 4)
    (d4 / "logits" / "plain.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    d5 = write_run(tmp_path, "init", 5)
    np.save(d5 / "logits" / "plain.npy", np.zeros((N_TEST - 1, N_CLASSES), np.float32))  # one row short
    d6 = write_run(tmp_path, "init", 6)
    np.save(d6 / "logits" / "flip.npy", np.zeros((N_TEST, N_CLASSES + 1), np.float32))  # extra class
    d7 = write_run(tmp_path, "init", 7)
    with open(d7 / "logits" / "plain.npy", "wb") as f:  # a pickled object array: must not be unpickled
        np.save(f, np.array([{"evil": 1}] * 3, dtype=object), allow_pickle=True)
    d8 = write_run(tmp_path, "init", 8)
    (d8 / "labels.npy").write_bytes(pickle.dumps(LABELS))
    df = R.reduce_sweep(tmp_path, n_boot=20)
    ex = excluded(tmp_path)
    reasons = dict(zip(zip(ex["run_id"], ex["view"]), ex["reason"]))
    assert "runs/init-s0004-e10/logits/plain.npy" in reasons[("init-s0004-e10", "single model")]
    assert "runs/init-s0005-e10/logits/plain.npy" in reasons[("init-s0005-e10", "single model")]
    assert "runs/init-s0006-e10/logits/flip.npy" in reasons[("init-s0006-e10", "Flip")]
    assert "runs/init-s0007-e10/logits/plain.npy" in reasons[("init-s0007-e10", "single model")]
    assert "runs/init-s0008-e10/labels.npy" in reasons[("init-s0008-e10", "all")]
    assert row(df, "Parameter Initialization")["n_models"] == 4  # runs 1-3 and 6 (its plain view is fine)
    assert row(df, "Parameter Initialization [Flip]")["n_models"] == 6  # 1-5 and 7
    assert (tmp_path / "report" / "metrics.csv").is_file()


def test_missing_snapshot_leaves_run_out_of_acc_ens(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s, snapshots=3)
    d = write_run(tmp_path, "init", 4, snapshots=3)
    (d / "logits" / "snapshot-2.npy").unlink()
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization [Acc.Ens]")["n_models"] == 3
    assert row(df, "Parameter Initialization")["n_models"] == 4
    ex = excluded(tmp_path)
    mine = ex[ex["run_id"] == "init-s0004-e10"]
    assert "missing" in set(mine["category"])
    assert any("snapshot-2" in r for r in mine["reason"])


def test_no_runs_folder_or_no_complete_run_is_an_error(tmp_path, capsys):
    with pytest.raises(R.ReduceError, match="no runs/ folder"):
        R.reduce_sweep(tmp_path)
    assert cli.main([str(tmp_path)]) == 2
    assert "no runs/ folder" in capsys.readouterr().err
    write_run(tmp_path, "init", 1, done=False)
    with pytest.raises(R.ReduceError, match="no complete run"):
        R.reduce_sweep(tmp_path)
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "init-s0001-e10" in err and "incomplete" in err
    assert not (tmp_path / "report").exists()


def test_acc_ens_rows_are_compared_with_normally_trained_single_models(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (1, 2, 3):
        single = write_run(sweep, "all", seed)
        snap = write_run(sweep, "all", seed + 10, snapshots=3, epochs=11)
        for d, k in ((single, 1), (snap, 3)):
            info = json.loads((d / "run.json").read_text())
            info["identity"]["train.snapshots"] = k
            info["identity"]["train.epochs"] = 10  # same budget: only the schedule differs
            (d / "run.json").write_text(json.dumps(info))
    df = R.reduce_sweep(sweep, n_boot=200)
    acc_ens = df[df["view"] == "Acc.Ens"].iloc[0]
    single_row = df[(df["view"] == "") & df["group"].str.contains("snapshots=1")].iloc[0]
    assert acc_ens["baseline"] == single_row["group"]
    assert math.isnan(single_row["reduction_pct"])
    snap_plain = df[(df["view"] == "") & df["group"].str.contains("snapshots=3")].iloc[0]
    assert snap_plain["baseline"] == single_row["group"]


def test_results_kept_aside_by_force_are_not_runs_of_the_sweep(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    # force=true moves a finished run to runs/.replaced/<id>.<time>/ before retraining it
    (tmp_path / "runs" / ".replaced" / "init-s0001-e10.20261127-120000" / "logits").mkdir(parents=True)
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 3
    assert ".replaced" not in set(excluded(tmp_path)["run_id"])
    assert "Left out: nothing" in df.attrs["summary"]


def test_view_file_names_follow_the_run_folder_contract():
    # the reducer parses exactly the names rundir writes: a renamed contract must fail here
    for k in (1, 2, 12):
        assert scan.parse_view_file(rundir.snapshot_view(k)) == (scan.ACC_ENS, k)
        assert scan.parse_view_file(rundir.snapshot_view(k, "flip-crop25")) == (f"{scan.ACC_ENS}/flip-crop25", k)
    assert scan.parse_view_file(rundir.logits_path(Path("r"), "crop81").stem) == ("crop81", 0)
    assert scan.parse_view_file("weird name") is None
    assert scan.parse_view_file("snapshot-2_bad view") is None


def test_run_json_that_is_not_an_object_is_unreadable(tmp_path):
    for s in (1, 2):
        write_run(tmp_path, "init", s)
    d = write_run(tmp_path, "init", 3)
    (d / rundir.RUN_JSON).write_text("[1, 2]")
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 2
    hit = excluded(tmp_path).query("run_id == 'init-s0003-e10'")
    assert list(hit["category"]) == ["unreadable"]
    assert hit["reason"].iloc[0] == "runs/init-s0003-e10/run.json holds a JSON list, not an object"


# --------------------------------------------------------------------------------------------
# run folders of an older version; a pairwise metric declared in the registry


LEGACY_RUNS = Path(__file__).parent / "data" / "legacy_0_1_0" / "runs"


def test_run_folders_written_by_version_0_1_0_still_reduce(tmp_path):
    shutil.copytree(LEGACY_RUNS, tmp_path / "runs")
    df = R.reduce_sweep(tmp_path, n_boot=200, seed=0)
    # the fixtures keep logits/plain.npy only: the flip and crop25 views their run.json lists are missing
    assert list(df["group"]) == ["Determinism Control", "Parameter Initialization"]
    assert df.attrs["warnings"] == [] and set(excluded(tmp_path)["category"]) == {"missing"}
    assert row(df, "Determinism Control")["n_models"] == 1
    runs = sorted(LEGACY_RUNS.glob("init-*"))
    x = [np.load(d / "logits" / "plain.npy") for d in runs]
    y = np.load(runs[0] / "labels.npy")
    acc = np.array([np.mean(a.argmax(1) == y) * 100 for a in x])
    r = row(df, "Parameter Initialization")
    assert r["n_models"] == 2
    assert r["acc_mean"] == pytest.approx(acc.mean(), abs=1e-10)
    assert r["acc_sd"] == pytest.approx(acc.std(), abs=1e-10)
    assert r["disagreement"] == pytest.approx(np.mean(x[0].argmax(1) != x[1].argmax(1)) * 100, abs=1e-10)
    r01 = np.corrcoef(x[0].ravel().astype(np.float64), x[1].ravel().astype(np.float64))[0, 1]
    assert r["correlation"] == pytest.approx(r01, abs=1e-12)
    ens = np.mean((x[0] + x[1]).argmax(1) == y) * 100 - acc.mean()
    assert r["ensemble_delta"] == pytest.approx(ens, abs=1e-10)


def mean_abs_difference(arrays: list, block_bytes: int) -> np.ndarray:
    """A toy pair matrix: the mean |l_i - l_j| over every logit of two models."""
    x = [np.asarray(a[:], np.float64) for a in arrays]
    return np.array([[np.mean(np.abs(a - b)) for b in x] for a in x])


TOY = RM.Metric("mad", "MAD", "mean abs. difference", "mean absolute logit difference", "", 3, RM.PAIRWISE,
                legend="MAD = mean pairwise absolute difference of the logits", ablation=True, pair=mean_abs_difference)


def test_a_pairwise_metric_declared_in_the_registry_reaches_the_report(tmp_path, monkeypatch):
    monkeypatch.setitem(RM.METRICS, TOY.key, TOY)
    for s in range(1, 5):
        write_run(tmp_path, "init", s)
    df = R.reduce_sweep(tmp_path, n_boot=50, seed=0)
    plain = [logits_for("init", s, 10) for s in range(1, 5)]
    want = np.mean([np.mean(np.abs(plain[i].astype(np.float64) - plain[j])) for i in range(4) for j in range(i + 1, 4)])
    assert row(df, "Parameter Initialization")["mad"] == pytest.approx(want, rel=1e-12)
    assert row(df, "Parameter Initialization [Flip]")["mad"] > 0  # every logits view has it
    rep = tmp_path / "report"
    csv = pd.read_csv(rep / "metrics.csv")
    before = list(RM.METRICS)[list(RM.METRICS).index("mad") - 1]  # the last metric declared before it
    assert list(csv.columns[list(csv.columns).index("mad") - 1:][:3]) == [before, "mad", "baseline"]
    md = (rep / "metrics.md").read_text()
    assert "MAD" in md.splitlines()[0]  # a column of the printed table
    assert "MAD = mean pairwise absolute difference of the logits" in md
    ab = pd.read_csv(rep / "ablation.csv")
    full = ab[(ab["group"] == "Parameter Initialization") & (ab["n"] == 4)].iloc[0]
    assert full["mad_mean"] == pytest.approx(want, rel=1e-12) and "MAD" in (rep / "ablation.md").read_text()
    # the bootstrap over models resamples it like every pairwise metric
    st = M.pairwise_stats(plain, LABELS)
    st.add(TOY.key, mean_abs_difference(plain, 0), TOY.value)
    once = RS.resampled(st, np.arange(4)[None])["mad"][0]
    assert once == pytest.approx(want, rel=1e-12)
    two = RS.resampled(st, np.array([[0, 0, 1, 1]]))["mad"][0]  # only pairs of distinct models count
    assert two == pytest.approx(np.mean(np.abs(plain[0].astype(np.float64) - plain[1])), rel=1e-12)

