"""The SLURM launcher on a real cluster (marker ``slurm``; CI starts one with launch/start_slurm.sh).

Skips with a reason where no cluster answers; FAILS under CI=true instead. Real trainer, real
digits. No test depends on the machine's speed: runs that must still be training when the test
acts get an epoch count sized from a measured reference run (``epochs_for``), and waits for
training fail on a stall (no progress for minutes), not on a deadline.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import cli_env, run_cli
from slurm_fixtures import (heartbeat, measure_epoch_seconds, require_cluster, sweep_status, wait_for,
                            wait_progressing)

pytestmark = pytest.mark.slurm

FAST = ["train.epochs=2", "train.warmup_epochs=1", "train.threads=1"]


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


@pytest.fixture(scope="module")
def epochs_for(cluster, tmp_path_factory):
    """Digits epochs (one thread) that train for about ``seconds`` on this machine, from a short
    measured reference run: tests that must act while a run trains size it from this, so a slow
    or a fast CPU changes the epoch count, not the outcome."""
    per_epoch = measure_epoch_seconds(tmp_path_factory.mktemp("epoch-ref"))
    return lambda seconds: max(20, math.ceil(seconds / per_epoch))


def sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=True).stdout


def manifest(sweep: Path) -> dict:
    return json.loads((sweep / "sweep.json").read_text())


def our_queue(sweep: Path) -> list[str]:
    """squeue lines of this sweep's jobs."""
    m = manifest(sweep)
    ids = {a["job_id"] for s in m["submissions"] for a in s["arrays"]}
    ids |= {s["reducer"]["job_id"] for s in m["submissions"] if s.get("reducer")}
    out = sh("squeue", "-h", "-r", "-o", "%i %F %T")
    return [line for line in out.splitlines() if line.split()[1] in ids or line.split()[0] in ids]


def cleanup(sweep: Path) -> None:
    if (sweep / "sweep.json").exists():
        run_cli(["-m", "nondet_hpc.cancel", str(sweep)], check=False, timeout=60)


