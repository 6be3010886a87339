"""The local launcher (hydra_plugins/nondet_hpc_launcher/local.py): n_jobs at once, each job's
result the same as its solo run (same thread count), every failure seen by the end-of-sweep
report and the exit code, one block of output per job."""

from __future__ import annotations

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
