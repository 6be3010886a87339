"""K runs in one array task (``hydra.launcher.runs_per_task=K``): K processes on one allocation.

A small model leaves a GPU (or a multi-core allocation) mostly idle; K independent processes
on it overlap their kernel launches and Python overhead. Each run is a whole, separate run: its
own process, folder, lock, checkpoint and heartbeat, so its logits are bit-identical to its solo
run with the same thread count (packing by vmap or grouped convolutions would change them, and
with K: not used). The CPUs of the task are split between the runs (``cpus // K`` threads each
when ``train.threads=0``, and each run pinned to its own cores where there are enough).

Signals: USR2/SIGTERM reach this process (and, through SLURM, usually the runs directly); it
passes them on to every run, each run checkpoints at its next iteration, and once ALL K stopped
the task requeues itself once (time limit) or stays stopped (SIGTERM): :func:`jobs.requeue_after_stop`.
One failing run never stops its siblings; the task fails at the end when any run failed (DONE
files, not SLURM's state, say which runs succeeded).

CUDA MPS (``hydra.launcher.mps``): with K > 1 on a GPU, an MPS control daemon lets the K
processes share the GPU concurrently instead of time-slicing it. ``auto`` starts one where
``nvidia-cuda-mps-control`` exists and a GPU is visible, ``true`` requires it, ``false`` never
starts it. Its pipe and log folders are per job (under /tmp: the pipe is a socket, which needs a
local file system and a short path); it is stopped at the end. Whether it ran is recorded in each
run's run.json (``packing``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import rundir
from ..config import threads_for
from . import fields
from .client import SubmissionError
from .joblog import job_label, log
from .jobs import RunJob, StopSignals, as_config, requeue_after_stop

MPS_MODES = ("auto", "true", "false")
MPS_CONTROL = "nvidia-cuda-mps-control"


def mps_mode(value: Any) -> str:
    """The launcher's ``mps`` value as one of MPS_MODES (YAML may give a bool)."""
    return str(value).strip().lower()


def check_packing(params: Mapping[str, Any]) -> tuple[int, str]:
    """(runs_per_task, mps) of the launcher config, or a SubmissionError saying what is valid."""
    k = fields.value(params, "runs_per_task")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SubmissionError(f"hydra.launcher.runs_per_task={k!r} is invalid: the number of runs each array task "
                              "trains at once, an integer >= 1 (default 1; docs/slurm.md, 'Several runs per task').")
    mode = mps_mode(fields.value(params, "mps"))
    if mode not in MPS_MODES:
        raise SubmissionError(f"hydra.launcher.mps={params.get('mps')!r} is invalid: valid values are "
                              f"{', '.join(MPS_MODES)}.")
    return k, mode


def split_cpus(cpus: Sequence[int], k: int) -> list[list[int]]:
    """The task's CPUs in K equal, disjoint shares (K >= len(cpus): every run shares all of them)."""
    cpus = sorted(cpus)
    share = len(cpus) // k
    if share < 1:
        return [list(cpus) for _ in range(k)]
    return [cpus[i * share:(i + 1) * share] for i in range(k)]


def _gpu_visible() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1", "NoDevFiles")
    return Path("/dev/nvidia0").exists()


