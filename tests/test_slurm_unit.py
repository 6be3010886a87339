"""SLURM launcher without a cluster: sbatch scripts of the presets (expectations written by hand),
squeue/sacct/scontrol parsing, the sweep.json manifest, chunking, reruns, refusals, status and
cancel against a fake SLURM client (tests/slurm_fixtures.py), and the in-job signal handling."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nondet_hpc.cluster import cancel, client, jobs, manifest, script, state, submit
from nondet_hpc.__main__ import conf_dir
from nondet_hpc.config import register_configs
from slurm_fixtures import FakeSlurm, cli_env, run_cli

PY = "/opt/venv/bin/python"  # a fixed interpreter path makes the scripts comparable


def launcher_params(preset: str, *overrides: str, out_dir: str = "/sweep") -> dict:
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}", f"out_dir={out_dir}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params["python"] = PY
    return params


def job_cfgs(out_dir: Path, sources=("init", "shuffle"), seeds=(1, 2, 3), *extra: str):
    register_configs()
    cfgs = []
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        for src in sources:
            for seed in seeds:
                cfgs.append(compose("config", overrides=[f"out_dir={out_dir}", f"source={src}", f"seed={seed}",
                                                         "train.epochs=2", *extra]))
    return cfgs


def plan(out_dir: Path, *extra: str, sources=("init", "shuffle"), seeds=(1, 2, 3)):
    return [manifest.plan_run(c, [f"source={c.source.name}", f"seed={c.seed}"])
            for c in job_cfgs(out_dir, sources, seeds, *extra)]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeSlurm(tmp_path)
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    return f


def params_for(sweep: Path, **kw) -> dict:
    p = launcher_params("slurm", out_dir=str(sweep))
    p.update(kw)
    return p


# ============================================================================ presets: sbatch scripts
def sbatch_flags(text: str) -> list[str]:
    """The #SBATCH lines of a script as command-line flags (what sbatch will apply)."""
    return [line[len("#SBATCH "):].strip() for line in text.splitlines() if line.startswith("#SBATCH ")]


EXPECTED_SLURM_ARRAY = f"""\
#!/bin/bash

# Parameters
#SBATCH --array=0-5%6
#SBATCH --cpus-per-task=1
#SBATCH --error=/sweep/slurm/%A_%a_0_log.err
#SBATCH --job-name=nondet
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/sweep/slurm/%A_%a_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=60

# setup
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /sweep/slurm/%A_%a_%t_log.out --error /sweep/slurm/%A_%a_%t_log.err {PY} -u -m submitit.core._submit /sweep/slurm
"""

EXPECTED_V100_ARRAY = f"""\
#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --array=0-99%16
#SBATCH --cpus-per-task=4
#SBATCH --error=/sweep/slurm/%A_%a_0_log.err
#SBATCH --gres=gpu:v100:1
#SBATCH --job-name=nondet-v100
#SBATCH --mem=32GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/sweep/slurm/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=60

# setup
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /sweep/slurm/%A_%a_%t_log.out --error /sweep/slurm/%A_%a_%t_log.err {PY} -u -m submitit.core._submit /sweep/slurm
"""

EXPECTED_V100_REDUCER = f"""\
#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --cpus-per-task=1
#SBATCH --dependency=afterany:700:701
#SBATCH --error=/sweep/slurm/%j_0_log.err
#SBATCH --job-name=nondet-v100-reduce
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/sweep/slurm/%j_0_log.out
#SBATCH --partition=cpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@60
#SBATCH --time=60

# setup
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /sweep/slurm/%j_%t_log.out --error /sweep/slurm/%j_%t_log.err {PY} -u -m submitit.core._submit /sweep/slurm
"""


def test_generic_preset_sbatch_script():
    p = launcher_params("slurm")
    assert p["submitit_folder"] == "/sweep/slurm"
    assert script.sbatch_script(p, Path(p["submitit_folder"]), array_size=6) == EXPECTED_SLURM_ARRAY
    # no GPU unless asked
    assert "gres" not in EXPECTED_SLURM_ARRAY and "gpus" not in EXPECTED_SLURM_ARRAY