def sacct_rows(job: str) -> list[list[str]]:
    out = sh("sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "JobID,State,Start,End")
    return [line.split("|") for line in out.splitlines() if line]


def wait_sweep_over(sweep: Path, timeout: float, seen: list | None = None) -> dict:
    def over():
        st = sweep_status(sweep)
        if seen is not None:
            seen.append(st)
        c = st["counts"]
        red = st["reducer"]
        busy = c["pending"] + c["running"] + c["requeued"] + c["unknown"]
        red_busy = red is not None and red["state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE")
        return st if busy == 0 and not red_busy else None
    return wait_for(over, timeout, interval=2, what=f"sweep {sweep} to finish")


def test_end_to_end_sweep(cluster, tmp_path):
    sweep = tmp_path / "e2e"
    # init and the bit change: init's seed-1 run is every bit-change run's unperturbed twin
    args = ["-m", "nondet_hpc", "-m", "source=init,bitflip", "seed=range(1,4)", f"out_dir={sweep}", *FAST,
            "hydra/launcher=slurm", "hydra.launcher.reducer.partition=cpu"]
    try:
        p = run_cli(args)
        # returned at once (before the jobs end, checked below), with the job ids, the sweep folder
        # and the status command
        array_id = re.search(r"array job (\d+): 6 tasks", p.stdout).group(1)
        reducer_id = re.search(rf"reducer job (\d+) \(afterany:{array_id}\), partition cpu", p.stdout).group(1)
        assert f"python -m nondet_hpc.status {sweep}" in p.stdout
        m = manifest(sweep)
        assert len(m["runs"]) == 6 and m["submissions"][0]["reducer"]["job_id"] == reducer_id
        first = sweep_status(sweep)
        assert first["counts"]["done"] < 6, "the command should return before the jobs end"
        seen: list[dict] = [first]
        st = wait_sweep_over(sweep, 300, seen)
        assert st["counts"]["done"] == 6, st["counts"]
        states = {r["state"] for s in seen for r in s["runs"]}
        assert {"pending", "running"} & states and "done" in states
        # the reducer ran after every array task ended and wrote the report
        assert st["reducer"]["state"] == "COMPLETED" and (sweep / "report" / "metrics.csv").exists()
        # ... with the Instability section: every run's trajectory and weights, a condition number per
        # bit-change run against its twin, and the divergence figure
        report = sweep / "report"
        assert "## Instability" in (report / "report.md").read_text() and (report / "divergence.png").exists()
        pairs = pd.read_csv(report / "instability_pairs.csv")
        assert len(pairs) == 3 and set(pairs["mode"]) == {"twin"} and (pairs["condition_number"] > 0).all()
        assert "Condition number of training" in (report / "summary.txt").read_text()
        tasks = [r for r in sacct_rows(array_id) if r[0].startswith(f"{array_id}_")]
        assert len(tasks) == 6 and all(r[1] == "COMPLETED" for r in tasks)
        red = sacct_rows(reducer_id)[-1]
        assert red[2] >= max(r[3] for r in tasks)
        # the second identical command submits nothing
        p = run_cli(args)
        assert "6 done, 0 queued/running, 0 submitted now" in p.stdout
        assert len(manifest(sweep)["submissions"]) == 1 and our_queue(sweep) == []
    finally:
        cleanup(sweep)


def test_scancel_task_shows_failed_and_rerun_submits_exactly_it(cluster, epochs_for, tmp_path):
    sweep = tmp_path / "cancel"
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=1,2", f"out_dir={sweep}", f"train.epochs={epochs_for(40.0)}",
            "train.threads=1", "hydra/launcher=slurm", "hydra.launcher.reducer.enabled=false"]
    foreign = sh("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "sleep 60").strip()
    try:
        run_cli(args)
        m = manifest(sweep)
        target_run, rec = next((k, v) for k, v in m["runs"].items() if "-s0001-" in k)
        job = rec["jobs"][-1]["job_id"]

        def running():
            st = sweep_status(sweep)
            return next(r for r in st["runs"] if r["run_id"] == target_run)["state"] == "running"
        wait_for(running, 120, what=f"{job} to run")
        sh("scancel", job)

        def failed():
            st = sweep_status(sweep)
            r = next(r for r in st["runs"] if r["run_id"] == target_run)
            # slurmdbd records the cancellation asynchronously: until sacct has it, the run shows
            # as failed with state GONE (left the queue without DONE); wait for SLURM's own word.
            return r if r["state"] == "failed" and r["slurm_state"] != "GONE" else None
        r = wait_for(failed, 90, what=f"{job} to show as failed with its sacct state")
        assert r["slurm_state"] == "CANCELLED" and r["log_err"].endswith("_log.err")
        p = run_cli(args)
        m = manifest(sweep)
        assert len(m["submissions"]) == 2 and m["submissions"][1]["runs"] == [target_run]
        assert "1 submitted now" in p.stdout
        # cancel: this sweep's jobs, not the foreign held job
        p = run_cli(["-m", "nondet_hpc.cancel", str(sweep)])
        assert "cancelled" in p.stdout
        wait_for(lambda: our_queue(sweep) == [], 60, what="the sweep's jobs to leave the queue")
        assert foreign in sh("squeue", "-h", "-o", "%i").split()
    finally:
        subprocess.run(["scancel", foreign], timeout=30)
        cleanup(sweep)


def test_chunking_with_small_max_array_size(cluster, tmp_path):
    sweep = tmp_path / "chunks"
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=range(1,6)", f"out_dir={sweep}", "train.epochs=1",
            "train.warmup_epochs=1", "train.threads=1", "hydra/launcher=slurm", "hydra.launcher.max_array_size=2"]
    held = tmp_path / "held"
    try:
        p = run_cli(args)
        sub = manifest(sweep)["submissions"][0]
        assert [(a["offset"], a["size"]) for a in sub["arrays"]] == [(0, 2), (2, 2), (4, 1)]
        assert sub["reducer"]["dependency"] == "afterany:" + ":".join(a["job_id"] for a in sub["arrays"])
        assert p.stdout.count("array job") == 3
        # a parallelism limit below the sweep size chains the chunks (checked while held)
        run_cli([a.replace(str(sweep), str(held)) for a in args] +
                ["hydra.launcher.hold=true", "hydra.launcher.array_parallelism=1"])
        hs = manifest(held)["submissions"][0]
        deps = dict(line.split(maxsplit=1) for line in sh("squeue", "-h", "-o", "%F %E").splitlines()
                    if line.split()[0] in {a["job_id"] for a in hs["arrays"]})
        a0, a1, a2 = (a["job_id"] for a in hs["arrays"])
        assert deps[a1].startswith(f"afterany:{a0}") and deps[a2].startswith(f"afterany:{a1}")
        assert all(a["parallelism"] == 1 for a in hs["arrays"])
        cleanup(held)
        # every array task ran the run at offset + index
        st = wait_sweep_over(sweep, 240)
        assert st["counts"]["done"] == 5 and st["reducer"]["state"] == "COMPLETED"
        for a in sub["arrays"]:
            for i in range(a["size"]):
                run_id = sub["runs"][a["offset"] + i]
                info = json.loads((Path(manifest(sweep)["runs"][run_id]["run_dir"]) / "run.json").read_text())
                assert info["slurm"]["SLURM_ARRAY_JOB_ID"] == a["job_id"]
                assert info["slurm"]["SLURM_ARRAY_TASK_ID"] == str(i)
    finally:
        cleanup(sweep)
        cleanup(held)


