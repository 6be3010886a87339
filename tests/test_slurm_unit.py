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
from omegaconf import OmegaConf

from helpers import cli_env, run_cli
from nondet_hpc.cluster import cancel, client, jobs, params as launcher_settings, script, state, submit
from nondet_hpc.config import ConfigError
from nondet_hpc.sweep import identity, manifest
from slurm_fixtures import PY, job_cfgs, launcher_params, params_for, plan, sbatch_flags

# ============================================================================ presets: sbatch scripts
EXPECTED_SLURM_ARRAY = f"""\
#!/bin/bash

# Parameters
#SBATCH --array=0-5%6
#SBATCH --cpus-per-task=1
#SBATCH --error=/sweep/slurm/%A_%a_0_log.err
#SBATCH --job-name=nondet-sweep
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
#SBATCH --job-name=nondet-sweep
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
#SBATCH --job-name=nondet-sweep-reduce
#SBATCH --mem=16GB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/sweep/slurm/%j_0_log.out
#SBATCH --partition=cpu
#SBATCH --qos=normal
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
        "--gres=gpu:v100:1", "--job-name=nondet-sweep", "--mem=32GB", "--nodes=1", "--open-mode=append",
        "--output=/sweep/slurm/%A_%a_0_log.out", "--partition=gpu", "--qos=normal", "--requeue",
        "--signal=USR2@120", "--time=60"]
    assert sbatch_flags(reducer) == [
        "--account=proj42", "--cpus-per-task=1", "--dependency=afterany:700:701",
        "--error=/sweep/slurm/%j_0_log.err", "--job-name=nondet-sweep-reduce", "--mem=16GB", "--nodes=1",
        "--open-mode=append", "--output=/sweep/slurm/%j_0_log.out", "--partition=cpu", "--qos=normal",
        "--time=60"]  # no --signal: the reducer has nothing to checkpoint


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
    with pytest.raises(identity.SweepConfigMismatch, match=r"train.lr: 0.4 \(recorded\) != 0.1 \(now\)"):
        submit.submit_sweep(sweep, plan(sweep, "train.lr=0.1", seeds=(7,)), params_for(sweep))
    with pytest.raises(identity.SweepConfigMismatch, match="model.name"):
        submit.submit_sweep(sweep, plan(sweep, "model=resnet18", seeds=(7,)), params_for(sweep))
    assert len(fake.state["jobs"]) == n
    # a recorded run id must come with its recorded configuration
    m = json.loads((sweep / "sweep.json").read_text())
    rid = next(iter(m["runs"]))
    m["runs"][rid]["config_hash"] = "0" * 16
    (sweep / "sweep.json").write_text(json.dumps(m))
    with pytest.raises(identity.SweepConfigMismatch, match=f"already has run {rid}"):
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

    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # safeio renames inside a folder's descriptor
        where = Path(os.readlink(f"/proc/self/fd/{dst_dir_fd}")) if dst_dir_fd is not None else Path()
        renames.append((where / src, where / dst, json.loads((where / src).read_text())))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

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
        with pytest.raises(manifest.SweepError, match=r"\.sweep\.lock is locked by another submission") as e:
            with manifest.sweep_lock(tmp_path, timeout=0):
                pass
        assert not isinstance(e.value, client.SlurmError)  # a local sweep's lock is not a SLURM matter
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
    # the heartbeat's time is ahead of the clock, so its age is 0 whenever status reads it and the
    # ETA does not depend on how long status takes (the age's share: test_eta_is_not_the_previous_attempts)
    _write_run_json(runs[0].run_dir, state="running",
                    heartbeat={"epoch": 4, "epochs": 10, "step": 40, "steps": 100, "time": time.time() + 86400,
                               "elapsed_s": 8.0})
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
    assert r0["eta_s"] == pytest.approx(12.0)  # 8 s for 40%: 12 s to go
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
    # a hanging sacct is given up after the timeout: had status waited for it, sacct would have
    # answered (after 30 s) and there would be no error
    fake.update(behave={"sacct": {"sleep": 30}})
    n_sacct = len(fake.calls("sacct"))
    s = state.sweep_status(sweep, timeout=1.5)
    assert "within 1.5 s" in s["errors"]["sacct"] and len(fake.calls("sacct")) > n_sacct
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
def test_cli_submits_and_returns_with_fake_slurm(tmp_path, fake):
    env = cli_env()
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
    assert len(fake.state["jobs"]) == 2
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
            out.append(jobs.as_config(fn.cfg))  # plain resolved data in the pickle
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
    import os, signal
    from nondet_hpc.cluster import jobs
    from nondet_hpc.run import task, train

    def fake_run(cfg):  # a training loop that checkpoints when asked to stop (no clock: events only)
        os.kill(os.getpid(), signal.{sig})  # the signal: before training starts, or while it runs
        train._STOP.wait()  # the job's handler asked the loop to stop
        if {early}:
            # task.run clears the stop flag before training starts: a signal that came earlier
            # must survive it (the job asks again until the run is over)
            train.clear_stop()
            train._STOP.wait()
        raise train.Preempted("checkpoint saved")

    task.run = fake_run
    jobs.RunJob({{}}, "r1", "/nowhere", max_requeue={max_requeue})()
""")