def test_v100_preset_sbatch_scripts_and_command_lines():
    p = launcher_params("slurm_v100", "hydra.launcher.account=proj42", "hydra.launcher.qos=normal",
                        "hydra.launcher.array_parallelism=16", "hydra.launcher.reducer.partition=cpu")
    folder = Path(p["submitit_folder"])
    array = script.sbatch_script(p, folder, array_size=100, parallelism=p["array_parallelism"])
    assert array == EXPECTED_V100_ARRAY
    reducer = script.sbatch_script(p, folder, reducer=True, dependency="afterany:700:701")
    assert reducer == EXPECTED_V100_REDUCER
    # the same as sbatch command-line flags, written by hand
    assert sbatch_flags(array) == [
        "--account=proj42", "--array=0-99%16", "--cpus-per-task=4", "--error=/sweep/slurm/%A_%a_0_log.err",
        "--gres=gpu:v100:1", "--job-name=nondet-v100", "--mem=32GB", "--nodes=1", "--open-mode=append",
        "--output=/sweep/slurm/%A_%a_0_log.out", "--partition=gpu", "--qos=normal", "--requeue",
        "--signal=USR2@120", "--time=60"]
    assert sbatch_flags(reducer) == [
        "--account=proj42", "--cpus-per-task=1", "--dependency=afterany:700:701",
        "--error=/sweep/slurm/%j_0_log.err", "--job-name=nondet-v100-reduce", "--mem=16GB", "--nodes=1",
        "--open-mode=append", "--output=/sweep/slurm/%j_0_log.out", "--partition=cpu", "--qos=normal",
        "--signal=USR2@60", "--time=60"]


def test_preset_extras_hold_constraint_setup():
    p = launcher_params("slurm", "hydra.launcher.constraint=v100", "hydra.launcher.gpus_per_node=1",
                        "hydra.launcher.hold=true", "hydra.launcher.mem_gb=1.5",
                        "+hydra.launcher.additional_parameters.mail-type=FAIL",
                        "hydra.launcher.setup=[module load cuda/12.6,source /venv/bin/activate]")
    flags = sbatch_flags(script.sbatch_script(p, Path("/sweep/slurm"), array_size=2))
    for f in ["--constraint=v100", "--gpus-per-node=1", "--hold", "--mem=1536MB", "--mail-type=FAIL"]:
        assert f in flags
    text = script.sbatch_script(p, Path("/sweep/slurm"), array_size=2)
    assert "# setup\nmodule load cuda/12.6\nsource /venv/bin/activate\n" in text
    # without srun the batch shell gets the signal and execs python, so the run still receives it
    p["use_srun"] = False
    text = script.sbatch_script(p, Path("/sweep/slurm"), array_size=2)
    assert "#SBATCH --signal=B:USR2@120" in text and "srun" not in text
    assert f"\nexec {PY} -u -m submitit.core._submit /sweep/slurm\n" in text


def test_misspelt_launcher_field_fails():
    with pytest.raises(Exception, match="partiton"):
        launcher_params("slurm", "hydra.launcher.partiton=gpu")
    with pytest.raises(Exception, match="cpus"):
        launcher_params("slurm_v100", "hydra.launcher.reducer.cpus=2")


# ============================================================================ parsing
def test_parse_scontrol_config():
    text = "Configuration data as of 2026-01-01T00:00:00\nAccountingStorageType   = accounting_storage/slurmdbd\n" \
           "MaxArraySize            = 1001\nMaxJobCount             = 10000\nSchedulerParameters     = sched_interval=5\n"
    c = client.parse_scontrol_config(text)
    assert c["MaxArraySize"] == "1001" and c["SchedulerParameters"] == "sched_interval=5"