def _device(cfg: Any) -> str:
    """A run's ``train.device`` (plain data or a DictConfig); ``auto`` when unset."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    return str(train.get("device", "auto") if train is not None else "auto")


class Mps:
    """An MPS control daemon for this job (start/stop), and what happened, for run.json.

    ``gpu``: whether the task's runs compute on a GPU (None: whether one is visible). Without one
    there is nothing to share (mps=auto starts nothing and says so; mps=true still insists)."""

    def __init__(self, mode: str, k: int, gpu: bool | None = None) -> None:
        self.mode = mode
        self.k = k
        self.gpu = gpu
        self.ran = False
        self.reason = ""
        self.base: Path | None = None
        self.env: dict[str, str] = {}

    def start(self) -> None:
        if self.mode == "false" or self.k < 2:
            self.reason = "off (mps=false)" if self.mode == "false" else "not needed (one run per task)"
            return
        gpu = _gpu_visible() if self.gpu is None else self.gpu
        if not gpu and self.mode == "auto":
            self.reason = ("not needed (no GPU visible: the runs train on CPU)" if not _gpu_visible() else
                           "not needed (the runs train on CPU: train.device=cpu)")
            log(f"MPS {self.reason}; the {self.k} runs share the task's CPUs")
            return
        exe = shutil.which(MPS_CONTROL)
        why = (f"{MPS_CONTROL} not on PATH" if exe is None else "no GPU visible" if not _gpu_visible() else "")
        if not why:
            self.base = Path(tempfile.mkdtemp(prefix=f"nondet-mps-{job_label().replace('?', 'x')}-"))
            self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.base / "pipe"),
                        "CUDA_MPS_LOG_DIRECTORY": str(self.base / "log")}
            for d in self.env.values():
                Path(d).mkdir()
            try:
                res = subprocess.run([str(exe), "-d"], env={**os.environ, **self.env}, capture_output=True,
                                     text=True, timeout=30)
                why = "" if res.returncode == 0 else f"{MPS_CONTROL} -d exited {res.returncode}: " \
                                                      f"{(res.stderr or res.stdout).strip()}"
            except (OSError, subprocess.TimeoutExpired) as e:
                why = f"{MPS_CONTROL} -d: {e}"
        if why:
            self.reason = why
            self._cleanup()
            if self.mode == "true":
                raise RuntimeError(f"hydra.launcher.mps=true but the MPS daemon could not start: {why}. "
                                   "Use mps=auto (runs share the GPU without MPS) or mps=false.")
            log(f"MPS not started ({why}); the {self.k} runs time-slice the GPU")
            return
        self.ran = True
        self.reason = "started"
        os.environ.update(self.env)  # the runs (child processes) find the daemon through these
        log(f"MPS control daemon started (pipe {self.env['CUDA_MPS_PIPE_DIRECTORY']})")

    def stop(self) -> None:
        if not self.ran:
            return
        try:
            subprocess.run([MPS_CONTROL], input="quit\n", env={**os.environ, **self.env}, capture_output=True,
                           text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"stopping the MPS daemon: {e}")
        for key in self.env:
            os.environ.pop(key, None)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def record(self) -> dict:
        return {"mode": self.mode, "ran": self.ran, "reason": self.reason}


def _child(job: RunJob, cpus: list[int], threads: int, packing: dict, conn: Connection) -> None:
    """One run of the pack, in its own process: train, and say how it ended."""
    signals = StopSignals()
    signals.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.signums)  # blocked by the packer until here
    if hasattr(os, "sched_setaffinity") and cpus:
        os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch's default pool when train.threads=0

    from ..run import task, train

    signals.keep_stopping(train.request_stop)
    log(f"run {job.run_id} -> {job.run_dir} (job {job_label()}, slot {packing['slot']} of {packing['k']}, "
         f"cpus {cpus}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')})")
    try:
        out = task.run(as_config(job.cfg))  # the pickle holds plain resolved data, as RunJob's does
        outcome: tuple[str, Any] = ("done", out)
    except train.Preempted as e:
        outcome = ("preempted", str(e))
    except BaseException as e:  # noqa: BLE001 - one run's failure is reported, its siblings go on
        outcome = ("failed", f"{type(e).__name__}: {e}")
    run_json = Path(job.run_dir) / rundir.RUN_JSON
    skipped = outcome[0] == "done" and str(outcome[1].get("state", "")).startswith("skipped")
    if run_json.is_file() and not skipped:  # a run DONE earlier keeps the record of the task that trained it
        rundir.RunRecord(run_json).update(packing=packing)
    log(f"run {job.run_id}: {outcome[0]}")
    conn.send(outcome)
    conn.close()


class PackJob:
    """What one array task executes when it holds K runs (pickled by submitit)."""

    def __init__(self, jobs: Sequence[RunJob], mps: str = fields.default("mps"),
                 max_requeue: int = fields.default("max_requeue")) -> None:
        self.jobs = list(jobs)
        self.mps = mps_mode(mps)
        self.max_requeue = max_requeue

    @property
    def run_ids(self) -> list[str]:
        return [j.run_id for j in self.jobs]

    def __call__(self) -> list[dict]:
        k = len(self.jobs)
        procs: list[multiprocessing.process.BaseProcess] = []

        def forward(signum: int) -> None:
            for p in procs:
                if p.pid and p.exitcode is None:
                    os.kill(p.pid, signum)

        signals = StopSignals()
        signals.install(forward)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        shares = split_cpus(cpus, k)
        threads = threads_for(0, cpus=len(cpus), runs_per_task=k)  # each run's torch pool when its train.threads=0
        gpu = _gpu_visible() and any(not _device(j.cfg).startswith("cpu") for j in self.jobs)
        mps = Mps(self.mps, k, gpu=gpu)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
        conns: list[Connection] = []
        shared = len(cpus) < k
        sharing = (f"the {k} runs share all {len(cpus)}, taking turns" if shared else
                   f"{len(shares[0])} each")
        log(f"task {job_label()}: {k} runs at once on cpus {cpus} ({sharing}; {threads} thread(s) per run where "
            f"train.threads=0): {', '.join(self.run_ids)}")
        mps.start()
        try:
            # signals stay blocked while a run starts: one arriving before its handlers exist would
            # kill it (the default action); it is delivered once the run unblocks them
            signal.pthread_sigmask(signal.SIG_BLOCK, signals.signums)
            try:
                for slot, (job, share) in enumerate(zip(self.jobs, shares)):
                    recv, send = ctx.Pipe(duplex=False)
                    packing = {"k": k, "slot": slot, "job": job_label(), "cpus": share, "cpus_shared": shared,
                               "mps": mps.record(), "runs": self.run_ids}
                    p = ctx.Process(target=_child, args=(job, share, threads, packing, send),
                                    name=f"nondet-run-{slot}")
                    p.start()
                    send.close()
                    procs.append(p)
                    conns.append(recv)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.signums)
            for signum in dict.fromkeys(signals.received):
                forward(signum)  # came while the runs were starting
            outcomes = self._wait(procs, conns, signals, forward)
        finally:
            mps.stop()
        return self._finish(outcomes, signals)

    @staticmethod
    def _wait(procs: list, conns: list[Connection], signals: StopSignals, forward: Any) -> list[tuple[str, Any]]:
        outcomes: list[tuple[str, Any] | None] = [None] * len(procs)
        last_forward = 0.0
        while any(p.exitcode is None for p in procs):
            wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
            if signals.received and time.monotonic() - last_forward > 1.0:
                # again, for a run that was still importing torch when the first one came
                for signum in dict.fromkeys(signals.received):
                    forward(signum)
                last_forward = time.monotonic()
        for i, (p, conn) in enumerate(zip(procs, conns)):
            p.join()
            try:
                outcomes[i] = conn.recv() if conn.poll() else None
            except EOFError:  # closed without a word: the process died
                outcomes[i] = None
            if outcomes[i] is None:
                outcomes[i] = ("failed", f"process exited with code {p.exitcode}")
        return [o for o in outcomes if o is not None]

    def _finish(self, outcomes: list[tuple[str, Any]], signals: StopSignals) -> list[dict]:
        failed = [(j.run_id, o[1]) for j, o in zip(self.jobs, outcomes) if o[0] == "failed"]
        if any(o[0] == "preempted" for o in outcomes):
            # every run has stopped (and checkpointed): requeue once for the whole task
            if requeue_after_stop(signals, self.max_requeue):
                os._exit(0)  # no result file: SLURM starts the task again; all K resume
            raise RuntimeError(f"stopped by a signal; runs checkpointed: "
                               f"{[j.run_id for j, o in zip(self.jobs, outcomes) if o[0] == 'preempted']}")
        if failed:
            lines = "; ".join(f"{rid}: {err}" for rid, err in failed)
            finished = [j.run_id for j, o in zip(self.jobs, outcomes) if o[0] == "done"]
            k = len(self.jobs)
            head = f"all {k} runs of this task failed" if len(failed) == k else f"{len(failed)} of {k} runs of this task failed"
            tail = (f"the other {len(finished)} finished (DONE): {', '.join(finished)}" if finished else
                    "none of them finished")
            raise RuntimeError(f"{head} ({lines}); {tail}")
        return [o[1] for o in outcomes]