def test_usr2_requeue_resumes_bit_identically(cluster, epochs_for, tmp_path):
    """The time-limit path, forced deterministically: SLURM's warning before a time limit is USR2
    (``--signal=USR2@D``, checked in the unit tests); here the test sends that same signal itself
    once the run has finished its first epoch, instead of racing a 2-minute limit against this
    machine's speed. The run checkpoints, requeues itself, resumes, and ends with the logits of an
    uninterrupted run of the same config (deterministic CPU mode, one thread)."""
    epochs = epochs_for(25.0)  # ~25 s of training left after the signal, whatever the CPU
    common = ["-m", "nondet_hpc", "-m", "source=init", "seed=1", f"train.epochs={epochs}", "train.threads=1",
              "hydra/launcher=slurm", "hydra.launcher.reducer.enabled=false", "hydra.launcher.timeout_min=30"]
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    try:
        run_cli(common + [f"out_dir={cut}"])
        run_cli(common + [f"out_dir={ref}"])
        rec = next(iter(manifest(cut)["runs"].values()))
        run_dir, job = Path(rec["run_dir"]), rec["jobs"][-1]["job_id"]
        wait_for(lambda: heartbeat(run_dir).get("epoch", 0) >= 1, 300, interval=0.2,
                 what=f"{job} to finish its first epoch")
        sh("scancel", "--signal=USR2", job)
        seen: list[dict] = []

        def done():
            seen.append(sweep_status(cut))
            return (run_dir / "DONE").exists()
        wait_progressing(done, lambda: (heartbeat(run_dir).get("step"), seen[-1]["runs"][0]["state"] if seen else None),
                         stall=300, interval=2, what=f"{job} to requeue, resume and finish")
        st = wait_sweep_over(cut, 120, seen)
        assert st["counts"]["done"] == 1, st
        # status showed progress while it ran, and the requeue
        running = [r for s in seen for r in s["runs"] if r["state"] == "running" and r["epoch"] is not None]
        assert running and any(r["eta_s"] is not None and r["epochs"] == epochs for r in running)
        # DONE is written before the task exits: give accounting a moment to record the end
        states = wait_for(lambda: (lambda s: s if s and s[-1] == "COMPLETED" else None)([r[1] for r in sacct_rows(job)]),
                          60, what="sacct to record the end")
        assert "REQUEUED" in states, states
        assert st["runs"][0]["restarts"] >= 1
        info = json.loads((run_dir / "run.json").read_text())
        assert info["attempts"] >= 2 and "resumed_from" in info
        assert 0 < info["resumed_from"]["epoch"] < epochs, (info["resumed_from"], epochs)
        ref_dir = Path(next(iter(manifest(ref)["runs"].values()))["run_dir"])
        wait_progressing(lambda: (ref_dir / "DONE").exists(), lambda: heartbeat(ref_dir).get("step"), stall=300,
                         what="the uninterrupted reference run to finish")
        assert run_dir.name == ref_dir.name
        a = np.load(run_dir / "logits" / "plain.npy", allow_pickle=False)
        b = np.load(ref_dir / "logits" / "plain.npy", allow_pickle=False)
        assert a.dtype == np.float32 and np.array_equal(a, b)
        for name in ("trajectory.npz", "weights.safetensors"):  # the records of training, byte for byte
            assert (run_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name
    finally:
        cleanup(cut)
        cleanup(ref)


def test_rejected_partition_shows_slurms_message(cluster, tmp_path):
    sweep = tmp_path / "bad"
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={sweep}", "hydra/launcher=slurm",
                 "hydra.launcher.partition=no_such_partition"], check=False)
    assert p.returncode == 1
    assert "invalid partition specified: no_such_partition" in p.stderr
    assert "command: sbatch --parsable" in p.stderr and "Traceback" not in p.stderr
    assert manifest(sweep)["submissions"][0]["status"] == "failed"