def test_parse_squeue():
    assert client.squeue_command("me") == [
        "squeue", "-h", "-r", "-O",
        "JobArrayID:|,JobID:|,ArrayJobID:|,State:|,Reason:|,RestartCnt:|,TimeUsed:|,NodeList:|,STDOUT:|", "-u", "me"]
    text = ("6_2|6|6|PENDING|Resources|0|0:00||/s/slurm/%A_%a_0_log.out|\n6_0|7|6|RUNNING|None|0|0:02|vm||\n"
            "6_1|8|6|PENDING|BeginTime|1|0:00||/s/slurm/%A_%a_0_log.out|\n12|12|N/A|PENDING|Dependency|0|0:00||\n")
    q = client.parse_squeue(text)
    assert q["6_2"].stdout == "/s/slurm/%A_%a_0_log.out" and q["6_2"].belongs_to("/s/slurm")
    assert not q["6_2"].belongs_to("/t/slurm") and q["6_0"].belongs_to("/t/slurm")
    assert q["6_0"].state == "RUNNING" and q["6_0"].raw_id == "7"
    assert q["6_1"].restarts == 1 and q["6_1"].reason == "BeginTime"
    assert q["12"].state == "PENDING" and q["12"].array_job_id == ""
    assert q["7"].job_id == "6_0"  # also keyed by the raw id


def test_parse_sacct_duplicates_and_ranges():
    text = ("6_0|7|REQUEUED|0:0|00:00:02|2026|2026|vm\n6_0|7|REQUEUED|0:0|00:00:02|2026|2026|vm\n"
            "6_0|7|COMPLETED|0:0|00:00:05|2026|2026|vm\n6_1|8|CANCELLED by 0|0:15|00:00:01|||vm\n"
            "6_[2-4%2]|6|PENDING|0:0|00:00:00|Unknown|Unknown|\n9|9|FAILED|1:0|00:00:01|||vm\n")
    a = client.parse_sacct(text)
    assert a["6_0"].state == "COMPLETED" and a["6_0"].restarts == 2
    assert a["6_1"].state == "CANCELLED" and a["6_1"].exit_code == "0:15"
    assert {k for k in a if k.startswith("6_")} >= {"6_2", "6_3", "6_4"}
    assert a["9"].state == "FAILED"
    assert client.sacct_command(["6_1", "6_0", "9"])[-1] == "6,9"


def test_heartbeat_progress():
    assert state.heartbeat_progress({"epoch": 3, "epochs": 10, "step": 33, "steps": 110}) == pytest.approx(0.3)
    assert state.heartbeat_progress({"epoch": 5, "epochs": 10}) == 0.5
    assert state.heartbeat_progress({}) is None


# ============================================================================ submission (fake SLURM)
def test_submit_writes_manifest_and_reducer(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep)
    res = submit.submit_sweep(sweep, runs, params_for(sweep), argv=["x"])
    assert len(res.submitted) == 6 and len(res.arrays) == 1
    m = json.loads((sweep / "sweep.json").read_text())
    sub = m["submissions"][0]
    assert sub["status"] == "submitted" and sub["runs"] == [r.run_id for r in runs]
    arr = sub["arrays"][0]
    assert (arr["offset"], arr["size"]) == (0, 6)
    for i, r in enumerate(runs):
        rec = m["runs"][r.run_id]
        assert rec["run_dir"] == str(r.run_dir) and rec["overrides"] == r.overrides
        assert rec["jobs"] == [{"submission": 0, "job_id": f"{arr['job_id']}_{i}", "array_job_id": arr["job_id"],
                                "index": i}]
        # the pickled job of task i is the run at offset + i
        with open(sweep / "slurm" / f"{arr['job_id']}_{i}_submitted.pkl", "rb") as f:
            assert pickle.load(f).function.run_id == r.run_id
    red = fake.state["jobs"][-1]
    assert red["dependency"] == f"afterany:{arr['job_id']}" and sub["reducer"]["job_id"] == red["id"]
    assert not list((sweep / "slurm").glob(".tmp_*"))


