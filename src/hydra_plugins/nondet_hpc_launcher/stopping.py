"""Stopping a local sweep with Ctrl-C (SIGINT) or SIGTERM: every running job checkpoints and
stops, no further job starts, the launcher says what finished and what to rerun, and exits
non-zero (128 + the signal's number, as a shell reports a process ended by it).

- In the launching process, :class:`SweepStop` catches the two signals while jobs run; its handler
  only records the signal and sets the trainer's stop flag when a run trains in this process
  (``nondet_hpc.run.train.request_stop``: the loop checkpoints after the current iteration and
  raises ``Preempted``, so the run folder stays resumable).
- Worker processes (``n_jobs > 1``) run :func:`init_worker` first: the same two signals set the
  trainer's stop flag and mark the worker as stopping, so a job already queued to it is returned
  unstarted (:func:`is_stopping`) instead of training from scratch. The launcher sends SIGTERM to each
  worker when it is stopped (Ctrl-C reaches them from the terminal as well). A worker whose
  launcher died (SIGKILL) notices within a second, stops its job the same way and exits.

Rerunning the same command finishes the rest bit-identically: DONE runs are skipped and a stopped
run resumes from its checkpoint (docs/troubleshooting.md, "At the end of a local sweep").
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STATE = {"stopping": False, "busy": False}  # in a worker process


def _request_stop() -> None:
    """The trainer's stop flag, when the trainer is loaded in this process (never imports torch)."""
    train = sys.modules.get("nondet_hpc.run.train")
    if train is not None:
        train.request_stop()


# ------------------------------------------------------------------------------ the worker's side
def init_worker(pids: Any, launcher_pid: int) -> None:
    """A worker's first call: its pid to the launcher, the two signals handled, the launcher watched."""
    def handler(signum: int, frame: Any) -> None:
        _STATE["stopping"] = True
        _request_stop()

    for sig in SIGNALS:
        signal.signal(sig, handler)
    pids.put(os.getpid())
    threading.Thread(target=_watch_launcher, args=(launcher_pid,), daemon=True).start()


def _watch_launcher(launcher_pid: int) -> None:
    """Exit when the launcher is gone (killed): stop the running job at a checkpoint first."""
    while os.getppid() == launcher_pid:
        time.sleep(1.0)
    _STATE["stopping"] = True
    _request_stop()
    while _STATE["busy"]:
        time.sleep(0.2)
    os._exit(1)


def is_stopping() -> bool:
    """In a worker: the sweep is being stopped (start no job)."""
    return _STATE["stopping"]


def set_busy(busy: bool) -> None:
    _STATE["busy"] = busy


# ------------------------------------------------------------------------------ the launcher's side
class SweepStop:
    """SIGINT/SIGTERM while a sweep's jobs run: record it, stop the trainer here, tell the workers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.worker_pids: list[int] = []
        self._signalled: set[int] = set()
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "SweepStop":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        _request_stop()

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def add_workers(self, pids: Any) -> None:
        """Take the pids the workers announced (a multiprocessing SimpleQueue)."""
        while not pids.empty():
            self.worker_pids.append(pids.get())

    def stop_workers(self) -> None:
        for pid in self.worker_pids:
            if pid not in self._signalled:
                self._signalled.add(pid)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def exit(self, finished: Sequence[str], to_rerun: Sequence[str]) -> None:
        """Print what finished and what to rerun; end the process with 128 + the signal's number."""
        name = signal.Signals(self.signum).name if self.signum else "a signal"
        lines = [f"[nondet_hpc] sweep stopped by {name}: {len(finished)} job(s) finished, {len(to_rerun)} to rerun "
                 f"(stopped at a checkpoint, failed, or not started)."]
        lines += [f"  finished: {j}" for j in finished]
        lines += [f"  to rerun: {j}" for j in to_rerun]
        lines.append(f"[nondet_hpc] run the same command again to finish them: {rerun_command()}\n"
                     f"  (finished runs are skipped; a stopped run resumes from its checkpoint and ends bit-identical "
                     f"to an uninterrupted one)")
        print("\n".join(lines), flush=True)
        raise SystemExit(128 + int(self.signum or 0))


def rerun_command() -> str:
    argv = list(sys.argv)
    head = "python -m nondet_hpc" if argv and argv[0].replace(os.sep, "/").endswith("nondet_hpc/__main__.py") \
        else " ".join(shlex.quote(a) for a in [sys.executable, *argv[:1]])
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])
