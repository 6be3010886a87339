"""The reducer's trust items: every planned run accounted for, one environment per group, each model
counted once, labels agreeing across the sweep (issues 9 and 10).

Sweeps are synthetic run folders plus, where planned runs matter, a sweep.json written through the
manifest module the SLURM launcher uses (both: tests/synthetic_sweep.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli
from synthetic_sweep import (CPU_ENV, LABELS, N_CLASSES, excluded, row, run_id, set_env, write_run,
                             write_sweep_json)

from nondet_hpc.analysis import cli
from nondet_hpc.analysis import reduce as R
from nondet_hpc.cluster.client import job_states


# ------------------------------------------------------------------------------ issue 9 §1: planned runs
def test_never_started_runs_are_listed_and_the_row_is_marked_below_plan(tmp_path, fake):
    sweep = tmp_path / "sweep"
    for s in (1, 2):
        write_run(sweep, "init", s)
    for s in (1, 2, 3):
        write_run(sweep, "shuffle", s)
    jobs = write_sweep_json(sweep, [("init", 1), ("init", 2), ("init", 3), ("shuffle", 1), ("shuffle", 2),
                                    ("shuffle", 3), ("all", 1)])
    fake.set_task(jobs[run_id("init", 3)], "CANCELLED", queue=False)
    df = R.reduce_sweep(sweep, n_boot=20, job_states=job_states)
    init = row(df, "Parameter Initialization")
    assert (init["n_models"], init["n_planned"], init["n_never_started"]) == (2, 3, 1)
    assert "below plan" in init["note"]
    shuf = row(df, "Data Shuffling")
    assert (shuf["n_models"], shuf["n_planned"], shuf["n_never_started"]) == (3, 3, 0)
    # the table itself marks the short group
    table = df.attrs["summary"]
    init_line = next(ln for ln in table.splitlines() if ln.startswith("Parameter Initialization "))
    assert " 2/3* " in init_line
    shuf_line = next(ln for ln in table.splitlines() if ln.startswith("Data Shuffling "))
    assert "/" not in shuf_line.split()[2]
    ex = excluded(sweep)
    hit = ex[ex["run_id"] == run_id("init", 3)]
    assert list(hit["category"]) == ["never started"]
    assert f"job {jobs[run_id('init', 3)]}: CANCELLED" in hit["reason"].iloc[0]
    # a planned group with no run folder at all is still accounted for
    assert list(ex[ex["run_id"] == run_id("all", 1)]["category"]) == ["never started"]
    report = (sweep / "report" / "report.md").read_text()
    assert "Left out: nothing" not in report and "never started" in report
    assert ("All Nondeterminism Sources (no run of this config found): planned 1, done 0, excluded 0, "
            "never started 1") in report
    csv = pd.read_csv(sweep / "report" / "metrics.csv")
    assert {"n_planned", "n_never_started"} <= set(csv.columns)


def test_sacct_missing_degrades_to_a_note(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sacct anywhere
    sweep = tmp_path / "sweep"
    for s in (1, 2):
        write_run(sweep, "init", s)
    write_sweep_json(sweep, [("init", 1), ("init", 2), ("init", 3)])
    df = R.reduce_sweep(sweep, n_boot=20, job_states=job_states)
    reason = excluded(sweep).query("run_id == 'init-s0003-e10'")["reason"].iloc[0]
    assert "SLURM not reachable" in reason and "sacct" in reason
    assert "SLURM not reachable" in df.attrs["summary"]


def test_slow_sacct_does_not_hold_the_report(tmp_path, fake):
    fake.update(behave={"sacct": {"sleep": 30}})
    sweep = tmp_path / "sweep"
    for s in (1, 2):
        write_run(sweep, "init", s)
    write_sweep_json(sweep, [("init", 1), ("init", 2), ("init", 3)])
    R.reduce_sweep(sweep, n_boot=20, slurm_timeout=0.5, job_states=job_states)
    reason = excluded(sweep).query("run_id == 'init-s0003-e10'")["reason"].iloc[0]
    assert "SLURM not reachable" in reason and "within 0.5 s" in reason


def test_without_sweep_json_nothing_is_planned(tmp_path):
    for s in (1, 2):
        write_run(tmp_path, "init", s)
    df = R.reduce_sweep(tmp_path, n_boot=20)
    r = row(df, "Parameter Initialization")
    assert math.isnan(r["n_planned"]) and r["n_never_started"] == 0
    assert "Planned runs" not in df.attrs["summary"]


def test_incomplete_planned_run_gets_its_slurm_state(tmp_path, fake):
    sweep = tmp_path / "sweep"
    for s in (1, 2):
        write_run(sweep, "init", s)
    write_run(sweep, "init", 3, done=False)
    jobs = write_sweep_json(sweep, [("init", 1), ("init", 2), ("init", 3)])
    fake.set_task(jobs[run_id("init", 3)], "TIMEOUT", queue=False)
    df = R.reduce_sweep(sweep, n_boot=20, job_states=job_states)
    r = row(df, "Parameter Initialization")
    assert (r["n_models"], r["n_planned"], r["n_never_started"], r["n_excluded"]) == (2, 3, 0, 1)
    reason = excluded(sweep).query("run_id == 'init-s0003-e10'")["reason"].iloc[0]
    assert "no DONE" in reason and "TIMEOUT" in reason


# ------------------------------------------------------------------------------ issue 9 §2: environments
def test_mixed_thread_counts_are_refused_naming_the_runs(tmp_path, capsys):
    for s in (1, 2, 3):
        set_env(write_run(tmp_path, "init", s), **CPU_ENV)
    for s in (1, 2):
        set_env(write_run(tmp_path, "shuffle", s), **CPU_ENV)
    set_env(tmp_path / "runs" / "init-s0003-e10", threads=2)
    with pytest.raises(R.ReduceError) as e:
        R.reduce_sweep(tmp_path, n_boot=20)
    msg = str(e.value)
    assert "threads: 1 (init-s0001-e10, init-s0002-e10); 2 (init-s0003-e10)" in msg and "--allow-mixed" in msg
    assert "Data Shuffling" not in msg
    assert cli.main([str(tmp_path), "--n-boot", "20"]) == 2
    assert "init-s0003-e10" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    df = R.reduce_sweep(tmp_path, n_boot=20, allow_mixed=True)
    assert row(df, "Parameter Initialization")["n_models"] == 3
    assert "mixed environments" in row(df, "Parameter Initialization")["note"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Mixed environments (--allow-mixed)" in report and "init-s0003-e10" in report


@pytest.mark.parametrize("change", [
    {"device": {"type": "cuda", "name": "NVIDIA H100"}},
    {"versions": {"torch": "2.8.0", "cuda": None, "cudnn": None}},
    {"fp32": {"fp32_precision": "tf32"}},
    {"precision": "bf16"},
])
def test_other_environment_differences_are_refused(tmp_path, change):
    for s in (1, 2, 3):
        set_env(write_run(tmp_path, "init", s), **CPU_ENV)
    set_env(tmp_path / "runs" / "init-s0002-e10", **change)
    with pytest.raises(R.ReduceError, match="init-s0002-e10"):
        R.reduce_sweep(tmp_path, n_boot=20)


def test_gpu_models_differ_within_a_group(tmp_path):
    gpu = {"device": {"type": "cuda", "name": "NVIDIA A100"}, "threads": 4,
           "versions": {"torch": "2.9.0", "cuda": "12.8", "cudnn": 91000}, "fp32": {"fp32_precision": "ieee"}}
    for s in (1, 2, 3):
        set_env(write_run(tmp_path, "init", s), **gpu)
    set_env(tmp_path / "runs" / "init-s0001-e10", threads=16)  # CPU threads do not matter on a GPU
    R.reduce_sweep(tmp_path, n_boot=20)
    set_env(tmp_path / "runs" / "init-s0003-e10", device={"type": "cuda", "name": "NVIDIA H200"})
    with pytest.raises(R.ReduceError, match=r"gpu: NVIDIA A100 \(init-s0001-e10, init-s0002-e10\); NVIDIA H200"):
        R.reduce_sweep(tmp_path, n_boot=20)


# ------------------------------------------------------------------------------ issue 10: count once
def test_symlinked_duplicate_does_not_change_n(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    before = R.reduce_sweep(tmp_path, n_boot=50)
    os.symlink("init-s0001-e10", tmp_path / "runs" / "init-s0001-e10.link")
    after = R.reduce_sweep(tmp_path, n_boot=50)
    a, b = row(before, "Parameter Initialization"), row(after, "Parameter Initialization")
    assert b["n_models"] == 3 and b["acc_sd"] == a["acc_sd"] and b["disagreement"] == a["disagreement"]
    hit = excluded(tmp_path).query("run_id == 'init-s0001-e10.link'")
    assert list(hit["category"]) == ["duplicate"] and "symbolic link" in hit["reason"].iloc[0]


def test_copied_bak_folder_and_repeated_seed_count_once(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    shutil.copytree(tmp_path / "runs" / "init-s0002-e10", tmp_path / "runs" / "init-s0002-e10.bak")
    # a folder whose run.json names itself but repeats group and seed of another run
    d = shutil.copytree(tmp_path / "runs" / "init-s0003-e10", tmp_path / "runs" / "init-s0003-e10-copy")
    set_env(d, run_id="init-s0003-e10-copy")
    df = R.reduce_sweep(tmp_path, n_boot=20)
    r = row(df, "Parameter Initialization")
    assert r["n_models"] == 3 and r["n_excluded"] == 2
    ex = excluded(tmp_path).set_index("run_id")
    assert ex.loc["init-s0002-e10.bak", "category"] == "identity"
    assert "names run 'init-s0002-e10'" in ex.loc["init-s0002-e10.bak", "reason"]
    assert ex.loc["init-s0003-e10-copy", "category"] == "duplicate"
    assert "same group and seed (3) as runs/init-s0003-e10" in ex.loc["init-s0003-e10-copy", "reason"]


def test_symlinked_logits_file_is_not_read(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    p = tmp_path / "runs" / "init-s0003-e10" / "logits" / "plain.npy"
    p.unlink()
    os.symlink(tmp_path / "runs" / "init-s0001-e10" / "logits" / "plain.npy", p)  # the same model twice
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 2
    reason = excluded(tmp_path).query("run_id == 'init-s0003-e10' and view == 'single model'")["reason"].iloc[0]
    assert "symbolic link" in reason


def test_fifo_plain_npy_is_excluded_without_blocking(tmp_path):
    """Opening a FIFO without a writer blocks for ever: the reducer (in its own process, so a hang
    cannot block this one) must finish without opening it."""
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    p = tmp_path / "runs" / "init-s0002-e10" / "logits" / "plain.npy"
    p.unlink()
    os.mkfifo(p)
    proc = run_cli(["-m", "nondet_hpc.reduce", str(tmp_path), "--n-boot", "20", "--slurm-timeout", "0"], check=False)
    assert proc.returncode == 0, proc.stderr
    reason = excluded(tmp_path).query("run_id == 'init-s0002-e10'")["reason"].iloc[0]
    assert "runs/init-s0002-e10/logits/plain.npy: is a FIFO, not a regular file" == reason


def test_labels_must_agree_across_groups(tmp_path):
    other = LABELS.copy()
    other[:5] = (other[:5] + 1) % N_CLASSES
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
        write_run(tmp_path, "all", s)
        write_run(tmp_path, "shuffle", s, labels=other)  # the whole group scored on other labels
    df = R.reduce_sweep(tmp_path, n_boot=20)
    shuf = row(df, "Data Shuffling")
    assert "stopped" in shuf["note"] and "shuffle-s0001-e10" in shuf["note"] and math.isnan(shuf["acc_sd"])
    assert row(df, "Parameter Initialization")["n_models"] == 3
    ex = excluded(tmp_path)
    hit = ex[ex["run_id"] == "shuffle-s0002-e10"]
    assert set(hit["category"]) == {"labels"} and "not the same as in 6 other run(s)" in hit["reason"].iloc[0]


def test_other_test_sets_are_not_compared(tmp_path):
    # a different test subset legitimately has other labels: separate test set, nothing stopped
    for s in (1, 2):
        write_run(tmp_path, "init", s)
        d = write_run(tmp_path, "shuffle", s, labels=(LABELS + 1) % N_CLASSES)
        info = json.loads((d / "run.json").read_text())
        info["identity"]["data.test_subset"] = 100
        (d / "run.json").write_text(json.dumps(info))
    df = R.reduce_sweep(tmp_path, n_boot=20)
    shuf = df[df["group"] == "Data Shuffling (data.test_subset=100)"].iloc[0]
    assert "stopped" not in shuf["note"] and shuf["n_models"] == 2
    assert not (excluded(tmp_path)["category"] == "labels").any()


def test_data_hash_must_agree_for_one_data_config(tmp_path):
    for s in (1, 2, 3):
        set_env(write_run(tmp_path, "init", s), data={"sha256": "aaa"})
        set_env(write_run(tmp_path, "shuffle", s), data={"sha256": "aaa"})
    set_env(tmp_path / "runs" / "shuffle-s0002-e10", data={"sha256": "bbb"})
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert "stopped" in row(df, "Data Shuffling")["note"]
    hit = excluded(tmp_path).query("run_id == 'shuffle-s0002-e10'")
    assert set(hit["category"]) == {"data"} and "data.sha256" in hit["reason"].iloc[0]


def test_n_excluded_counts_scan_exclusions(tmp_path):
    for s in (1, 2, 3):
        write_run(tmp_path, "init", s)
    write_run(tmp_path, "init", 4, done=False)  # found while scanning
    d = write_run(tmp_path, "init", 5)
    (d / "labels.npy").write_bytes(b"not numpy")  # found while scanning
    bad = write_run(tmp_path, "init", 6)
    arr = np.load(bad / "logits" / "plain.npy")
    arr[0, 0] = np.inf
    np.save(bad / "logits" / "plain.npy", arr)  # found while reducing the plain row only
    df = R.reduce_sweep(tmp_path, n_boot=20)
    assert row(df, "Parameter Initialization")["n_excluded"] == 3
    assert row(df, "Parameter Initialization [Flip]")["n_excluded"] == 2


def test_report_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    for s in (1, 2):
        write_run(tmp_path, "init", s)
    (tmp_path / "report").write_text("not a folder")
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "report exists and is not a folder" in err and "Traceback" not in err
