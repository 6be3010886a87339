"""K runs per array task (hydra.launcher.runs_per_task): submission against the fake SLURM client
(array sizes, the runs each task holds, sbatch lines), status of packed runs, and the node-side
packer (cluster/pack.py) running K=2 tiny runs as processes on this CPU: bit-identical to solo
runs with the same thread count, one failing run leaves its sibling done, a stop signal
checkpoints both and requeues the task once."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from helpers import cli_env, make_cfg
from nondet_hpc.cluster import client, jobs, pack, state, submit
from nondet_hpc.sweep import manifest
from nondet_hpc.rundir import is_done, logits_path, run_dir
from slurm_fixtures import params_for, plan, sbatch_flags


@pytest.fixture
def keep_handlers():
    # PackJob installs USR2/TERM handlers in the process that runs it
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for s, h in old.items():
        signal.signal(s, h)


def task_runs(submission: dict, array: dict) -> list[list[str]]:
    """The run ids each task of ``array`` holds, read from sweep.json as docs/slurm.md describes it
    (``tasks``; a manifest written before runs_per_task: one run per task from ``offset``)."""
    if array.get("tasks") is not None:
        return [list(t) for t in array["tasks"]]
    k = int(array.get("runs_per_task", 1))
    o, n = int(array["offset"]), int(array.get("n_runs", array["size"] * k))
    mine = submission.get("runs", [])[o:o + n]
    return [mine[i:i + k] for i in range(0, len(mine), k)]


def load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f).function


# ============================================================================ submission
def test_runs_per_task_array_sizes_and_manifest(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep)  # 6 runs
    res = submit.submit_sweep(sweep, runs, params_for(sweep, runs_per_task=4), argv=["x"])
    assert len(res.arrays) == 1 and res.submitted == [r.run_id for r in runs]
    arr = res.arrays[0]
    assert (arr["size"], arr["runs_per_task"], arr["n_runs"]) == (2, 4, 6)
    ids = [r.run_id for r in runs]
    assert arr["tasks"] == [ids[:4], ids[4:]]
    script_text = Path(arr["script"]).read_text()
    assert "--array=0-1%2" in sbatch_flags(script_text)
    m = manifest.load_manifest(sweep)
    sub = m["submissions"][0]
    assert task_runs(sub, sub["arrays"][0]) == [ids[:4], ids[4:]]
    for t, task_ids in enumerate(arr["tasks"]):
        job = load_pickle(sweep / "slurm" / f"{arr['job_id']}_{t}_submitted.pkl")
        assert isinstance(job, pack.PackJob) and job.run_ids == task_ids and job.mps == "auto"
        for slot, rid in enumerate(task_ids):
            assert m["runs"][rid]["jobs"] == [{"submission": 0, "job_id": f"{arr['job_id']}_{t}",
                                               "array_job_id": arr["job_id"], "index": t, "slot": slot}]
    text = submit.describe_submission(res, params_for(sweep))
    assert "2 tasks of 4 runs each (runs 0-5" in text


def test_runs_per_task_chunks_count_tasks(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(max_array_size=2)
    runs = plan(sweep, seeds=(1, 2, 3), sources=("init", "shuffle", "augment"))[:7]
    res = submit.submit_sweep(sweep, runs, params_for(sweep, runs_per_task=2, mps=False))
    # 7 runs, 2 per task = 4 tasks, 2 tasks per array
    assert [(a["offset"], a["size"], a["n_runs"]) for a in res.arrays] == [(0, 2, 4), (4, 2, 3)]
    assert [j["array"] for j in fake.state["jobs"][:2]] == [2, 2]
    sub = manifest.load_manifest(sweep)["submissions"][0]
    held = [rid for a in sub["arrays"] for t in task_runs(sub, a) for rid in t]
    assert held == [r.run_id for r in runs]
    last = load_pickle(sweep / "slurm" / f"{res.arrays[1]['job_id']}_1_submitted.pkl")
    assert last.run_ids == [runs[6].run_id] and last.mps == "false"


def test_one_run_per_task_is_unchanged(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep)
    res = submit.submit_sweep(sweep, runs, params_for(sweep))
    arr = res.arrays[0]
    assert (arr["size"], arr["runs_per_task"]) == (6, 1)
    assert isinstance(load_pickle(sweep / "slurm" / f"{arr['job_id']}_0_submitted.pkl"), jobs.RunJob)
    assert "slot" not in manifest.load_manifest(sweep)["runs"][runs[0].run_id]["jobs"][0]


def test_old_manifest_task_runs():
    # sweep.json written before runs_per_task: no runs_per_task / n_runs / tasks keys
    sub = {"runs": ["a", "b", "c", "d", "e"]}
    assert task_runs(sub, {"offset": 2, "size": 3}) == [["c"], ["d"], ["e"]]


@pytest.mark.parametrize("key,value,message", [
    ("runs_per_task", 0, "runs_per_task=0 is invalid"),
    ("runs_per_task", "2", "an integer >= 1"),
    ("mps", "maybe", "valid values are auto, true, false"),
])
def test_bad_packing_options_are_refused(fake, tmp_path, key, value, message):
    sweep = tmp_path / "sw"
    with pytest.raises(client.SubmissionError, match=message):
        submit.submit_sweep(sweep, plan(sweep), params_for(sweep, **{key: value}))
    assert fake.state["jobs"] == []


def test_status_shows_each_packed_run(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = plan(sweep, seeds=(1,), sources=("init", "shuffle"))
    res = submit.submit_sweep(sweep, runs, params_for(sweep, runs_per_task=2, reducer={"enabled": False}))
    task = f"{res.arrays[0]['job_id']}_0"
    fake.set_task(task, "RUNNING")
    for r, st in zip(runs, ("running", "failed")):
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "run.json").write_text(json.dumps({"state": st, "heartbeat": {"epoch": 1, "epochs": 2}}))
    out = {r["run_id"]: r for r in state.sweep_status(sweep)["runs"]}
    assert out[runs[0].run_id]["state"] == "running" and out[runs[1].run_id]["state"] == "failed"
    assert all(o["job_id"] == task for o in out.values())
    assert "run 1 of the runs packed" in out[runs[0].run_id]["note"]
    assert "task runs on" in out[runs[1].run_id]["note"]


def test_split_cpus():
    assert pack.split_cpus([0, 1], 2) == [[0], [1]]
    assert pack.split_cpus([3, 2, 1, 0], 2) == [[0, 1], [2, 3]]
    assert pack.split_cpus([0, 1, 2], 2) == [[0], [1]]
    assert pack.split_cpus([0], 2) == [[0], [0]]


def test_mps_off_or_missing(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # a GPU, and no MPS command
    m = pack.Mps("auto", 2)
    m.start()
    assert m.record() == {"mode": "auto", "ran": False, "reason": "nvidia-cuda-mps-control not on PATH"}
    assert "the 2 runs time-slice the GPU" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="mps=true but the MPS daemon could not start"):
        pack.Mps("true", 2).start()
    m = pack.Mps("auto", 1)
    m.start()
    assert not m.ran and "one run per task" in m.reason


def test_a_cpu_only_task_does_not_talk_about_the_gpu(tmp_path, monkeypatch, capsys):
    """No GPU visible, or runs on train.device=cpu: MPS is not needed and the log says the runs share
    the CPUs, not that they time-slice a GPU (even where the MPS command exists)."""
    exe = tmp_path / "bin" / pack.MPS_CONTROL
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    m = pack.Mps("auto", 2)
    m.start()
    out = capsys.readouterr().out
    assert not m.ran and m.reason == "not needed (no GPU visible: the runs train on CPU)"
    assert "GPU" not in out.split("(")[0] and "time-slice" not in out and "share the task's CPUs" in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # a GPU, but the runs compute on the CPU
    m = pack.Mps("auto", 2, gpu=False)
    m.start()
    assert not m.ran and "train.device=cpu" in m.reason and "time-slice" not in capsys.readouterr().out
    assert pack._device({"train": {"device": "cpu"}}) == "cpu" and pack._device({}) == "auto"


def test_mps_daemon_started_and_stopped(tmp_path, monkeypatch):
    # a stand-in for nvidia-cuda-mps-control that records its calls and environment
    calls = tmp_path / "calls.txt"
    exe = tmp_path / "bin" / pack.MPS_CONTROL
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\necho \"$@|$CUDA_MPS_PIPE_DIRECTORY|$(cat)\" >> {calls}\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    m = pack.Mps("auto", 2)
    m.start()
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    assert m.ran and Path(pipe).is_dir()
    m.stop()
    lines = calls.read_text().splitlines()
    assert lines[0].startswith(f"-d|{pipe}|") and lines[1] == f"|{pipe}|quit"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()


# ============================================================================ the node-side packer
TINY = ["train.threads=1"]  # on top of helpers.FAST: 2 epochs of a 256-image subset


def _job(out: Path, *overrides: str) -> jobs.RunJob:
    cfg = make_cfg(out, *TINY, *overrides)
    return jobs.RunJob(cfg, run_dir(cfg).name, str(run_dir(cfg)), max_requeue=3)


def test_packed_runs_match_solo_runs_and_a_failure_stays_alone(tmp_path, keep_handlers):
    from nondet_hpc.run import task

    packed = [_job(tmp_path / "pack", "source=init", "seed=1"), _job(tmp_path / "pack", "source=shuffle", "seed=2")]
    outs = pack.PackJob(packed, mps="false")()
    assert [o["state"] for o in outs] == ["done", "done"]
    for j in packed:
        solo = task.run(make_cfg(tmp_path / "solo", *TINY, f"source={j.cfg.source.name}", f"seed={j.cfg.seed}"))
        a = np.load(logits_path(Path(j.run_dir), "plain"))
        b = np.load(logits_path(Path(solo["run_dir"]), "plain"))
        assert a.tobytes() == b.tobytes()
        rec = json.loads((Path(j.run_dir) / "run.json").read_text())
        assert rec["packing"]["k"] == 2 and rec["packing"]["mps"]["ran"] is False and rec["threads"] == 1
    # one run fails (a snapshot count that does not divide the epochs): the other finishes
    bad = _job(tmp_path / "fail", "source=init", "seed=3", "train.snapshots=3")
    good = _job(tmp_path / "fail", "source=init", "seed=4")
    with pytest.raises(RuntimeError, match=r"1 of 2 runs of this task failed .*train.snapshots=3") as e:
        pack.PackJob([bad, good], mps="false")()
    assert str(e.value).endswith(f"the other 1 finished (DONE): {good.run_id}")
    assert is_done(Path(good.run_dir)) and not is_done(Path(bad.run_dir))
    # both fail: the message does not claim that any finished
    both = [_job(tmp_path / "both", "source=init", f"seed={s}", "train.snapshots=3") for s in (5, 6)]
    with pytest.raises(RuntimeError, match=r"^all 2 runs of this task failed .*none of them finished$") as e:
        pack.PackJob(both, mps="false")()
    assert "DONE" not in str(e.value)


PACK_SCRIPT = textwrap.dedent("""
    import cloudpickle, sys
    if __name__ == "__main__":  # as submitit.core._submit: the runs are spawned processes
        with open(sys.argv[1], "rb") as f:
            job = cloudpickle.load(f)
        job()
