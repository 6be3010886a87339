"""The next wave of a SLURM study, after its reducer: measure, decide, submit.

``python -m nondet_hpc.cluster.advance SWEEP_DIR --after-reducer RC`` is what the reducer job
(:class:`.jobs.ReduceJob`) runs after ``python -m nondet_hpc.reduce SWEEP_DIR``, as a command, so
the job code imports no wave code. Without a study in sweep.json it does nothing. With one, it
measures each group's precision (the reducer's per-model values, :mod:`nondet_hpc.analysis`),
lets the sweep layer decide and record the next wave (:mod:`nondet_hpc.sweep.waves`), and submits
it through :func:`.submit.submit_sweep` (chunking, submit limits, the afterany reducer), so every
guarantee of a plain submission holds. A failed sbatch stops the study with its message in the
reducer's log and in sweep.json; rerunning the sweep command continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from ..sweep import waves
from ..sweep.manifest import SweepError, latest_job, load_manifest, manifest_path, sweep_lock, write_manifest
from ..sweep.trust import TrustError, check_sweep_folder, verify_study
from .client import ACTIVE_STATES, DEFAULT_TIMEOUT_S, SlurmError, current_user, query_squeue
from .joblog import job_label
from .submit import submit_sweep


def measure(sweep_dir: Path, study: Mapping) -> dict[str, dict[str, float]]:
    """Each group's precision now, from the reducer's per-model values (:func:`.waves.precision`)."""
    from ..analysis.planning import sweep_groups

    return waves.precision(study, sweep_groups(Path(sweep_dir)))


def _still_queued(run_ids: Sequence[str], manifest: Mapping) -> bool:
    """Any of these runs' newest jobs still in SLURM's queue (squeue; our jobs only)."""
    queue = query_squeue(current_user(), DEFAULT_TIMEOUT_S)
    for rid in run_ids:
        job = latest_job(manifest["runs"].get(rid))
        q = queue.get(job["job_id"]) if job else None
        if q and q.state in ACTIVE_STATES:
            return True
    return False


@contextlib.contextmanager
def _outside_this_job() -> Iterator[None]:
    """Submit as from the login node: sbatch exports the caller's environment to the new jobs, and
    this reducer job's SLURM_* variables (SLURM_MEM_PER_NODE, SLURM_JOB_ID, ...) would leak into
    them (srun in the new task refuses SLURM_MEM_PER_CPU beside SLURM_MEM_PER_NODE)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def _untrusted(sweep_dir: Path, study: Mapping) -> str | None:
    """Why the next wave must not be submitted from this record, or None: others could change what
    its jobs run (permissions), or the recorded settings differ from what the owner's sweep command
    signed (:mod:`nondet_hpc.sweep.trust`)."""
    params = dict(study.get("params") or {})
    try:
        verify_study(study, sweep_dir)
        check_sweep_folder(sweep_dir, params.get("submitit_folder") or sweep_dir / "slurm",
                           trust_group=bool(params.get("trust_group")),
                           consequence="No wave was submitted; fix that, then rerun the same sweep command to go on.")
    except TrustError as e:
        return str(e)
    return None


def advance(sweep_dir: str | Path, *, by: str = "reducer job", echo: Callable[[str], None] = print) -> int:
    """After the reducer: decide the newest wave and submit the next one. 0 = fine, 1 = stopped
    on an error (the message is in sweep.json and printed). Safe to run twice."""
    sweep_dir = Path(sweep_dir).absolute()
    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir)
        study = (manifest or {}).get("study")
        if not study or not study["waves"]:
            return 0
        last = study["waves"][-1]
        if study["status"] != "running" or last.get("decided") or last["status"] != "submitted":
            echo(f"nondet_hpc: study: nothing to decide (status {study['status']}, wave {last['n']} "
                 f"{'decided' if last.get('decided') else last['status']})")
            return 0
        refused = _untrusted(sweep_dir, study)
        if refused:
            waves.stop(study, "stopped", refused)
            write_manifest(sweep_dir, manifest)
            waves.refresh_report(sweep_dir, study)
            echo(f"nondet_hpc: study stopped: {refused}")
            return 1
        missing = waves.not_done(sweep_dir, study, manifest)
        if missing and _still_queued(missing, manifest):
            # a repeated or early reducer run: the reducer queued behind this wave decides it
            echo(f"nondet_hpc: study: wave {last['n']} still has runs queued or running; its reducer decides it")
            return 0
        rc, nxt, planned = waves.decide_wave(sweep_dir, manifest, by, echo, measure)
        if rc or not nxt:
            return rc
        params = dict(study["params"])
    n = study["waves"][-1]["n"]
    try:
        with _outside_this_job():
            res = submit_sweep(sweep_dir, planned, params, argv=[by, f"wave {n}"], echo=echo)
    except (SlurmError, SweepError, OSError, ValueError) as e:
        waves.mark_submitted(sweep_dir, None, f"{type(e).__name__}: {e}")
        echo(f"nondet_hpc: study stopped: submission of wave {n} failed: {e}. Rerun the same sweep command to "
             "continue.")
        return 1
    waves.mark_submitted(sweep_dir, res.submission)
    echo(f"nondet_hpc: study: wave {n} submitted: " + "; ".join(f"{k}: seeds {v[0]}-{v[-1]}" for k, v in nxt.items()))
    return 0


def after_reduce(sweep_dir: str | Path, reducer_rc: int, *, by: str = "reducer job",
                 echo: Callable[[str], None] = print) -> int:
    """The reducer job's last step: nothing without a study; a failed reducer stops the study."""
    sweep_dir = Path(sweep_dir).absolute()
    try:
        if waves.load_study(sweep_dir) is None:
            return 0
    except (OSError, ValueError) as e:
        echo(f"nondet_hpc: study: cannot read {manifest_path(sweep_dir)}: {e}")
        return 1
    if reducer_rc == 0:
        return advance(sweep_dir, by=by, echo=echo)
    waves.reducer_failed(sweep_dir, reducer_rc, echo)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nondet_hpc.cluster.advance",
                                 description="The reducer job's last step: decide a study's wave and submit the next.")
    ap.add_argument("sweep_dir", help="the sweep folder (holds sweep.json)")
    ap.add_argument("--after-reducer", type=int, required=True, metavar="RC",
                    help="the exit code of python -m nondet_hpc.reduce SWEEP_DIR (not 0: the study stops)")
    args = ap.parse_args(argv)
    return after_reduce(args.sweep_dir, args.after_reducer, by=f"reducer job {job_label()}")


if __name__ == "__main__":
    sys.exit(main())
