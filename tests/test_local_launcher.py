"""The local launcher (hydra_plugins/nondet_hpc_launcher/local.py): n_jobs at once, each job's
result the same as its solo run (same thread count), every failure seen by the end-of-sweep
report and the exit code, one block of output per job; Ctrl-C and SIGTERM stop the sweep and its
workers, and a rerun finishes it bit-identically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import FAST, run_cli
from hydra_plugins.nondet_hpc_launcher.local import default_n_jobs
from nondet_hpc.rundir import list_runs, logits_path


@pytest.mark.parametrize("threads,cores,n", [([1], 2, 2), ([1, 1], 16, 16), ([2], 2, 1), ([3], 2, 1),
                                            ([1, 2], 4, 2), ([0], 8, 1), ([0, 1], 8, 1), ([], 4, 1)])
def test_default_n_jobs(threads, cores, n):
    assert default_n_jobs(threads, cores) == n


def _logits(sweep: Path) -> dict[str, bytes]:
    return {p.name: np.load(logits_path(p, "plain")).tobytes() for p in list_runs(sweep)}


def test_parallel_jobs_match_solo_runs_and_failures_are_reported(tmp_path):
    sweep = tmp_path / "par"
    # two runs side by side; then a sweep where one job is refused (3 snapshots do not divide 2 epochs)
    p = run_cli(["-m", "nondet_hpc", "-m", "source=init,shuffle", "seed=1", "train.snapshots=1", *FAST,
                 f"out_dir={sweep}", "hydra.launcher.n_jobs=2"], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 at a time" in p.stdout + p.stderr
    # one block per job: its header, then its own lines
    out = p.stdout
    for n in (0, 1):
        head = out.index(f"--- job #{n} ")
        assert out.index("[nondet_hpc] ", head + 1) > head
    for src in ("init", "shuffle"):
        solo = tmp_path / f"solo-{src}"
        run_cli(["-m", "nondet_hpc", f"source={src}", "seed=1", *FAST, f"out_dir={solo}"])
        (name, got), = [(k, v) for k, v in _logits(sweep).items() if k.startswith(src)]
        assert _logits(solo) == {name: got}  # same run id, bit-identical logits
    bad = run_cli(["-m", "nondet_hpc", "-m", "source=init", "seed=2", "train.snapshots=1,3", *FAST,
                   f"out_dir={tmp_path / 'bad'}", "hydra.launcher.n_jobs=2"], check=False)
    assert bad.returncode != 0
    assert "1 job(s) of the sweep failed" in bad.stdout + bad.stderr and "train.snapshots=3" in bad.stderr
    assert "[nondet_hpc] report:" in bad.stdout  # the finished run is still reduced


def test_bad_n_jobs_is_refused(tmp_path):
    p = run_cli(["-m", "nondet_hpc", "-m", "source=init", "seed=1", *FAST, f"out_dir={tmp_path}",
                 "hydra.launcher.n_jobs=0"], check=False)
    assert p.returncode != 0 and "hydra.launcher.n_jobs=0 is invalid" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------ issue 18 section 7: Ctrl-C and SIGTERM
STOP_RUN = ["train.epochs=150", "train.warmup_epochs=1", "data.train_subset=64", "data.test_subset=40",
            "train.batch_size=64", "train.threads=1"]


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _workers(pid: int) -> set[int]:
    """The launcher's worker processes (multiprocessing's spawned children)."""
    out = set()
    for d in Path("/proc").iterdir():
        st = _proc_stat(int(d.name)) if d.name.isdigit() else None
        if st and int(st[1]) == pid:
            try:
                if b"spawn_main" in (d / "cmdline").read_bytes():
                    out.add(int(d.name))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("sig,n_jobs", [(signal.SIGTERM, 2), (signal.SIGINT, 1)], ids=["SIGTERM-2-jobs", "SIGINT-serial"])
def test_a_stopped_local_sweep_stops_its_workers_and_a_rerun_finishes_bit_identically(tmp_path, sig, n_jobs):
    from helpers import REPO, cli_env, make_cfg
    from nondet_hpc.run import task

    out = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=1,2,3", *STOP_RUN, f"hydra.launcher.n_jobs={n_jobs}",
            f"out_dir={out}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    while True:  # until n_jobs runs train (a heartbeat); a hang is ended by pytest-timeout
        beats = 0
        for p in out.glob("runs/*/run.json"):
            try:
                beats += bool(json.loads(p.read_text()).get("heartbeat"))
            except ValueError:
                pass
        if beats >= n_jobs:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    workers = _workers(proc.pid)
    assert len(workers) == (n_jobs if n_jobs > 1 else 0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate()
    text = stdout + stderr
    assert proc.returncode == 128 + sig, text
    assert f"sweep stopped by {sig.name}" in text and "to rerun: #2" in text and "Traceback" not in stderr
    assert "run the same command again to finish them: python -m nondet_hpc -m source=init" in text
    while any(_proc_stat(w) and _proc_stat(w)[0] != "Z" for w in workers):  # the workers stop too
        time.sleep(0.2)
    runs = {p.name: json.loads((p / "run.json").read_text()) for p in list_runs(out)}
    stopped = [rid for rid, info in runs.items() if info["state"] == "preempted"]
    assert len(stopped) == n_jobs and not any((out / "runs" / r / "DONE").exists() for r in runs)
    assert all((out / "runs" / r / "checkpoint.pt").is_file() for r in stopped)
    # the same command finishes everything; a stopped run ends bit-identical to an uninterrupted one
    run_cli(args)
    assert len(list_runs(out)) == 3 and all((p / "DONE").is_file() for p in list_runs(out))
    seed = runs[stopped[0]]["seed"]
    ref = Path(task.run(make_cfg(tmp_path / "ref", "source=init", f"seed={seed}", *STOP_RUN, fast=False))["run_dir"])
    assert ref.name == stopped[0]
    assert np.load(logits_path(ref, "plain")).tobytes() == np.load(logits_path(out / "runs" / ref.name,
                                                                                "plain")).tobytes()