@pytest.mark.parametrize("sig,early,max_requeue,requeued", [
    ("SIGUSR2", False, 5, True),     # time limit near: checkpoint, requeue
    ("SIGUSR2", True, 5, True),      # signal before the loop started
    ("SIGTERM", False, 5, False),    # scancel / preemption: checkpoint, no self-requeue
    ("SIGUSR2", False, 0, False),    # requeue budget spent
])
def test_run_job_signals(tmp_path, fake, sig, early, max_requeue, requeued):
    job_py = tmp_path / "job.py"
    job_py.write_text(JOB_SCRIPT.format(sig=sig, early=early, max_requeue=max_requeue))
    p = run_cli([str(job_py)], env=cli_env({"SLURM_JOB_ID": "555", "SLURM_RESTART_COUNT": "0"}), check=False)
    calls = fake.calls("scontrol")
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


# ============================================================================ issue 9: identity, aliases, fast paths
def test_thread_count_is_part_of_the_run_id(tmp_path):
    """The same config with another effective thread count is another run; threads=0 is resolved
    to the count the run uses before its id is computed (locally: torch's default)."""
    import torch

    from nondet_hpc import rundir
    from nondet_hpc.run import task

    one, two, zero = (job_cfgs(tmp_path, ("init",), (1,), f"train.threads={n}")[0] for n in (1, 2, 0))
    assert rundir.run_id(one) != rundir.run_id(two) and rundir.group_key(one) != rundir.group_key(two)
    task.resolve_threads(zero)
    assert zero.train.threads == torch.get_num_threads() >= 1
    assert rundir.run_id(zero) == rundir.run_id(one if torch.get_num_threads() == 1 else
                                                 job_cfgs(tmp_path, ("init",), (1,),
                                                          f"train.threads={torch.get_num_threads()}")[0])
    explicit = job_cfgs(tmp_path, ("init",), (1,), "train.threads=3")[0]
    task.resolve_threads(explicit)
    assert explicit.train.threads == 3  # a count the user set is kept


def test_local_run_uses_the_resolved_thread_count_in_its_id(tmp_path):
    import torch

    from nondet_hpc import rundir
    from nondet_hpc.run import task

    cfg = job_cfgs(tmp_path, ("init",), (1,), "train.epochs=1", "data.train_subset=64", "data.test_subset=32",
                   "train.batch_size=32", "train.threads=0")[0]  # digits defaults to 1: ask for torch's own
    assert cfg.train.threads == 0
    out = task.run(cfg)
    want = job_cfgs(tmp_path, ("init",), (1,), "train.epochs=1", "data.train_subset=64", "data.test_subset=32",
                    "train.batch_size=32", f"train.threads={torch.get_num_threads()}")[0]
    assert out["state"] == "done" and out["run_id"] == rundir.run_id(want)
    info = json.loads((Path(out["run_dir"]) / "run.json").read_text())
    assert info["identity"]["train.threads"] == info["threads"] == torch.get_num_threads()