def test_chunking_to_max_array_size(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(max_array_size=2)  # read from `scontrol show config`
    runs = plan(sweep, seeds=(1, 2), sources=("init", "shuffle", "augment"))[:5]
    res = submit.submit_sweep(sweep, runs, params_for(sweep), argv=["x"])
    assert [(a["offset"], a["size"]) for a in res.arrays] == [(0, 2), (2, 2), (4, 1)]
    sub = json.loads((sweep / "sweep.json").read_text())["submissions"][0]
    for a in sub["arrays"]:
        for i in range(a["size"]):
            with open(sweep / "slurm" / f"{a['job_id']}_{i}_submitted.pkl", "rb") as f:
                assert pickle.load(f).function.run_id == sub["runs"][a["offset"] + i]
    queued = fake.state["jobs"]
    assert [j["array"] for j in queued[:3]] == [2, 2, 1] and all(j["dependency"] is None for j in queued[:3])
    assert queued[3]["dependency"] == "afterany:" + ":".join(a["job_id"] for a in res.arrays)
    # override beats scontrol; a parallelism limit below the sweep size chains the chunks
    sweep2 = tmp_path / "sw2"
    res = submit.submit_sweep(sweep2, plan(sweep2), params_for(sweep2, max_array_size=4, array_parallelism=3))
    queued = fake.state["jobs"][-3:]
    assert [(j["array"], j["parallelism"]) for j in queued[:2]] == [(4, 3), (2, 2)]
    assert queued[1]["dependency"] == f"afterany:{res.arrays[0]['job_id']}"


def test_rerun_submits_only_missing_and_keeps_history(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep)
    first = submit.submit_sweep(sweep, runs, params_for(sweep))
    a = first.arrays[0]["job_id"]
    # run 0 runs, run 1 was cancelled, run 2 is done (DONE decides, whatever SLURM says),
    # run 3 finished COMPLETED without DONE (= failed), 4 and 5 still pending
    fake.set_task(f"{a}_0", "RUNNING")
    fake.set_task(f"{a}_1", "CANCELLED by 0", queue=False, exit="0:15")
    fake.set_task(f"{a}_2", "FAILED", queue=False, exit="1:0")
    runs[2].run_dir.mkdir(parents=True)
    (runs[2].run_dir / "DONE").write_text("{}")
    fake.set_task(f"{a}_3", "COMPLETED", queue=False)
    again = submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    assert sorted(again.submitted) == sorted([runs[1].run_id, runs[3].run_id])
    assert again.done == [runs[2].run_id] and len(again.active) == 3
    m = json.loads((sweep / "sweep.json").read_text())
    assert len(m["submissions"]) == 2 and m["submissions"][0]["arrays"] == first.arrays
    assert [j["submission"] for j in m["runs"][runs[1].run_id]["jobs"]] == [0, 1]
    # the new reducer waits for the new array and the still-queued old one; the old pending
    # reducer is superseded
    b = again.arrays[0]["job_id"]
    assert again.reducer["dependency"] == f"afterany:{b}:{a}"
    assert ["scancel", first.reducer["job_id"]] in [["scancel", *c] for c in fake.calls("scancel")]
    # a third identical command while everything is queued submits nothing
    n_jobs = len(fake.state["jobs"])
    third = submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    assert third.submitted == [] and third.arrays == [] and len(fake.state["jobs"]) == n_jobs
    assert len(json.loads((sweep / "sweep.json").read_text())["submissions"]) == 2


def test_reusing_folder_with_other_config_is_refused(fake, tmp_path):
    sweep = tmp_path / "sw"
    submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    # another base configuration (different lr): refused, nothing submitted
    n = len(fake.state["jobs"])
    with pytest.raises(manifest.SweepConfigMismatch, match=r"train.lr: 0.4 \(recorded\) != 0.1 \(now\)"):
        submit.submit_sweep(sweep, plan(sweep, "train.lr=0.1", seeds=(7,)), params_for(sweep))
    with pytest.raises(manifest.SweepConfigMismatch, match="model.name"):
        submit.submit_sweep(sweep, plan(sweep, "model=resnet18", seeds=(7,)), params_for(sweep))
    assert len(fake.state["jobs"]) == n
    # a recorded run id must come with its recorded configuration
    m = json.loads((sweep / "sweep.json").read_text())
    rid = next(iter(m["runs"]))
    m["runs"][rid]["config_hash"] = "0" * 16
    (sweep / "sweep.json").write_text(json.dumps(m))
    with pytest.raises(manifest.SweepConfigMismatch, match=f"already has run {rid}"):
        submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    m["runs"][rid]["config_hash"] = plan(sweep)[0].config_hash
    (sweep / "sweep.json").write_text(json.dumps(m))
    # new seeds, another source, or more epochs: the keys a study varies; allowed
    res = submit.submit_sweep(sweep, plan(sweep, seeds=(4,), sources=("augment",)), params_for(sweep))
    assert len(res.submitted) == 1
    # what does not decide a run's result (evaluation views, checkpoint interval) may change
    res = submit.submit_sweep(sweep, plan(sweep, "train.checkpoint_every=5", "eval.views=[plain,flip]",
                                         seeds=(5,)), params_for(sweep))
    assert len(res.submitted) == 2


def test_sbatch_rejection_shows_slurm_message_and_command(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"fail": "sbatch: error: invalid partition specified: nope\n"
                                           "sbatch: error: Batch job submission failed: Invalid partition name specified"}})
    with pytest.raises(client.SubmissionError) as e:
        submit.submit_sweep(sweep, plan(sweep), params_for(sweep, partition="nope"))
    msg = str(e.value)
    assert "invalid partition specified: nope" in msg and "Invalid partition name" in msg
    assert f"command: sbatch --parsable {sweep / 'slurm' / 'sub000_array00.sh'}" in msg
    m = json.loads((sweep / "sweep.json").read_text())
    assert m["submissions"][0]["status"] == "failed" and "nope" in m["submissions"][0]["error"]
    assert not list((sweep / "slurm").glob("*.pkl"))


