"""The real command line: `python -m nondet_hpc [-m] ...` composing conf/ into a temporary folder."""

import json

import numpy as np
import pytest

from helpers import FAST, cli_env, run_cli


def cli(tmp_path, *args, check=True, out_dir=True):
    """``python -m nondet_hpc ARGS`` (fast training) in tmp_path, writing to tmp_path/sweep unless
    ``out_dir`` is False (the arguments name the folder)."""
    where = [f"out_dir={tmp_path / 'sweep'}"] if out_dir else []
    return run_cli(["-m", "nondet_hpc", *args, *FAST, *where], cwd=tmp_path, check=check)


def test_multirun_sweep_writes_the_contract_and_a_rerun_trains_nothing(tmp_path):
    r = cli(tmp_path, "-m", "source=none,init,bitflip", "seed=1,2")
    runs = sorted((tmp_path / "sweep" / "runs").iterdir())
    assert len(runs) == 6 and all((rd / "DONE").exists() for rd in runs)
    for rd in runs:
        assert np.load(rd / "logits" / "plain.npy", allow_pickle=False).shape == (120, 10)
        assert (rd / "config.yaml").exists() and (rd / "labels.npy").exists()
    recs = {json.load(open(rd / "run.json"))["run_id"]: json.load(open(rd / "run.json")) for rd in runs}
    assert {(v["source"]["name"], v["seed"]) for v in recs.values()} == \
        {(s, k) for s in ("none", "init", "bitflip") for k in (1, 2)}
    stamps = {rd.name: (rd / "DONE").stat().st_mtime_ns for rd in runs}
    r2 = cli(tmp_path, "-m", "source=none,init,bitflip", "seed=1,2")
    assert r2.stdout.count("skipped (DONE)") == 6, r2.stdout
    assert stamps == {rd.name: (rd / "DONE").stat().st_mtime_ns for rd in runs}
    assert r.stdout.count(": done") == 6


def test_single_run_and_the_failures_of_a_sweep(tmp_path):
    r = cli(tmp_path, "source=init", "seed=7")
    assert "init-s0007" in r.stdout and ": done ->" in r.stdout
    # one bad job in a sweep: the others still run, the sweep lists the failure and exits non-zero
    r = cli(tmp_path, "-m", "source=init", "seed=0,7", check=False)
    assert r.returncode != 0
    assert "seed=0 is invalid" in r.stdout + r.stderr
    assert "skipped (DONE)" in r.stdout  # seed 7 was done already


@pytest.mark.parametrize("args,message", [
    (["source=bogus"], "Could not find 'source/bogus'"),
    (["train.epoch=3"], "Key 'epoch' not in 'TrainConfig'"),
    (["model=resnet99"], "Available options in 'model'"),
])
def test_bad_config_fails_at_composition(tmp_path, args, message):
    r = cli(tmp_path, *args, check=False)
    assert r.returncode != 0 and message in r.stderr + r.stdout
    assert not (tmp_path / "sweep" / "runs").exists()


def test_help_lists_the_config_groups(tmp_path):
    r = run_cli(["-m", "nondet_hpc", "--help"], cwd=tmp_path)
    for group in ("data:", "model:", "source:", "cifar10", "resnet34", "bitflip", "shuffle+cudnn"):
        assert group in r.stdout


@pytest.mark.parametrize("full_error", [False, True])
def test_bad_input_of_a_single_run_is_one_message_and_exit_2(tmp_path, full_error):
    env = cli_env()
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    r = run_cli(["-m", "nondet_hpc", "seed=0", *FAST, f"out_dir={tmp_path / 'sweep'}"], env=env, cwd=tmp_path,
                check=False)
    if full_error:  # debugging: the traceback is there
        assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr
    else:
        assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
        assert r.stderr.startswith("nondet_hpc: error: seed=0 is invalid")
    assert not list((tmp_path / "sweep").glob("runs/*"))


def test_hydra_sweep_and_run_dir_set_the_sweep_folder(tmp_path):
    r = cli(tmp_path, "-m", "source=init", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'hs'}", check=False,
            out_dir=False)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "hs" / "runs").iterdir())) == 2 and (tmp_path / "hs" / "report" / "metrics.csv").exists()
    assert f"runs: {tmp_path / 'hs' / 'runs'}" in r.stdout
    r = cli(tmp_path, "source=init", "seed=3", f"hydra.run.dir={tmp_path / 'hr'}", check=False, out_dir=False)
    assert r.returncode == 0, r.stderr
    assert [p.name[:8] for p in (tmp_path / "hr" / "runs").iterdir()] == ["init-s00"]


def test_contradicting_sweep_folders_are_refused(tmp_path):
    r = cli(tmp_path, "-m", "seed=1", f"out_dir={tmp_path / 'a'}", f"hydra.sweep.dir={tmp_path / 'b'}", check=False,
            out_dir=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "name different folders" in r.stderr and "Give only out_dir=PATH" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("where,why", [("afile/sub", "exists and is not a folder"),
                                       ("/proc/nondet", "virtual file system")])
def test_a_bad_out_dir_is_refused_before_hydra_creates_folders(tmp_path, where, why):
    (tmp_path / "afile").write_text("")
    out = where if where.startswith("/") else str(tmp_path / where)
    for mode in (["-m"], []):
        r = cli(tmp_path, *mode, "seed=1", f"out_dir={out}", check=False, out_dir=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
        assert r.stderr.startswith(f"nondet_hpc: error: out_dir='{out}' is not writable") and why in r.stderr
        assert "out_dir=PATH" in r.stderr
