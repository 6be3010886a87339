"""What version 0.1.0 left on disk still works, through the sweep layer and the cluster code of now:
its queued job pickles load as today's classes and run, its sweep.json files (a plain SLURM sweep
and a study grown in waves) load, compare and grow. Also the launcher field registry against the
schema, the presets and docs/slurm.md, and the one thread rule in ``experiments.plan``."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nondet_hpc import experiments, rundir
from nondet_hpc.cluster import fields, jobs, pack, params as launcher_settings, submit
from nondet_hpc.config import conf_dir
from nondet_hpc.registry.options import register_configs
from nondet_hpc.sweep import identity, manifest, waves
from helpers import cli_env, run_cli
from slurm_fixtures import FakeSlurm

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy_0_1_0"
#: where 0.1.0 wrote the fixtures' sweeps (rewritten to a temporary folder before use)
WRITTEN_IN = {"plain": "/work/baseline/slurm1", "waves": "/work/baseline/slurm3"}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeSlurm(tmp_path / "fake")
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    return f


def legacy_sweep(kind: str, tmp_path: Path) -> Path:
    """A copy of a 0.1.0 sweep.json in ``tmp_path/kind``, its absolute paths pointing there."""
    sweep = tmp_path / kind
    sweep.mkdir()
    text = (LEGACY / "sweeps" / kind / "sweep.json").read_text()
    (sweep / "sweep.json").write_text(text.replace(WRITTEN_IN[kind], str(sweep)))
    return sweep


def compose_job(*overrides: str, launcher: str = "slurm"):
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"hydra/launcher={launcher}", *overrides], return_hydra_config=True)


def launcher_params(sweep: Path, **kw) -> dict:
    cfg = compose_job(f"out_dir={sweep}")
    params = launcher_settings.normalize(OmegaConf.to_container(cfg.hydra.launcher, resolve=True), sweep)
    return {**params, **kw}


def plan_like_the_launcher(sweep: Path, *overrides: str) -> identity.PlannedRun:
    cfg = compose_job(*overrides, f"out_dir={sweep}")
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return identity.plan_run(job, list(overrides) + [f"out_dir={sweep}"])


# ============================================================================ queued job pickles
def load_job(name: str):
    with open(LEGACY / "jobs" / f"{name}.pkl", "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("name,cls,attrs", [
    ("runjob", jobs.RunJob, {"cfg", "run_id", "run_dir", "max_requeue"}),
    ("packjob", pack.PackJob, {"jobs", "mps", "max_requeue"}),
    ("reducejob", jobs.ReduceJob, {"sweep_dir"}),
])
def test_legacy_job_pickles_load_as_the_current_classes(name, cls, attrs):
    fn = load_job(name).function
    assert type(fn) is cls and set(vars(fn)) == attrs
    for job in getattr(fn, "jobs", []):
        assert type(job) is jobs.RunJob and set(vars(job)) == {"cfg", "run_id", "run_dir", "max_requeue"}
    # the names the pickles of 0.1.0 carry are today's classes (and the older nondet_hpc.slurm path)
    assert pickle.loads(b"cnondet_hpc.cluster.jobs\nRunJob\n.") is jobs.RunJob
    assert pickle.loads(b"cnondet_hpc.cluster.jobs\nReduceJob\n.") is jobs.ReduceJob
    assert pickle.loads(b"cnondet_hpc.cluster.pack\nPackJob\n.") is pack.PackJob


RUN_LEGACY_JOB = textwrap.dedent("""
    import pickle, sys

    if __name__ == "__main__":  # PackJob starts its runs as spawned processes, which import this file
        kind, out = sys.argv[1], sys.argv[2]
        with open(sys.argv[3], "rb") as f:
            ds = pickle.load(f)
        fn = ds.function
        for job in getattr(fn, "jobs", [fn] if kind == "runjob" else []):
            job.cfg["out_dir"] = out  # the job's sweep folder, moved here
            job.run_dir = out + "/runs/" + job.run_id
        if kind == "reducejob":
            fn.sweep_dir = out
        print("RESULT", ds.result())