def test_reducer_partition_checked_before_arrays(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"fail": "sbatch: error: invalid partition specified: cpux"}})
    p = params_for(sweep)
    p["reducer"]["partition"] = "cpux"
    with pytest.raises(client.SubmissionError, match="(?s)reducer job.*cpux"):
        submit.submit_sweep(sweep, plan(sweep), p)
    assert fake.calls("sbatch")[0][0] == "--test-only" and len(fake.calls("sbatch")) == 1


def test_no_sbatch_points_to_local_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(client.SlurmUnavailable, match="hydra/launcher=local"):
        submit.submit_sweep(tmp_path / "sw", [], {})


def test_submit_limit(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(max_submit=4)  # MaxSubmitJobs from sacctmgr; the reducer takes one slot
    res = submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    assert len(res.submitted) == 3 and len(res.over_limit) == 3
    assert "NOT submitted: 3 runs over your submit limit" in submit.describe_submission(res, params_for(sweep))
    with pytest.raises(client.SubmissionError, match="submit limit is 4 jobs"):
        submit.submit_sweep(tmp_path / "other", plan(tmp_path / "other"), params_for(tmp_path / "other"))
    # explicit override: 0 = no limit
    res = submit.submit_sweep(tmp_path / "o2", plan(tmp_path / "o2"), params_for(tmp_path / "o2", max_submit=0))
    assert len(res.submitted) == 6


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    data = manifest.new_manifest(tmp_path)
    data["runs"]["x"] = {"jobs": []}
    manifest.write_manifest(tmp_path, data)
    assert manifest.load_manifest(tmp_path)["runs"] == {"x": {"jobs": []}}
    # the new content reaches sweep.json only by a rename of a complete temp file in the same
    # folder: a writer killed mid-write leaves the old manifest (a plain write would truncate it)
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src), Path(dst), json.loads(Path(src).read_text())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    data["runs"]["y"] = {"jobs": []}
    manifest.write_manifest(tmp_path, data)
    assert len(renames) == 1
    src, dst, content = renames[0]
    assert dst == tmp_path / "sweep.json" and src.parent == tmp_path and src != dst
    assert content == json.loads(dst.read_text()) and set(content["runs"]) == {"x", "y"}
    # a write that dies half-way leaves the previous manifest whole, and no temp file behind
    def dies(f):
        f.write(b'{"runs": {"half')
        raise KeyboardInterrupt

    from nondet_hpc import rundir
    with pytest.raises(KeyboardInterrupt):
        rundir.atomic_write(tmp_path / "sweep.json", dies)
    assert set(manifest.load_manifest(tmp_path)["runs"]) == {"x", "y"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".sweep.json")] == []


