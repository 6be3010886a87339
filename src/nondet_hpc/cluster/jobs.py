"""What runs on the compute nodes: the callables submitit pickles into each job.

``RunJob`` trains one run (one array task), ``ReduceJob`` runs the reducer and then a study's
next-wave step, both as commands; ``pack.PackJob`` trains K runs of one task as K processes
(``hydra.launcher.runs_per_task``). With :mod:`.pack`, the only cluster modules that import the
trainer (:mod:`nondet_hpc.run`), and only inside the job, so submitting and status never import
torch. Job pickles name these classes by their import path and attributes: both stay as they
are (``nondet_hpc.slurm`` re-exports them under the path of pickles older still).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from . import fields
from .client import run_command
from .joblog import job_label, log


class RunJob:
    """What one array task executes (pickled by submitit): train one run, resumable.

    Signals: SLURM sends USR2 ``signal_delay_s`` before the time limit (``#SBATCH --signal``).
    The handler only sets a flag (``nondet_hpc.run.train.request_stop()``); the training loop
    finishes its iteration, writes checkpoint.pt and raises ``Preempted``; then this job requeues itself
    (``scontrol requeue``) and the next start resumes bit-exactly from the checkpoint. SIGTERM
    (scancel, preemption by SLURM) also checkpoints, but the job does not requeue itself: a
    cancelled job stays cancelled, and SLURM requeues preempted jobs on its own.
    """

    def __init__(self, cfg: Any, run_id: str, run_dir: str, max_requeue: int = fields.default("max_requeue")) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.run_dir = str(run_dir)
        self.max_requeue = max_requeue

    def __call__(self) -> dict:
        signals = StopSignals()
        signals.install()  # replace submitit's handlers (which would checkpoint inside the handler) first thing

        from ..run import task, train

        signals.keep_stopping(train.request_stop)
        log(f"run {self.run_id} -> {self.run_dir} (job {job_label()}, "
             f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')})")
        try:
            out = task.run(as_config(self.cfg))
        except train.Preempted:
            if requeue_after_stop(signals, self.max_requeue):
                # no result file: the job is not over; SLURM starts it again and it resumes
                os._exit(0)
            raise
        log(f"run {self.run_id}: {out.get('state') if isinstance(out, dict) else out}")
        return out


class StopSignals:
    """USR2 (time limit near) and SIGTERM (scancel, preemption) only set a flag.

    The training loop checkpoints at its next iteration boundary and raises ``Preempted``; what
    follows (requeue or not) depends on which signals came: :func:`requeue_after_stop`.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.event = threading.Event()
        self.usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        self._forward: list[Callable[[int], None]] = []

    @property
    def signums(self) -> tuple[int, int]:
        return self.usr, signal.SIGTERM

    def install(self, forward: Callable[[int], None] | None = None) -> None:
        """Handlers for USR2 and SIGTERM; ``forward(signum)`` is also called (the packer passes
        the signal on to its runs)."""
        if forward is not None:
            self._forward.append(forward)
        for signum in self.signums:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        # only flags: the training loop checkpoints at its next iteration boundary
        self.received.append(signum)
        self.event.set()
        for fn in self._forward:
            fn(signum)

    @property
    def time_limit(self) -> bool:
        """USR2 came and SIGTERM did not: the job may requeue itself."""
        return self.usr in self.received and signal.SIGTERM not in self.received

    def keep_stopping(self, request_stop: Callable[[], None]) -> None:
        """A signal that arrives while torch is imported or before the loop starts must not be
        lost (task.run clears the stop flag before training): re-assert it until the end."""
        def loop() -> None:
            self.event.wait()
            while True:
                request_stop()
                time.sleep(0.2)

        threading.Thread(target=loop, name="nondet-stop", daemon=True).start()


def requeue_after_stop(signals: StopSignals, max_requeue: int) -> bool:
    """After the run(s) checkpointed on a stop signal: requeue this job (``scontrol requeue``)
    when the signal was the time-limit warning and the requeue budget is left. True = requeued
    (the caller exits 0 without a result); False = stay stopped (the caller raises)."""
    if not signals.time_limit:
        log("stopped by SIGTERM (cancelled or preempted): checkpoint saved, not requeueing")
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeue:
        log(f"time limit again after {restarts} requeues (max_requeue={max_requeue}): "
             "checkpoint saved; rerun the sweep command to resume")
        return False
    job = os.environ.get("SLURM_JOB_ID", "")
    res = run_command(["scontrol", "requeue", job], timeout=60)
    if not res.ok:
        log(f"`scontrol requeue {job}` failed: {res.message()}")
        return False
    log(f"time limit near: checkpoint saved, job {job} requeued (restart {restarts + 1})")
    sys.stdout.flush()
    sys.stderr.flush()
    return True


class ReduceJob:
    """The reducer job: ``python -m nondet_hpc.reduce SWEEP_DIR``; fails when that fails. Then,
    also as a command, the next-wave step (``python -m nondet_hpc.cluster.advance``): in a study
    grown in waves it decides the wave and submits the next; without a study it does nothing."""

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = str(sweep_dir)

    def __call__(self) -> int:
        cmd = [sys.executable, "-m", "nondet_hpc.reduce", self.sweep_dir]
        log(f"running {shlex.join(cmd)}")
        sys.stdout.flush()
        rc = subprocess.call(cmd)
        study_rc = subprocess.call([sys.executable, "-m", "nondet_hpc.cluster.advance", self.sweep_dir,
                                    "--after-reducer", str(rc)])
        if rc != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}")
        if study_rc != 0:
            raise RuntimeError("the study stopped (message above and in sweep.json)")
        return rc


def as_config(cfg: Any) -> Any:
    """The launcher pickles a job's resolved config as plain data (fast for 1000s of jobs);
    ``task.run`` takes a DictConfig, in struct mode so a missing key still fails loudly."""
    if not isinstance(cfg, dict):
        return cfg  # a pickle of an earlier version: a DictConfig already
    from omegaconf import OmegaConf

    out = OmegaConf.create(cfg)
    OmegaConf.set_struct(out, True)
    return out