def _seeds_of(sweep: Path) -> list[int]:
    """The seed of every run sweep.json records (one entry per run id, so a seed twice shows)."""
    return sorted(int(o.split("=")[1]) for r in manifest(sweep)["runs"].values() for o in r["overrides"]
                  if o.startswith("seed="))


def test_waves_stop_at_max_continue_after_a_lost_reducer_and_never_resubmit(cluster, tmp_path):
    """A study whose target needs more than one wave (unreachable here, so N = the maximum, 3 waves of
    3): the reducer of wave 1 is cancelled while the wave waits behind a job holding every CPU, the
    rerun queues a reducer alone, which continues the waves; seeds 1..9 exactly once; then nothing."""
    from nondet_hpc import metrics as M
    from nondet_hpc.analysis.planning import sweep_groups

    sweep = tmp_path / "waves"
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=range(1,21)", f"out_dir={sweep}", "train.epochs=1",
            "train.warmup_epochs=1", "train.threads=1", "hydra/launcher=slurm", "study.target.acc_sd_se=1e-9",
            "study.wave=3", "study.max_models=9"]
    cpus = sh("sinfo", "-h", "-p", "debug", "-o", "%c").split()[0]
    blocker = sh("sbatch", "--parsable", "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 600").strip()
    try:
        wait_for(lambda: "RUNNING" in sh("squeue", "-h", "-j", blocker, "-o", "%T"), 120, what="blocker running")
        p = run_cli(args)
        assert "3 submitted now" in p.stdout and "stop rule: acc_sd_se <= 1e-09, wave 3, max 9" in p.stdout
        reducer = manifest(sweep)["submissions"][0]["reducer"]["job_id"]
        sh("scancel", reducer)
        subprocess.run(["scancel", blocker], timeout=30)
        # wave 1 trains; with its reducer gone nothing decides it
        wait_progressing(lambda: sweep_status(sweep)["counts"]["done"] == 3 or None,
                         lambda: [heartbeat(Path(r["run_dir"])) for r in manifest(sweep)["runs"].values()],
                         stall=300, interval=2, what="wave 1 to finish")
        st = manifest(sweep)["study"]
        assert len(st["waves"]) == 1 and not st["waves"][0]["decided"] and st["status"] == "running"
        # the rerun: every run done, no reducer queued -> a reducer alone, which decides wave 1
        p = run_cli(args)
        assert "0 submitted now" in p.stdout and "reducer job" in p.stdout
        wait_progressing(lambda: manifest(sweep)["study"]["status"] != "running" or None,
                         lambda: (len(manifest(sweep)["runs"]), sweep_status(sweep)["counts"]["done"],
                                  [heartbeat(Path(r["run_dir"])) for r in manifest(sweep)["runs"].values()]),
                         stall=300, interval=3, what="the waves to stop")
        st = manifest(sweep)["study"]
        assert st["status"] == "done", st["stop_reason"]
        assert "maximum reached (9 models)" in st["stop_reason"] and len(st["waves"]) == 3
        assert _seeds_of(sweep) == list(range(1, 10))
        assert [w["groups"] for w in st["waves"]] == [{"(all)": [1, 2, 3]}, {"(all)": [4, 5, 6]}, {"(all)": [7, 8, 9]}]
        wait_sweep_over(sweep, 300)
        # the last reducer reduced all 9 models: the SE it measured is the report's SE of the final N
        (g,) = [g for g in sweep_groups(sweep) if g.view_id == "plain"]
        assert len(g.frame) == 9
        se = M.bootstrap_sd_se(g.frame["acc"].to_numpy(float), n_boot=10_000, seed=[0, g.seed_key])
        assert st["groups"]["(all)"]["precision"]["acc_sd_se"] == pytest.approx(se, rel=1e-12)
        report = (sweep / "report" / "report.md").read_text()
        # the last report shows the final state and why it stopped (decided after it was written)
        assert "## Study grown in waves" in report and f"**State: done**: {st['stop_reason']}" in report
        # the same command again: nothing submitted, no seed twice, no run deleted
        n_subs = len(manifest(sweep)["submissions"])
        p = run_cli(args)
        assert "9 done, 0 queued/running, 0 submitted now" in p.stdout
        assert len(manifest(sweep)["submissions"]) == n_subs and our_queue(sweep) == []
        assert _seeds_of(sweep) == list(range(1, 10)) and len(list((sweep / "runs").iterdir())) == 9
    finally:
        subprocess.run(["scancel", blocker], timeout=30)
        cleanup(sweep)