def test_sweep_lock_excludes_a_second_submission(tmp_path):
    with manifest.sweep_lock(tmp_path):
        assert (tmp_path / manifest.LOCK).exists()
        with pytest.raises(client.SlurmError, match=r"\.sweep\.lock is locked by another submission"):
            with manifest.sweep_lock(tmp_path, timeout=0):
                pass
    with manifest.sweep_lock(tmp_path, timeout=0):  # released on exit
        pass


# ============================================================================ status / cancel
def _write_run_json(run_dir: Path, **data):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(data))


def test_status_states(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep)
    res = submit.submit_sweep(sweep, runs, params_for(sweep))
    a = res.arrays[0]["job_id"]
    fake.set_task(f"{a}_0", "RUNNING")
    _write_run_json(runs[0].run_dir, state="running",
                    heartbeat={"epoch": 4, "epochs": 10, "step": 40, "steps": 100, "time": time.time(), "elapsed_s": 8.0})
    fake.set_task(f"{a}_1", "CANCELLED by 0", queue=False, exit="0:15")
    (sweep / "slurm" / f"{a}_1_0_log.err").write_text("line1\nslurmstepd: error: *** JOB CANCELLED ***\n")
    fake.set_task(f"{a}_2", "FAILED", queue=False, exit="1:0")
    runs[2].run_dir.mkdir(parents=True)
    (runs[2].run_dir / "DONE").write_text("{}")
    fake.set_task(f"{a}_3", "COMPLETED", queue=False)
    fake.set_task(f"{a}_4", "PENDING", reason="BeginTime", restarts=1)
    fake.set_task(f"{a}_5", "X", queue=False)
    st = fake.state
    st["acct"].pop(f"{a}_5")
    fake.update(acct=st["acct"])
    s = state.sweep_status(sweep)
    by = {r["run_id"]: r for r in s["runs"]}
    r0 = by[runs[0].run_id]
    assert r0["state"] == "running" and r0["epoch"] == 4 and r0["progress"] == pytest.approx(0.4)
    assert r0["eta_s"] == pytest.approx(12.0, abs=1.0)
    r1 = by[runs[1].run_id]
    assert r1["state"] == "failed" and r1["slurm_state"] == "CANCELLED" and r1["exit_code"] == "0:15"
    assert r1["log_err"].endswith(f"{a}_1_0_log.err") and "*** JOB CANCELLED ***" in r1["log_tail"][-1]
    assert by[runs[2].run_id]["state"] == "done"
    assert by[runs[3].run_id]["state"] == "failed" and "no DONE" in by[runs[3].run_id]["note"]
    assert by[runs[4].run_id]["state"] == "requeued" and by[runs[4].run_id]["restarts"] == 1
    assert by[runs[5].run_id]["state"] == "failed" and by[runs[5].run_id]["slurm_state"] == "GONE"
    assert s["counts"] == {"pending": 0, "running": 1, "requeued": 1, "done": 1, "failed": 3,
                           "unsubmitted": 0, "unknown": 0}
    assert s["reducer"]["state"] == "PENDING" and s["accounting"] == "sacct"
    # the human table and --json
    from nondet_hpc.cluster import status
    text = status.format_status(s)
    assert "epoch 4/10 40%" in text and "CANCELLED exit 0:15" in text and "*** JOB CANCELLED ***" in text
    p = run_cli(["-m", "nondet_hpc.status", str(sweep), "--json"], env=cli_env({"PATH": os.environ["PATH"]}))
    assert json.loads(p.stdout)["counts"]["failed"] == 3
    # a queued job whose output goes into this sweep's folder is ours
    st = fake.state
    st["queue"][f"{a}_4"]["stdout"] = str(sweep / "slurm" / "%A_%a_0_log.out")
    fake.update(queue=st["queue"])
    assert state.sweep_status(sweep)["counts"]["requeued"] == 1