def test_slurm_launcher_gives_threads_the_tasks_cpus(tmp_path, fake):
    env = cli_env()
    ids = {}
    for cpus in (1, 2):
        sweep = tmp_path / f"sw{cpus}"
        run_cli(["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={sweep}", "train.epochs=2", "train.threads=0",
                 "hydra/launcher=slurm", f"hydra.launcher.cpus_per_task={cpus}"], env=env)
        cfgs = _pickled_cfgs(sweep / "slurm")
        assert [c.train.threads for c in cfgs] == [cpus, cpus]
        ids[cpus] = {Path(r["run_dir"]).name for r in json.loads((sweep / "sweep.json").read_text())["runs"].values()}
    assert not ids[1] & ids[2]  # same config, other thread count: other runs
    # a count the user set wins over cpus_per_task
    sweep = tmp_path / "sw3"
    run_cli(["-m", "nondet_hpc", "-m", "seed=1", f"out_dir={sweep}", "train.epochs=2", "train.threads=3",
             "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2"], env=env)
    assert [c.train.threads for c in _pickled_cfgs(sweep / "slurm")] == [3]


def _local_runs(out_dir: Path, runs: list) -> None:
    """Run folders as the local launcher leaves them: run.json with identity and seed, no sweep.json."""
    for r in runs:
        _write_run_json(r.run_dir, run_id=r.run_id, state="done", seed=r.flat["seed"],
                        identity={k: v for k, v in r.flat.items() if k != "seed"})


def test_identity_check_without_sweep_json_uses_run_json(fake, tmp_path):
    sweep = tmp_path / "local"
    _local_runs(sweep, plan(sweep, "train.threads=0", seeds=(1, 2)))  # as recorded before the thread identity
    assert not (sweep / "sweep.json").exists()
    with pytest.raises(identity.SweepConfigMismatch, match=r"train.lr: 0.4 \(recorded\) != 0.1 \(now\)") as e:
        submit.submit_sweep(sweep, plan(sweep, "train.lr=0.1", "train.threads=0", seeds=(3,)), params_for(sweep))
    assert "run.json; no sweep.json" in str(e.value)
    with pytest.raises(identity.SweepConfigMismatch, match=r"train.threads: 0 \(recorded\) != 1 \(now\)") as e:
        submit.submit_sweep(sweep, plan(sweep, "train.threads=1", seeds=(3,)), params_for(sweep))
    assert "train.threads=0 was not resolved" in str(e.value)  # runs of before the thread identity
    assert fake.calls("sbatch") == [] and not (sweep / "sweep.json").exists()
    # the same configuration, new seeds: allowed, as for a SLURM folder
    res = submit.submit_sweep(sweep, plan(sweep, "train.threads=0", seeds=(3,)), params_for(sweep))
    assert len(res.submitted) == 2


def test_identity_check_without_sweep_json_names_the_thread_count(fake, tmp_path):
    sweep = tmp_path / "local"
    _local_runs(sweep, plan(sweep, "train.threads=2", seeds=(1,)))
    with pytest.raises(identity.SweepConfigMismatch, match=r"pass train.threads=2"):
        submit.submit_sweep(sweep, plan(sweep, "train.threads=1", seeds=(3,)), params_for(sweep))