def test_packed_sweep_runs_to_its_report_and_stays_private(cluster, tmp_path):
    """runs_per_task=2 on SLURM (issue 19): every packed run trains to DONE, the reducer writes the
    report, the task's log says what really happened (its runs share the CPUs; nothing about a GPU,
    no failure), and with the user's umask 002 nothing the launcher or the jobs made is writable by
    the group (sbatch passes the launcher's umask on to the jobs)."""
    sweep = tmp_path / "packed"
    args = ["-m", "nondet_hpc", "-m", "data=digits", "source=init,shuffle", "seed=1,2", f"out_dir={sweep}", *FAST,
            "hydra/launcher=slurm", "hydra.launcher.runs_per_task=2", "hydra.launcher.cpus_per_task=2"]
    old = os.umask(0o002)
    try:
        p = run_cli(args)
    finally:
        os.umask(old)
    try:
        assert re.search(r"array job \d+: 2 tasks of 2 runs each", p.stdout), p.stdout
        st = wait_sweep_over(sweep, 900)
        assert st["counts"]["done"] == 4, st["counts"]
        assert st["reducer"]["state"] == "COMPLETED" and (sweep / "report" / "metrics.csv").is_file()
        m = manifest(sweep)
        for rec in m["runs"].values():
            info = json.loads((Path(rec["run_dir"]) / "run.json").read_text())
            assert info["state"] == "done" and info["packing"]["k"] == 2 and info["threads"] == 1
            assert info["packing"]["cpus_shared"] is False and info["packing"]["mps"]["ran"] is False
        (arr,) = m["submissions"][0]["arrays"]
        for i in range(2):
            log = (sweep / "slurm" / f"{arr['job_id']}_{i}_0_log.out").read_text()
            assert "2 runs at once" in log and log.count(": done") == 2, log
            assert "time-slice" not in log and "finished (DONE)" not in log and "failed" not in log, log
        made = [sweep, sweep / "sweep.json", sweep / "slurm", sweep / "runs", sweep / "report",
                *(sweep / "runs").iterdir(), *(sweep / "report").iterdir()]
        writable = {str(x): oct(x.stat().st_mode & 0o777) for x in made if x.stat().st_mode & 0o022}
        assert writable == {}, writable
    finally:
        cleanup(sweep)


def test_an_sbatch_that_answers_late_is_found_and_recorded(cluster, tmp_path):
    """An sbatch that queues its job and answers after command_timeout_s (a wrapper around the real
    one): the launcher finds the array and the reducer by the submission token in their comment,
    records them, and a rerun queues nothing twice (held jobs: nothing runs)."""
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    real = sh("sh", "-c", "command -v sbatch").strip()
    (slow / "sbatch").write_text(f'#!/bin/sh\n{real} "$@"\nrc=$?\n[ $rc -eq 0 ] && exec sleep 30\nexit $rc\n')
    (slow / "sbatch").chmod(0o755)
    sweep = tmp_path / "late"
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=1,2", f"out_dir={sweep}", *FAST, "hydra/launcher=slurm",
            "hydra.launcher.hold=true", "hydra.launcher.command_timeout_s=3"]
    env = cli_env({"PATH": f"{slow}{os.pathsep}{os.environ['PATH']}"})
    try:
        p = run_cli(args, env=env)
        sub = manifest(sweep)["submissions"][0]
        (arr,) = sub["arrays"]
        red = sub["reducer"]
        assert arr["late_answer"]["outcome"] == red["late_answer"]["outcome"] == "found", sub
        assert "was found by its submission token" in p.stdout
        comments = dict(line.split("|", 1) for line in sh("squeue", "-h", "-o", "%F|%k").splitlines())
        assert arr["token"] in comments[arr["job_id"]] and red["token"] in comments[red["job_id"]]
        deps = dict(line.split() for line in sh("squeue", "-h", "-o", "%F %E").splitlines() if " " in line)
        assert deps[red["job_id"]].startswith(f"afterany:{arr['job_id']}")
        assert (sweep / "slurm" / f"{arr['job_id']}_1_submitted.pkl").exists()
        p = run_cli(args)  # the real sbatch: everything is queued already
        assert "0 submitted now" in p.stdout and len(manifest(sweep)["submissions"]) == 1
    finally:
        cleanup(sweep)