def test_status_without_accounting_and_with_hanging_sacct(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep, seeds=(1,))
    res = submit.submit_sweep(sweep, runs, params_for(sweep))
    a = res.arrays[0]["job_id"]
    fake.set_task(f"{a}_0", "RUNNING")
    fake.set_task(f"{a}_1", "X", queue=False)
    fake.update(behave={"sacct": {"fail": "sacct: error: Slurm accounting storage is disabled"}}, acct={})
    s = state.sweep_status(sweep)
    assert s["accounting"] == "squeue+run folder" and "sacct" in s["errors"]
    assert [r["state"] for r in s["runs"]] == ["running", "failed"]
    # a hanging sacct is given up after the timeout
    fake.update(behave={"sacct": {"sleep": 30}})
    t = time.monotonic()
    s = state.sweep_status(sweep, timeout=1.5)
    assert time.monotonic() - t < 10 and "within 1.5 s" in s["errors"]["sacct"]
    assert [r["state"] for r in s["runs"]] == ["running", "failed"]


def test_cancel_only_this_sweeps_jobs(fake, tmp_path):
    sweep = tmp_path / "sw"
    res = submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    st = fake.state
    st["queue"]["999"] = {"state": "RUNNING", "reason": "None", "raw": "999", "restarts": 0}  # someone else's
    fake.update(queue=st["queue"])
    assert cancel.cancel_sweep(sweep, dry_run=True) == res.job_ids()
    assert fake.calls("scancel") == []
    ids = cancel.cancel_sweep(sweep)
    assert ids == res.job_ids() and fake.calls("scancel") == [res.job_ids()]
    assert "999" in fake.state["queue"]
    assert cancel.cancel_sweep(sweep) == []  # nothing left
    m = json.loads((sweep / "sweep.json").read_text())
    assert m["cancellations"][0]["job_ids"] == ids
    # after a cluster reset SLURM may hand our old ids to other jobs: those write elsewhere, and
    # neither cancel nor status nor a rerun take them for ours
    st = fake.state
    st["queue"][res.reducer["job_id"]] = {"state": "PENDING", "reason": "None", "raw": res.reducer["job_id"],
                                          "restarts": 0, "stdout": "/elsewhere/slurm-%j.out"}
    fake.update(queue=st["queue"])
    assert cancel.cancel_sweep(sweep) == []
    assert state.sweep_status(sweep)["reducer"]["state"] != "PENDING"


# ============================================================================ the Hydra launcher (CLI)
def test_cli_submits_and_returns_with_fake_slurm(tmp_path):
    f = FakeSlurm(tmp_path)
    env = cli_env({"PATH": f"{f.bin}{os.pathsep}{os.environ['PATH']}"})
    sweep = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "source=init,shuffle", "seed=1,2", f"out_dir={sweep}", "train.epochs=2",
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    p = run_cli(args, env=env)
    assert "4 submitted now" in p.stdout and "array job 100: 4 tasks" in p.stdout
    assert f"python -m nondet_hpc.status {sweep}" in p.stdout and "reducer job 101" in p.stdout
    m = json.loads((sweep / "sweep.json").read_text())
    assert len(m["runs"]) == 4 and m["submissions"][0]["launcher"]["partition"] == "gpu"
    # everything queued: the same command submits nothing
    p = run_cli(args, env=env)
    assert "0 submitted now" in p.stdout and "4 queued/running" in p.stdout
    assert len(f.state["jobs"]) == 2
    # another configuration in the same folder: a clean refusal, exit code 1, no traceback
    p = run_cli(args + ["train.lr=0.2"], env=env, check=False)
    assert p.returncode == 1 and "holds runs of another configuration" in p.stderr
    assert "Traceback" not in p.stderr
    # the fast composition gives exactly Hydra's configs
    fast = _pickled_cfgs(sweep / "slurm")
    sweep2 = tmp_path / "sw2"
    run_cli([a.replace(str(sweep), str(sweep2)) for a in args] + ["hydra.launcher.fast_compose=false"], env=env)
    slow = _pickled_cfgs(sweep2 / "slurm")
    assert len(fast) == 4 and [OmegaConf.to_container(c) | {"out_dir": 0} for c in fast] == \
        [OmegaConf.to_container(c) | {"out_dir": 0} for c in slow]