ALIASES = [  # (hydra-submitit-launcher's key=value, ours, the sbatch line both must render)
    ("name=exp1", "job_name=exp1", "--job-name=exp1"),
    ("comment=tuning", "additional_parameters.comment=tuning", "--comment=tuning"),
    ("cpus_per_gpu=8", "additional_parameters.cpus_per_gpu=8", "--cpus-per-gpu=8"),
    ("gpus_per_task=1", "additional_parameters.gpus_per_task=1", "--gpus-per-task=1"),
    ("mem_per_gpu=16G", "additional_parameters.mem_per_gpu=16G", "--mem-per-gpu=16G"),
    ("mem_per_cpu=4G", "additional_parameters.mem_per_cpu=4G", "--mem-per-cpu=4G"),
    ("nodes=1", "timeout_min=60", "--nodes=1"),
    ("tasks_per_node=1", "timeout_min=60", "--nodes=1"),
]


@pytest.mark.parametrize("theirs,ours,line", ALIASES, ids=[a[0].split("=")[0] for a in ALIASES])
def test_hydra_submitit_alias_renders_our_sbatch_line(theirs, ours, line):
    scripts = []
    for override in (theirs, ours):
        # additional_parameters is a dict: a new key needs Hydra's "+"
        prefix = "+" if override.startswith("additional_parameters.") else ""
        p = launcher_params("slurm", f"{prefix}hydra.launcher.{override}")
        scripts.append(script.sbatch_script(p, Path(p["submitit_folder"]), array_size=4, parallelism=4))
    assert scripts[0] == scripts[1]  # the whole script, not only the line
    assert line in sbatch_flags(scripts[0])


def test_max_num_timeout_is_max_requeue_and_conflicts_are_refused():
    assert launcher_params("slurm", "hydra.launcher.max_num_timeout=5")["max_requeue"] == 5
    assert launcher_params("slurm", "hydra.launcher.max_num_timeout=5") == \
        launcher_params("slurm", "hydra.launcher.max_requeue=5")
    bad = [("hydra.launcher.name=a", "hydra.launcher.job_name=b", "disagree"),
           ("hydra.launcher.max_num_timeout=3", "hydra.launcher.max_requeue=4", "disagree"),
           ("hydra.launcher.nodes=2", "hydra.launcher.timeout_min=60", "one process on one node"),
           ("hydra.launcher.tasks_per_node=4", "hydra.launcher.timeout_min=60", "one process on one node"),
           ("hydra.launcher.mem_gb=8", "hydra.launcher.mem_per_cpu=4G", "only one of --mem")]
    for a, b, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            launcher_params("slurm", a, b)
    with pytest.raises(Exception, match="max_num_timout"):
        launcher_params("slurm", "hydra.launcher.max_num_timout=3")  # misspelt: fails at composition


def test_stderr_to_stdout_writes_one_log_per_task():
    p = launcher_params("slurm", "hydra.launcher.stderr_to_stdout=true")
    text = script.sbatch_script(p, Path(p["submitit_folder"]), array_size=2, parallelism=2)
    assert "--error" not in text
    plain = launcher_params("slurm")
    want = script.sbatch_script(plain, Path(plain["submitit_folder"]), array_size=2, parallelism=2)
    assert [ln for ln in want.splitlines() if not ln.startswith("#SBATCH --error")] == \
        [ln.replace(" --output /sweep/slurm/%A_%a_%t_log.out", " --output /sweep/slurm/%A_%a_%t_log.out --error "
                    "/sweep/slurm/%A_%a_%t_log.err") for ln in text.splitlines()]


def test_job_name_defaults_to_the_sweep_folder():
    assert launcher_params("slurm", out_dir="/scratch/me/lr-sweep")["job_name"] == "nondet-lr-sweep"
    assert launcher_params("slurm_v100", out_dir="/scratch/me/tta")["job_name"] == "nondet-tta"
    assert launcher_params("slurm", "hydra.launcher.job_name=mine")["job_name"] == "mine"