""")


@pytest.mark.parametrize("sig,requeued", [("SIGUSR2", True), ("SIGTERM", False)])
def test_stop_signal_checkpoints_both_runs_and_requeues_once(tmp_path, fake, sig, requeued):
    # long enough to be training when the signal comes (each epoch is a few steps of a tiny model)
    many = ["train.epochs=400", "train.checkpoint_every=1000"]
    runs = [_job(tmp_path / "sw", "source=init", "seed=1", *many), _job(tmp_path / "sw", "source=none", "seed=1", *many)]
    job_pkl = tmp_path / "job.pkl"
    job_pkl.write_bytes(cloudpickle.dumps(pack.PackJob(runs, mps="false")))
    script_path = tmp_path / "pack_job.py"
    script_path.write_text(PACK_SCRIPT)
    env = cli_env({"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "0"})
    p = subprocess.Popen([sys.executable, str(script_path), str(job_pkl)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        # wait (on progress, not a deadline) for both runs' first heartbeat
        while not all(_heartbeat(Path(r.run_dir)) for r in runs):
            assert p.poll() is None, p.stdout.read() if p.stdout else ""
            time.sleep(0.2)
        p.send_signal(getattr(signal, sig))
        out, _ = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
    for r in runs:
        rec = json.loads((Path(r.run_dir) / "run.json").read_text())
        assert rec["state"] == "preempted", out
        assert (Path(r.run_dir) / "checkpoint.pt").is_file() and not is_done(Path(r.run_dir))
    if requeued:
        assert p.returncode == 0, out
        assert fake.calls("scontrol") == [["requeue", "777"]]  # once for the task, not once per run
    else:
        assert p.returncode != 0 and "stopped by a signal" in out
        assert fake.calls("scontrol") == []


def _heartbeat(rd: Path) -> bool:
    try:
        return bool(json.loads((rd / "run.json").read_text()).get("heartbeat"))
    except (OSError, ValueError):
        return False


# ============================================================================ cost per model
def test_cost_uses_a_gpu_measurement_only_where_one_exists(monkeypatch):
    from nondet_hpc import presets

    base = presets.gpu_hours_per_model("resnet14", 500)
    assert presets.gpu_hours_per_model("resnet14", 500, precision="amp_bf16", runs_per_task=4) == base
    note = presets.cost_basis("resnet14", "amp_bf16", 4)
    assert not note["measured"] and "no GPU measurement of amp_bf16 with 4 run(s)" in note["note"]
    monkeypatch.setitem(presets.MEASURED, ("resnet14", "fp32", 4), (50_000.0, "test GPU"))
    measured = presets.gpu_hours_per_model("resnet14", 500, runs_per_task=4)
    # 500 epochs x 50,000 images at 50,000 images/s = 500 s of training, plus the evaluation share
    assert 500 / 3600 < measured < 501 / 3600 and presets.cost_basis("resnet14", "fp32", 4)["measured"]