def _pickled_cfgs(folder: Path):
    out = []
    for pk in sorted(folder.glob("*_submitted.pkl"), key=lambda p: [int(x) for x in p.name.split("_")[:2] if x.isdigit()]):
        with open(pk, "rb") as fh:
            fn = pickle.load(fh).function
        if isinstance(fn, jobs.RunJob):
            out.append(fn.cfg)
    return out


def test_cli_without_sbatch(tmp_path):
    env = cli_env()
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    env["PATH"] = str(empty)  # no SLURM client (the interpreter is called by its absolute path)
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={tmp_path / 'sw'}", "hydra/launcher=slurm"],
                env=env, check=False)
    assert p.returncode == 1 and "`sbatch` is not on PATH" in p.stderr and "hydra/launcher=local" in p.stderr
    assert "Traceback" not in p.stderr


# ============================================================================ in-job signal handling
JOB_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    from nondet_hpc.cluster import cancel, client, jobs, manifest, script, state, submit
    from nondet_hpc.run import task, train

    def fake_run(cfg):
        if {early}:
            time.sleep(0.5)
            train.clear_stop()  # as task.run does before training: an early signal must survive it
        while True:  # a training loop: stop at an iteration boundary
            time.sleep(0.01)
            if train._STOP.is_set():
                raise train.Preempted("checkpoint saved")

    task.run = fake_run
    threading.Timer(0.2, os.kill, (os.getpid(), signal.{sig})).start()
    jobs.RunJob({{}}, "r1", "/nowhere", max_requeue={max_requeue})()
""")


@pytest.mark.parametrize("sig,early,max_requeue,requeued", [
    ("SIGUSR2", False, 5, True),     # time limit near: checkpoint, requeue
    ("SIGUSR2", True, 5, True),      # signal before the loop started
    ("SIGTERM", False, 5, False),    # scancel / preemption: checkpoint, no self-requeue
    ("SIGUSR2", False, 0, False),    # requeue budget spent
])
def test_run_job_signals(tmp_path, sig, early, max_requeue, requeued):
    f = FakeSlurm(tmp_path)
    job_py = tmp_path / "job.py"
    job_py.write_text(JOB_SCRIPT.format(sig=sig, early=early, max_requeue=max_requeue))
    env = cli_env({"PATH": f"{f.bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "555",
                   "SLURM_RESTART_COUNT": "0"})
    p = subprocess.run([sys.executable, str(job_py)], capture_output=True, text=True, timeout=60, env=env)
    calls = f.calls("scontrol")
    if requeued:
        assert p.returncode == 0, p.stderr
        assert calls == [["requeue", "555"]] and "requeued" in p.stdout
    else:
        assert p.returncode != 0 and "Preempted" in p.stderr
        assert calls == []


# ============================================================================ layout contracts
def test_job_pickles_of_the_old_import_path_still_load():
    # a job pickled before the cluster code moved names nondet_hpc.slurm.RunJob / ReduceJob
    assert pickle.loads(b"cnondet_hpc.slurm\nRunJob\n.") is jobs.RunJob
    assert pickle.loads(b"cnondet_hpc.slurm\nReduceJob\n.") is jobs.ReduceJob


def test_no_private_hydra_or_submitit_imports_outside_compose():
    """Private names of Hydra and submitit (``_internal``, a leading underscore) are imported in
    nondet_hpc/compose.py only, so a release that renames them breaks one module with a fallback."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path == src / "nondet_hpc" / "compose.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] in ("hydra", "submitit") and any(p.startswith("_") for p in parts[1:]):
                    offenders.append(f"{path.relative_to(src)}:{node.lineno}: {name}")
    assert offenders == []