""")


@pytest.mark.parametrize("name", ["runjob", "packjob", "reducejob"])
def test_legacy_job_pickles_run(name, tmp_path):
    """The job side of submitit calls ``DelayedSubmission.result()``: a 0.1.0 pickle trains its run(s)
    under today's code into the run folder its id names, or reduces its sweep (and takes its wave step)."""
    sweep = tmp_path / "sweep"
    if name == "reducejob":
        shutil.copytree(LEGACY / "runs", sweep / rundir.RUNS)
    script = tmp_path / "job.py"
    script.write_text(RUN_LEGACY_JOB)
    p = subprocess.run([sys.executable, str(script), name, str(sweep), str(LEGACY / "jobs" / f"{name}.pkl")],
                       capture_output=True, text=True, timeout=600, env=cli_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    if name == "reducejob":
        assert (sweep / "report" / "metrics.csv").is_file()
        return
    fn = load_job(name).function
    for job in getattr(fn, "jobs", [fn]):
        assert rundir.is_done(sweep / rundir.RUNS / job.run_id), p.stdout[-3000:]
        run_json = json.loads((sweep / rundir.RUNS / job.run_id / rundir.RUN_JSON).read_text())
        assert run_json["run_id"] == job.run_id  # today's code names the run as 0.1.0 did


# ============================================================================ sweep.json of 0.1.0
def test_legacy_plain_sweep_loads_compares_and_takes_a_rerun(fake, tmp_path):
    sweep = legacy_sweep("plain", tmp_path)
    recorded = manifest.load_manifest(sweep)
    ids = list(recorded["runs"])
    assert [manifest.latest_job(recorded["runs"][r])["job_id"] for r in ids] == ["1_0", "1_1"]
    assert manifest.submission_folders(recorded) == {0: str(sweep / "slurm")}
    # today's plan of the same command: the same run ids and config hashes, so it is compatible
    planned = [plan_like_the_launcher(sweep, "source=init", f"seed={s}", "train.epochs=1") for s in (1, 2)]
    assert [r.run_id for r in planned] == ids
    assert [r.config_hash for r in planned] == [recorded["runs"][r]["config_hash"] for r in ids]
    params = launcher_params(sweep)
    identity.check_compatible(recorded, planned, params["run_keys"], params["ignore_keys"])
    other = plan_like_the_launcher(sweep, "source=init", "seed=3", "train.epochs=1", "train.lr=0.1")
    with pytest.raises(identity.SweepConfigMismatch, match=r"train.lr: 0.4 \(recorded\) != 0.1 \(now\)"):
        identity.check_compatible(recorded, [other], params["run_keys"], params["ignore_keys"])
    # a rerun: nothing is queued or done, so both runs are submitted again, appended to the old record
    res = submit.submit_sweep(sweep, planned, params, argv=["rerun"], echo=lambda s: None)
    assert res.submitted == ids and res.submission == 1
    now = manifest.load_manifest(sweep)
    assert len(now["submissions"]) == 2 and now["submissions"][0] == recorded["submissions"][0]
    assert [len(now["runs"][r]["jobs"]) for r in ids] == [2, 2]


def test_legacy_waves_sweep_loads_and_decides_its_next_wave(tmp_path):
    sweep = legacy_sweep("waves", tmp_path)
    study = waves.load_study(sweep)
    assert study["status"] == "running" and study["rule"] == {"targets": {"acc_sd_se": 0.5}, "wave": 2,
                                                               "max_models": None}
    assert waves.describe(study)[0] == ("study: running after 1 wave(s); stop rule: acc_sd_se <= 0.5, wave 2, "
                                        "max all seeds swept per group")
    assert waves.report_section(sweep)[0] == "## Study grown in waves"
    # the recorded config makes today's run ids of the recorded seeds
    group = study["groups"]["(all)"]
    again = waves.plan_next(study, {"(all)": [1, 2]})["(all)"]
    assert [r.run_id for r in again] == [group["run_ids"]["1"], group["run_ids"]["2"]]
    # its wave over (DONE), a precision above the target: wave 2 is recorded, seeds 3-4
    for rid in group["run_ids"].values():
        (sweep / rundir.RUNS / rid).mkdir(parents=True)
        (sweep / rundir.RUNS / rid / rundir.DONE).write_text("")
    with manifest.sweep_lock(sweep):
        m = manifest.load_manifest(sweep)
        rc, nxt, planned = waves.decide_wave(sweep, m, "test", lambda s: None,
                                             lambda d, st: {"(all)": {"acc_sd_se": 0.9}})
    assert (rc, nxt) == (0, {"(all)": [3, 4]}) and len(planned) == 2
    st = waves.load_study(sweep)
    assert st["waves"][0]["decided"] and st["waves"][1]["groups"] == {"(all)": [3, 4]}
    assert st["groups"]["(all)"]["run_ids"]["3"] == planned[0].run_id


# ============================================================================ the launcher field registry
def test_the_schema_is_the_field_registry():
    cfg = compose_job("out_dir=/sweep")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert list(launcher) == ["_target_", *(f.name for f in fields.FIELDS), "reducer", "barriers"]
    assert launcher["_target_"] == fields.SLURM_LAUNCHER
    assert list(launcher["reducer"]) == [f.name for f in fields.REDUCER_FIELDS]
    assert list(launcher["barriers"]) == [f.name for f in fields.BARRIER_FIELDS]
    assert all(launcher["barriers"][f.name] == f.default for f in fields.BARRIER_FIELDS)
    # the generic preset changes only the setup lines; everything else is the declared default
    changed = {f.name for f in fields.FIELDS if launcher[f.name] != f.default}
    assert changed == {"setup"}
    assert all(launcher["reducer"][f.name] == f.default for f in fields.REDUCER_FIELDS)


def test_docs_document_every_launcher_field():
    text = (REPO / "docs" / "slurm.md").read_text()
    table = text[text.index("## Presets and fields"):text.index("### Coming from hydra-submitit-launcher")]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            documented |= set(re.findall(r"`([\w.]+)`", first))
    missing = [f.name for f in fields.FIELDS if f.name not in documented]
    missing += [f"reducer.{f.name}" for f in fields.REDUCER_FIELDS if f"reducer.{f.name}" not in documented]
    missing += [f"barriers.{f.name}" for f in fields.BARRIER_FIELDS if f"barriers.{f.name}" not in documented]
    assert missing == [], f"docs/slurm.md's field table does not name {missing}"


# ============================================================================ one thread rule
def test_plan_names_runs_as_the_slurm_launcher_does(tmp_path):
    """``experiments.plan`` resolves train.threads=0 by the launcher named on its command line, as the
    sweep does: the run ids it plans are those a SLURM sweep writes to sweep.json, so DONE counts."""
    f = FakeSlurm(tmp_path / "fake")
    env = cli_env({"PATH": f"{f.bin}{os.pathsep}{os.environ['PATH']}"})
    sweep = tmp_path / "sw"
    overrides = ["source=none", "seed=1,2", "train.threads=0", "hydra/launcher=slurm",
                 "hydra.launcher.cpus_per_task=2", f"out_dir={sweep}"]
    run_cli(["-m", "nondet_hpc", "-m", "experiment=sources_quick", *overrides], env=env)
    submitted = sorted(json.loads((sweep / "sweep.json").read_text())["runs"])
    jobs_ = experiments.plan("sources_quick", overrides)
    assert sorted(j["run_id"] for j in jobs_) == submitted
    assert all(not j["done"] for j in jobs_)
    for rid in submitted:  # trained: plan counts them as DONE
        (sweep / rundir.RUNS / rid).mkdir(parents=True)
        (sweep / rundir.RUNS / rid / rundir.DONE).write_text("")
    assert all(j["done"] for j in experiments.plan("sources_quick", overrides))
    # another cpus_per_task is another thread count: other runs
    other = experiments.plan("sources_quick", [*overrides[:-2], "hydra.launcher.cpus_per_task=1", f"out_dir={sweep}"])
    assert not {j["run_id"] for j in other} & set(submitted)


def test_plan_with_the_local_launcher_uses_torchs_thread_count(tmp_path):
    import torch

    jobs_ = experiments.plan("sources_quick", ["source=none", "seed=1", "train.threads=0", f"out_dir={tmp_path}"])
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=sources_quick", "source=none", "seed=1",
                                           f"train.threads={torch.get_num_threads()}", f"out_dir={tmp_path}"])
    assert [j["run_id"] for j in jobs_] == [rundir.run_id(cfg)]