def test_gpu_request_detection():
    assert not launcher_settings.requests_gpu(launcher_params("slurm"))
    assert not launcher_settings.requests_gpu(launcher_params("slurm", "hydra.launcher.gres=lustre:1"))
    for o in ("hydra.launcher.gres=gpu:1", "hydra.launcher.gpus_per_node=1", "hydra.launcher.gpus_per_task=1",
              "+hydra.launcher.additional_parameters.gpus=1"):
        assert launcher_settings.requests_gpu(launcher_params("slurm", o)), o
    assert launcher_settings.requests_gpu(launcher_params("slurm_v100"))
    with pytest.raises(ConfigError, match="requests no GPU"):
        launcher_settings.check_device("cuda:0", launcher_params("slurm"))
    launcher_settings.check_device("auto", launcher_params("slurm"))


def test_cuda_without_a_gpu_request_is_refused_at_submission(tmp_path, fake):
    env = cli_env()
    args = ["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={tmp_path / 'sw'}", "train.device=cuda",
            "hydra/launcher=slurm"]
    p = run_cli(args, env=env, check=False)
    assert p.returncode == 1 and "requests no GPU" in p.stderr and "hydra.launcher.gres=gpu:1" in p.stderr
    assert "Nothing was submitted" in p.stderr and "Traceback" not in p.stderr
    assert fake.calls("sbatch") == [] and not (tmp_path / "sw" / "sweep.json").exists()
    p = run_cli(args + ["hydra.launcher.gres=gpu:1"], env=env)  # with a GPU: submitted
    assert "2 submitted now" in p.stdout


def test_missing_sbatch_fails_before_composing(tmp_path):
    """The launcher's setup runs before Hydra's sweeper composes the jobs: a job that cannot be
    composed (seed=notanint) would fail first if composition came first."""
    env = cli_env()
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    env["PATH"] = str(empty)
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,notanint", f"out_dir={tmp_path / 'sw'}", "hydra/launcher=slurm"],
                env=env, check=False)
    assert p.returncode == 1 and "`sbatch` is not on PATH" in p.stderr and "notanint" not in p.stdout + p.stderr


def test_identical_rerun_composes_no_job(tmp_path, fake):
    env = cli_env()
    sweep = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "source=init,shuffle", "seed=range(1,6)", f"out_dir={sweep}",
            "train.epochs=2", "hydra/launcher=slurm"]
    p = run_cli(args, env=env)
    assert "{'fast': 10, 'slow': 4}" in p.stdout + p.stderr  # 2 group sets: base + check each
    m = json.loads((sweep / "sweep.json").read_text())
    assert all(rec.get("plan_key") for rec in m["runs"].values())
    n_sbatch = len(fake.calls("sbatch"))
    p = run_cli(args, env=env)
    out = p.stdout + p.stderr
    assert "10 queued/running, 0 submitted now" in p.stdout
    # 0 job configs composed; Hydra composed each group set's base once (for its plan key)
    assert "composed 0 job configs; 2 group compositions" in out and "composed 10 job configs" not in out
    assert len(fake.calls("sbatch")) == n_sbatch and json.loads((sweep / "sweep.json").read_text()) == m
    # one run done, one failed (left the queue): the failed one is composed and submitted again
    arr = m["submissions"][0]["arrays"][0]["job_id"]
    first, second = (Path(m["runs"][r]["run_dir"]) for r in m["submissions"][0]["runs"][:2])
    first.mkdir(parents=True)
    (first / "DONE").write_text("{}")
    fake.set_task(f"{arr}_0", "COMPLETED", queue=False)
    fake.set_task(f"{arr}_1", "FAILED", queue=False, exit="1:0")
    p = run_cli(args, env=env)
    assert "1 done, 8 queued/running, 1 submitted now" in p.stdout and "composed 10 job configs" in p.stdout + p.stderr
    # a changed setting that decides run ids (cpus_per_task -> train.threads): not found by key, composed
    p = run_cli(args + ["hydra.launcher.cpus_per_task=2"], env=env, check=False)
    assert "composed 0 job configs" not in p.stdout + p.stderr


def test_slurm_folder_is_private(fake, tmp_path):
    from nondet_hpc.sweep.trust import TrustError

    sweep = tmp_path / "sw"
    submit.submit_sweep(sweep, plan(sweep, seeds=(1,)), params_for(sweep))
    assert (sweep / "slurm").stat().st_mode & 0o777 == 0o700
    n = len(fake.calls("sbatch"))
    before = (sweep / "sweep.json").read_text()
    for mode in (0o777, 0o770):  # anyone, or the group (not trusted unless said): refused
        (sweep / "slurm").chmod(mode)
        with pytest.raises(TrustError, match=f"slurm \\(mode {mode:o}\\)"):
            submit.submit_sweep(sweep, plan(sweep, seeds=(2,)), params_for(sweep))
        assert len(fake.calls("sbatch")) == n and (sweep / "sweep.json").read_text() == before
    submit.submit_sweep(sweep, plan(sweep, seeds=(2,)), params_for(sweep, trust_group=True))
    assert len(fake.calls("sbatch")) == n + 2


def test_summary_of_one_task_chunks_and_caps(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(max_array_size=5)
    res = submit.submit_sweep(sweep, plan(sweep), params_for(sweep, array_parallelism=2))
    text = submit.describe_submission(res, params_for(sweep, array_parallelism=2))
    assert "5 tasks (runs 0-4 of submission 0, at most 2 at once)" in text
    assert "1 task (run 5 of submission 0)" in text and "at most 2 at once), partition (default partition), after" \
        not in text.splitlines()[2]


def test_eta_is_not_the_previous_attempts():
    now = 1000.0
    hb = {"epoch": 5, "epochs": 10, "time": now - 600, "elapsed_s": 100.0, "step": 50, "steps": 100}
    st = state.RunStatus(run_id="r", run_dir="/x", state="running")
    state.apply_heartbeat(st, hb, now)
    assert st.eta_s is None  # 10 min old heartbeat, 100 s left by its own estimate: unknown, not "0s"
    st = state.RunStatus(run_id="r", run_dir="/x", state="running")
    state.apply_heartbeat(st, dict(hb, time=now - 10), now)
    assert st.eta_s == pytest.approx(90.0)
    assert not state._heartbeat_of_this_attempt({"state": "preempted"}, hb)
    assert not state._heartbeat_of_this_attempt({"state": "running", "resumed_from": {"time": now - 5}}, hb)
    assert state._heartbeat_of_this_attempt({"state": "running", "resumed_from": {"time": now - 900}}, hb)


def test_status_of_a_task_that_never_started_shows_no_log_paths(fake, tmp_path):
    from nondet_hpc.cluster import status as status_cli

    sweep = tmp_path / "sw"
    res = submit.submit_sweep(sweep, plan(sweep, seeds=(1,)), params_for(sweep))
    a = res.arrays[0]["job_id"]
    fake.set_task(f"{a}_0", "CANCELLED by 0", queue=False)  # cancelled while pending
    st = state.sweep_status(sweep)
    r = next(r for r in st["runs"] if r["job_id"] == f"{a}_0")
    assert r["state"] == "failed" and r["log_out"] == r["log_err"] == ""
    assert "no log: the task never started" in status_cli.format_status(st)


def test_cancel_into_a_closed_pipe_prints_no_traceback(fake, tmp_path):
    sweep = tmp_path / "sw"
    submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    r, w = os.pipe()
    os.close(r)  # the reader (`| head`) is gone before cancel writes
    p = subprocess.run([sys.executable, "-m", "nondet_hpc.cancel", str(sweep)], stdout=w, stderr=subprocess.PIPE,
                       text=True, env=cli_env())
    os.close(w)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
    assert fake.calls("scancel")  # the work was done
