"""SLURM submission for nondet_hpc: sweep.json manifest, array jobs through submitit, job state.

The Hydra launcher (hydra_plugins.nondet_hpc_launcher) composes one config per run and calls
:func:`submit_sweep`; ``python -m nondet_hpc.status`` calls :func:`sweep_status`;
``python -m nondet_hpc.cancel`` calls :func:`cancel_sweep`. Nothing here waits for a job.

Contract of SWEEP_DIR/sweep.json (written atomically: temp file + rename, under a lock; earlier
submissions are never dropped, every launch appends one submission record)::

    {"format": 1, "sweep_dir": ..., "created": ...,
     "runs": {RUN_ID: {"run_dir", "overrides", "config_hash",
                       "jobs": [{"submission", "job_id": "A_i", "array_job_id": "A", "index": i}]}},
     "submissions": [{"n", "time", "user", "host", "cwd", "argv", "status", "launcher",
                      "base_config", "varying_keys", "runs": [RUN_ID...],
                      "skipped": {"done", "active", "over_limit"},
                      "arrays": [{"job_id", "offset", "size", "parallelism", "dependency",
                                  "script", "command", "folder"}],
                      "reducer": {"job_id", "dependency", "script", "command"} | null,
                      "error": str (when sbatch refused)}],
     "cancellations": [{"time", "job_ids"}]}

Array task ``i`` of an array with ``offset o`` runs ``submission["runs"][o + i]``.

Success of a run is its DONE file, never SLURM's exit state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import getpass
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .. import rundir
from ..config import identity_items
from ..rundir import is_done, list_runs

MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
FORMAT = 1
DEFAULT_TIMEOUT_S = float(os.environ.get("NONDET_SLURM_TIMEOUT", "60"))
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize
# config keys that do not change what a run computes (bookkeeping): ignored by the identity checks
DEFAULT_IGNORE_KEYS = ("force", "out_dir", "train.checkpoint_every", "data.root", "data.download")

# SLURM job states (long names, as squeue %T and sacct print them)
ACTIVE_STATES = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
}
RUNNING_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"}
FAILED_STATES = {
    "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED",
}

# what python -m nondet_hpc.status counts
STATES = ("pending", "running", "requeued", "done", "failed", "unsubmitted", "unknown")


# =============================================================================== errors
class SlurmError(RuntimeError):
    """A SLURM command failed or could not be run."""


class SlurmUnavailable(SlurmError):
    """No SLURM client on this machine."""


class SubmissionError(SlurmError):
    """sbatch refused a job: carries SLURM's message and the command line."""


class SweepConfigMismatch(ValueError):
    """The sweep folder holds runs of another configuration."""


NO_SBATCH = (
    "`sbatch` is not on PATH: this machine cannot submit SLURM jobs.\n"
    "  Run the sweep here instead with the local launcher:  hydra/launcher=local\n"
    "  or submit from a SLURM login node (where `sbatch --version` works)."
)


def require_sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise SlurmUnavailable(NO_SBATCH)
    return path


# =============================================================================== commands
@dataclasses.dataclass
class CommandResult:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        return (self.stderr.strip() or self.stdout.strip() or f"exit code {self.returncode}")


def run_command(cmd: Sequence[str], timeout: float | None = None, input: str | None = None) -> CommandResult:
    """Run a SLURM client command with a timeout; never hangs, never raises on non-zero exit.

    Raises SlurmError when the program is missing or does not answer within ``timeout``.
    """
    cmd = [str(c) for c in cmd]
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as e:
        if cmd and cmd[0] == "sbatch":
            raise SlurmUnavailable(NO_SBATCH) from e
        raise SlurmError(f"{cmd[0]} is not on PATH (command: {shlex.join(cmd)})") from e
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"no answer from `{shlex.join(cmd)}` within {timeout:g} s") from e
    return CommandResult(cmd, p.returncode, p.stdout, p.stderr)


# =============================================================================== cluster facts
def parse_scontrol_config(text: str) -> dict[str, str]:
    """`scontrol show config` -> {Key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
    return out


def cluster_config(timeout: float | None = None) -> dict[str, str]:
    res = run_command(["scontrol", "show", "config"], timeout)
    if not res.ok:
        raise SlurmError(f"`scontrol show config` failed: {res.message()}")
    return parse_scontrol_config(res.stdout)


def max_array_size(timeout: float | None = None) -> int:
    """Tasks one array may have: MaxArraySize (the highest index is MaxArraySize - 1)."""
    try:
        value = cluster_config(timeout).get("MaxArraySize", "")
        return int(value.split()[0])
    except (SlurmError, ValueError, IndexError):
        return DEFAULT_MAX_ARRAY_SIZE


def parse_limit(value: str) -> int | None:
    value = (value or "").strip()
    if not value or value.upper() in {"UNLIMITED", "N/A"}:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def submit_limit(user: str, qos: str | None = None, timeout: float | None = None) -> int | None:
    """The user's MaxSubmitJobs (association, or the QOS's MaxSubmitPU); None when unlimited/unknown."""
    limits: list[int] = []
    try:
        res = run_command(["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}",
                           "format=MaxSubmit,QOS,DefaultQOS"], timeout)
        qos_names = set()
        if res.ok:
            for line in res.stdout.splitlines():
                parts = line.split("|")
                lim = parse_limit(parts[0]) if parts else None
                if lim is not None:
                    limits.append(lim)
                if len(parts) > 2 and parts[2]:
                    qos_names.add(parts[2])
        if qos:
            qos_names = {qos}
        res = run_command(["sacctmgr", "-n", "-P", "show", "qos", "format=Name,MaxSubmitPU"], timeout)
        if res.ok:
            for line in res.stdout.splitlines():
                parts = line.split("|")
                if len(parts) >= 2 and (parts[0] in qos_names or (not qos_names and parts[0] == "normal")):
                    lim = parse_limit(parts[1])
                    if lim is not None:
                        limits.append(lim)
    except SlurmError:
        return None
    return min(limits) if limits else None


# =============================================================================== squeue / sacct
@dataclasses.dataclass
class JobInfo:
    job_id: str  # "A_i" for array tasks, "N" otherwise
    raw_id: str = ""
    array_job_id: str = ""
    state: str = ""
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    elapsed: str = ""
    start: str = ""
    end: str = ""
    node: str = ""
    source: str = ""  # "squeue" | "sacct"
    stdout: str = ""  # squeue: the job's stdout path pattern (tells our jobs from recycled ids)

    def belongs_to(self, folder: str | os.PathLike | None) -> bool:
        """False when SLURM knows this id as a job writing elsewhere (an id reused after a
        cluster reset); True when it writes into ``folder`` or the path is unknown."""
        if not self.stdout or not folder:
            return True
        return self.stdout.startswith(str(folder).rstrip("/") + "/")


SQUEUE_FIELDS = ["JobArrayID", "JobID", "ArrayJobID", "State", "Reason", "RestartCnt", "TimeUsed",
                 "NodeList", "STDOUT"]


def squeue_command(user: str | None = None) -> list[str]:
    # "Field:|" = no width (nothing truncated: plain "Field" cuts at 20 characters), "|" after it
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
    cmd = ["squeue", "-h", "-r", "-O", fmt]
    if user:
        cmd += ["-u", user]
    return cmd


def _state_word(state: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'."""
    return (state or "").strip().split(" ")[0].upper()


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Output of :func:`squeue_command` -> {job id ("A_i" or "N"): JobInfo}; also keyed by raw id."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        line = line.rstrip()
        if line.endswith("|"):
            line = line[:-1]
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 6 or not parts[0]:
            continue
        jid, raw, array_id, state, reason, restarts = parts[:6]
        info = JobInfo(
            job_id=jid, raw_id=raw, array_job_id=array_id if "_" in jid else "",
            state=_state_word(state), reason=reason,
            restarts=int(restarts) if restarts.isdigit() else 0,
            elapsed=parts[6] if len(parts) > 6 else "", node=parts[7] if len(parts) > 7 else "",
            source="squeue", stdout="|".join(parts[8:]).strip() if len(parts) > 8 else "",
        )
        for key in _expand_array_id(jid):
            jobs[key] = dataclasses.replace(info, job_id=key)
        if raw and raw not in jobs:
            jobs[raw] = info
    return jobs


SACCT_FIELDS = ["JobID", "JobIDRaw", "State", "ExitCode", "Elapsed", "Start", "End", "NodeList"]


def sacct_command(job_ids: Iterable[str]) -> list[str]:
    ids = sorted({str(j).split("_")[0] for j in job_ids if j})
    return ["sacct", "-n", "-P", "-X", "-D", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(ids)]


def _expand_array_id(jid: str) -> list[str]:
    """'12_[3-5,7%2]' -> ['12_3', '12_4', '12_5', '12_7']; '12_4' -> ['12_4']; '12' -> ['12']."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", jid)
    if not m:
        return [jid]
    out = []
    spec = m.group(2).split("%")[0]
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi) + 1)]
        elif part.strip():
            out.append(f"{m.group(1)}_{int(part)}")
    return out


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """Output of :func:`sacct_command` (with -D: one line per attempt) -> latest attempt per job,
    with ``restarts`` = number of earlier REQUEUED attempts. Keyed like :func:`parse_squeue`."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or not parts[0] or "." in parts[0]:
            continue
        jid, raw, state, exit_code = parts[:4]
        for key in _expand_array_id(jid):
            prev = jobs.get(key)
            restarts = 0
            if prev is not None:
                restarts = prev.restarts + (1 if prev.state in REQUEUE_STATES else 0)
            info = JobInfo(
                job_id=key, raw_id=raw, array_job_id=key.split("_")[0] if "_" in key else "",
                state=_state_word(state), exit_code=exit_code, restarts=restarts,
                elapsed=parts[4] if len(parts) > 4 else "", start=parts[5] if len(parts) > 5 else "",
                end=parts[6] if len(parts) > 6 else "", node=parts[7] if len(parts) > 7 else "",
                source="sacct",
            )
            jobs[key] = info
            if raw and "_" in key and not raw.startswith(key.split("_")[0] + "_"):
                jobs.setdefault(raw, info)
    return jobs


def query_squeue(user: str | None = None, timeout: float | None = None) -> dict[str, JobInfo]:
    res = run_command(squeue_command(user), timeout)
    if not res.ok:
        raise SlurmError(f"`{shlex.join(res.cmd)}` failed: {res.message()}")
    return parse_squeue(res.stdout)


def query_sacct(job_ids: Iterable[str], timeout: float | None = None) -> dict[str, JobInfo]:
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    res = run_command(sacct_command(ids), timeout)
    if not res.ok:
        raise SlurmError(f"`{shlex.join(res.cmd)}` failed: {res.message()}")
    return parse_sacct(res.stdout)


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


# =============================================================================== manifest
def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / MANIFEST


def load_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    path = manifest_path(sweep_dir)
    if not path.exists():
        return None
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict) or "runs" not in data or "submissions" not in data:
        raise ValueError(f"{path} is not a nondet_hpc sweep manifest")
    return data


def new_manifest(sweep_dir: str | os.PathLike) -> dict:
    return {"format": FORMAT, "sweep_dir": str(Path(sweep_dir).resolve()), "created": _now_iso(),
            "runs": {}, "submissions": [], "cancellations": []}


def write_manifest(sweep_dir: str | os.PathLike, data: Mapping) -> Path:
    """Atomic write: temp file in the same folder, fsync, rename."""
    path = manifest_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def sweep_lock(sweep_dir: str | os.PathLike, timeout: float = 120.0) -> Iterator[None]:
    """Exclusive lock of a sweep folder (two launches of one sweep never interleave)."""
    path = Path(sweep_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SlurmError(f"{path} is locked by another submission for {timeout:g} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# =============================================================================== config identity
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists are leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        if not obj and prefix:
            out[prefix] = {}
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.update(flatten(v, key))
    else:
        out[prefix] = obj
    return out


def key_matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_hash(flat: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    ignore = list(ignore)
    items = {k: v for k, v in flat.items() if not key_matches(k, ignore)}
    return hashlib.sha256(_canonical(items).encode()).hexdigest()[:16]


def varying_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Leaf keys whose value differs between runs (or that only some runs have)."""
    if not flats:
        return []
    keys = set().union(*[set(f) for f in flats])
    out = []
    for k in sorted(keys):
        vals = {_canonical(f.get(k, "<absent>")) for f in flats}
        if len(vals) > 1:
            out.append(k)
    return out


def _explain_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> str:
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if _canonical(a) != _canonical(b):
            lines.append(f"    {k}: {_canonical(a)} (recorded) != {_canonical(b)} (now)")
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def check_compatible(manifest: Mapping, planned: Sequence["PlannedRun"], run_keys: Sequence[str],
                     ignore_keys: Sequence[str]) -> None:
    """Refuse to mix runs of two configurations in one sweep folder.

    Two checks: (1) a run id already recorded must come with the same config hash; (2) the
    base config (everything but the keys this sweep or an earlier one varied, ``run_keys`` and
    ``ignore_keys``) must equal the one recorded by earlier submissions.
    """
    sweep_dir = manifest.get("sweep_dir", "")
    hint = ("  Use another out_dir for a different configuration (e.g. out_dir=outputs/<name>), or "
            "delete the folder to start afresh.")
    for run in planned:
        rec = manifest["runs"].get(run.run_id)
        if rec and rec.get("jobs") and rec.get("config_hash") and rec["config_hash"] != run.config_hash:
            old = {}
            for sub in reversed(manifest["submissions"]):
                if run.run_id in sub.get("run_values", {}):
                    old = {**sub.get("base_config", {}), **sub["run_values"][run.run_id]}
                    break
            detail = _explain_diff(old, run.flat) if old else "    (the recorded config hash differs)"
            raise SweepConfigMismatch(
                f"sweep folder {sweep_dir} already has run {run.run_id} with another configuration:\n"
                f"{detail}\n{hint}")
    # only submissions that queued something constrain later ones (a refused sbatch ran nothing)
    earlier = [s for s in manifest["submissions"] if s.get("base_config") is not None and s.get("arrays")]
    if not earlier or not planned:
        return
    now_vary = varying_keys([r.flat for r in planned])
    skip = set(now_vary) | set(ignore_keys) | set(run_keys)
    for s in earlier:
        skip |= set(s.get("varying_keys", []))
    skip_list = sorted(skip)
    new_base = {k: v for k, v in planned[0].flat.items() if not key_matches(k, skip_list)}
    for s in earlier:
        old_base = {k: v for k, v in s["base_config"].items() if not key_matches(k, skip_list)}
        if _canonical(old_base) != _canonical(new_base):
            raise SweepConfigMismatch(
                f"sweep folder {sweep_dir} holds runs of another configuration "
                f"(submission {s.get('n')} of {s.get('time')}):\n{_explain_diff(old_base, new_base)}\n"
                f"  Keys allowed to differ between runs of one sweep folder: {', '.join(run_keys)} "
                f"(hydra.launcher.run_keys) and the keys a sweep varies.\n{hint}")


# =============================================================================== planned runs
@dataclasses.dataclass
class PlannedRun:
    """One composed job of a sweep: what the launcher hands to :func:`submit_sweep`.

    ``flat`` is the run's configuration as compared between submissions of one sweep folder: the
    trainer's identity items (``nondet_hpc.config.identity_items``), flattened to dotted keys.
    """

    run_id: str
    run_dir: Path
    overrides: list[str]
    cfg: Any  # resolved job config (DictConfig or dict) without the hydra node
    flat: dict[str, Any]  # flattened plain config (for identity checks)
    config_hash: str = ""
    force: bool = False


def plan_run(cfg: Any, overrides: Sequence[str], ignore_keys: Sequence[str] = DEFAULT_IGNORE_KEYS) -> PlannedRun:
    """Build a PlannedRun from a resolved job config (DictConfig or dict)."""
    from omegaconf import DictConfig, OmegaConf

    dcfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    plain = OmegaConf.to_container(dcfg, resolve=True)
    # what decides a run's result, as the trainer defines it (data, model, source, train, seed;
    # not the output folder, evaluation views or checkpoint interval)
    flat = dict(identity_items(dcfg))
    run_id = rundir.run_id(dcfg)
    run_dir = Path(rundir.run_dir(dcfg)).absolute()
    return PlannedRun(run_id=run_id, run_dir=run_dir, overrides=list(overrides), cfg=dcfg, flat=flat,
                      config_hash=config_hash(flat, ignore_keys), force=bool(plain.get("force", False)))


# =============================================================================== in-job callables
class RunJob:
    """What one array task executes (pickled by submitit): train one run, resumable.

    Signals: SLURM sends USR2 ``signal_delay_s`` before the time limit (``#SBATCH --signal``).
    The handler only calls ``nondet_hpc.train.request_stop()``; the training loop finishes its
    iteration, writes checkpoint.pt and raises ``Preempted``; then this job requeues itself
    (``scontrol requeue``) and the next start resumes bit-exactly from the checkpoint. SIGTERM
    (scancel, preemption by SLURM) also checkpoints, but the job does not requeue itself: a
    cancelled job stays cancelled, and SLURM requeues preempted jobs on its own.
    """

    def __init__(self, cfg: Any, run_id: str, run_dir: str, max_requeue: int = 20) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.run_dir = str(run_dir)
        self.max_requeue = max_requeue

    def __call__(self) -> dict:
        received: list[int] = []
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal API
            # only flags: the training loop checkpoints at its next iteration boundary
            received.append(signum)
            stop.set()

        # replace submitit's handlers (which would checkpoint inside the handler) first thing
        usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
        signal.signal(usr, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        from ..run import task, train

        def keep_stopping() -> None:
            # a signal that arrives while torch is imported or before the loop starts must not be
            # lost (task.run clears the stop flag before training): re-assert it until the end
            stop.wait()
            while True:
                train.request_stop()
                time.sleep(0.2)

        threading.Thread(target=keep_stopping, name="nondet-stop", daemon=True).start()
        _log(f"run {self.run_id} -> {self.run_dir} (job {_job_label()}, "
             f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')})")
        try:
            out = task.run(self.cfg)
        except train.Preempted:
            if signal.SIGTERM in received or usr not in received:
                _log("stopped by SIGTERM (cancelled or preempted): checkpoint saved, not requeueing")
                raise
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            if restarts >= self.max_requeue:
                _log(f"time limit again after {restarts} requeues (max_requeue={self.max_requeue}): "
                     "checkpoint saved; rerun the sweep command to resume")
                raise
            job = os.environ.get("SLURM_JOB_ID", "")
            res = run_command(["scontrol", "requeue", job], timeout=60)
            if not res.ok:
                _log(f"`scontrol requeue {job}` failed: {res.message()}")
                raise
            _log(f"time limit near: checkpoint saved, job {job} requeued (restart {restarts + 1})")
            sys.stdout.flush()
            sys.stderr.flush()
            # no result file: the job is not over; SLURM starts it again and it resumes
            os._exit(0)
        _log(f"run {self.run_id}: {out.get('state') if isinstance(out, dict) else out}")
        return out


class ReduceJob:
    """The reducer job: ``python -m nondet_hpc.reduce SWEEP_DIR``; fails when that fails."""

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = str(sweep_dir)

    def __call__(self) -> int:
        cmd = [sys.executable, "-m", "nondet_hpc.reduce", self.sweep_dir]
        _log(f"running {shlex.join(cmd)}")
        sys.stdout.flush()
        rc = subprocess.call(cmd)
        if rc != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}")
        return rc


def _job_label() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return os.environ.get("SLURM_JOB_ID", "?")


def _log(msg: str) -> None:
    print(f"[nondet_hpc.slurm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# =============================================================================== sbatch scripts
def _make_sbatch_string(**kwargs: Any) -> str:
    from submitit.slurm.slurm import _make_sbatch_string as make

    return make(**kwargs)


def job_parameters(params: Mapping[str, Any], *, reducer: bool = False) -> dict[str, Any]:
    """Launcher config -> keyword arguments of submitit's sbatch-script writer."""
    p = dict(params)
    if reducer:
        r = dict(p.get("reducer") or {})
        out: dict[str, Any] = {
            "job_name": f"{p.get('job_name', 'nondet')}-reduce",
            "partition": r.get("partition") or p.get("partition"),
            "account": r.get("account") or p.get("account"),
            "qos": r.get("qos") or p.get("qos"),
            "cpus_per_task": r.get("cpus_per_task", 1),
            "time": int(r.get("timeout_min", 60)),
            "mem": _mem(r.get("mem_gb")),
            "setup": list(p.get("setup") or []),
            "additional_parameters": dict(r.get("additional_parameters") or {}),
            "use_srun": p.get("use_srun", True),
            "srun_args": list(p.get("srun_args") or []) or None,
            "signal_delay_s": 60,
            "wckey": "",
        }
        if p.get("hold"):
            out["additional_parameters"]["hold"] = True
        return {k: v for k, v in out.items() if v is not None}
    extra: dict[str, Any] = {"requeue": True}
    if not p.get("use_srun", True):
        # without srun the run is the batch shell's child: `--signal` without B: reaches job steps
        # only, so signal the batch shell, which `exec`s python (python_command)
        extra["signal"] = f"B:USR2@{int(p.get('signal_delay_s', 120))}"
    extra.update(dict(p.get("additional_parameters") or {}))
    if p.get("hold"):
        extra["hold"] = True
    out = {
        "job_name": p.get("job_name", "nondet"),
        "partition": p.get("partition"),
        "account": p.get("account"),
        "qos": p.get("qos"),
        "constraint": p.get("constraint"),
        "gres": p.get("gres"),
        "gpus_per_node": p.get("gpus_per_node"),
        "exclude": p.get("exclude"),
        "nodelist": p.get("nodelist"),
        "cpus_per_task": p.get("cpus_per_task", 1),
        "mem": _mem(p.get("mem_gb")),
        "time": int(p.get("timeout_min", 60)),
        "signal_delay_s": int(p.get("signal_delay_s", 120)),
        "setup": list(p.get("setup") or []),
        "additional_parameters": extra,
        "use_srun": p.get("use_srun", True),
        "srun_args": list(p.get("srun_args") or []) or None,
        "wckey": "",
    }
    return {k: v for k, v in out.items() if v is not None}


def _mem(mem_gb: Any) -> str | None:
    if mem_gb is None:
        return None
    mem_gb = float(mem_gb)
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def python_command(params: Mapping[str, Any], folder: Path) -> str:
    python = params.get("python") or shlex.quote(sys.executable)
    exec_ = "" if params.get("use_srun", True) else "exec "
    return f"{exec_}{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(params: Mapping[str, Any], folder: Path, *, array_size: int | None = None,
                  parallelism: int | None = None, reducer: bool = False,
                  dependency: str | None = None) -> str:
    """The sbatch script of a training array (``array_size`` tasks) or of the reducer job."""
    kw = job_parameters(params, reducer=reducer)
    if dependency:
        kw["dependency"] = dependency
    if array_size is not None:
        kw["map_count"] = int(array_size)
        kw["array_parallelism"] = int(parallelism or array_size)
    text = _make_sbatch_string(command=python_command(params, folder), folder=folder, **kw)
    # submitit's wckey default would tag every job "submitit"; an empty one is dropped here
    return "\n".join(line for line in text.splitlines() if line != "#SBATCH --wckey=''") + "\n"


def sbatch_flags(script: str) -> list[str]:
    """The #SBATCH lines of a script as command-line flags (what sbatch will apply)."""
    return [line[len("#SBATCH "):].strip() for line in script.splitlines() if line.startswith("#SBATCH ")]


def sbatch(script_path: Path, timeout: float | None = None, test_only: bool = False) -> str:
    """Submit a script; return the job id. SubmissionError carries SLURM's message and the command.

    ``test_only``: ``sbatch --test-only`` (SLURM validates the job, nothing is queued); returns "".
    """
    require_sbatch()
    cmd = ["sbatch", "--test-only" if test_only else "--parsable", str(script_path)]
    res = run_command(cmd, timeout)
    if test_only and res.ok:
        return ""
    if not res.ok:
        raise SubmissionError(
            f"SLURM refused the job (sbatch exit code {res.returncode}):\n"
            + "\n".join("  " + line for line in res.message().splitlines())
            + f"\n  command: {shlex.join(cmd)}\n  script:  {script_path}\n"
            "  Check hydra.launcher.partition / account / qos / gres (`sinfo -s` lists partitions, "
            "`sacctmgr show assoc user=$USER` your accounts and QOS).")
    m = re.match(r"\s*(\d+)", res.stdout)
    if not m:
        raise SubmissionError(f"cannot read a job id from sbatch's output {res.stdout!r} "
                              f"(command: {shlex.join(cmd)})")
    return m.group(1)


# =============================================================================== submission
@dataclasses.dataclass
class SubmissionResult:
    sweep_dir: Path
    submission: int | None
    submitted: list[str]  # run ids
    done: list[str]
    active: list[str]
    over_limit: list[str]
    arrays: list[dict]
    reducer: dict | None
    duplicates: list[str] = dataclasses.field(default_factory=list)
    superseded: list[str] = dataclasses.field(default_factory=list)

    def job_ids(self) -> list[str]:
        ids = [a["job_id"] for a in self.arrays]
        if self.reducer:
            ids.append(self.reducer["job_id"])
        return ids


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(o, min(size, n - o)) for o in range(0, n, size)]


def latest_job(run_rec: Mapping | None) -> dict | None:
    if not run_rec or not run_rec.get("jobs"):
        return None
    return run_rec["jobs"][-1]


def submit_sweep(sweep_dir: str | os.PathLike, planned: Sequence[PlannedRun], params: Mapping[str, Any],
                 *, argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> SubmissionResult:
    """Submit the runs of a sweep that are neither done nor queued/running; record everything.

    ``params`` is the launcher config (see hydra_plugins.nondet_hpc_launcher.config). Returns
    after sbatch has accepted the arrays and the reducer job; never waits for a job.
    """
    import cloudpickle  # submitit's pickler (by reference for importable classes)
    from submitit.core.utils import DelayedSubmission, JobPaths

    params = dict(params)
    require_sbatch()
    timeout = float(params.get("command_timeout_s") or DEFAULT_TIMEOUT_S)
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(str(params.get("submitit_folder") or sweep_dir / "slurm")).absolute()
    run_keys = list(params.get("run_keys") or [])
    ignore_keys = list(params.get("ignore_keys") or DEFAULT_IGNORE_KEYS)
    user = current_user()

    # one run per run id (two overrides may name the same run)
    unique: dict[str, PlannedRun] = {}
    duplicates = []
    for run in planned:
        if run.run_id in unique:
            duplicates.append(run.run_id)
        else:
            unique[run.run_id] = run
    runs = list(unique.values())

    with sweep_lock(sweep_dir):
        manifest = load_manifest(sweep_dir) or new_manifest(sweep_dir)
        check_compatible(manifest, runs, run_keys, ignore_keys)

        # what is done / queued or running already
        recorded = [latest_job(manifest["runs"].get(r.run_id)) for r in runs]
        queue: dict[str, JobInfo] = {}
        if any(recorded) or any(s.get("arrays") for s in manifest["submissions"]):
            queue = query_squeue(user, timeout)  # raises when SLURM does not answer: submit nothing
        folders = {sub["n"]: sub.get("folder") for sub in manifest["submissions"]}
        done, active, todo = [], [], []
        for run, job in zip(runs, recorded):
            q = queue.get(job["job_id"]) if job else None
            if q and q.state in ACTIVE_STATES and q.belongs_to(folders.get(job.get("submission"))):
                active.append(run)
            elif is_done(run.run_dir) and not run.force:
                done.append(run)
            else:
                todo.append(run)

        over_limit: list[PlannedRun] = []
        reducer_cfg = dict(params.get("reducer") or {})
        want_reducer = bool(reducer_cfg.get("enabled", True))
        if todo:
            limit = params.get("max_submit")
            if limit is None:
                limit = submit_limit(user, params.get("qos"), timeout)
            if limit and limit > 0:
                in_queue = len({j.job_id for j in query_squeue(user, timeout).values()})
                room = limit - in_queue - (1 if want_reducer else 0)
                if room <= 0:
                    raise SubmissionError(
                        f"your submit limit is {limit} jobs (MaxSubmitJobs; array tasks count one each) and "
                        f"{in_queue} of your jobs are queued already: no room for the {len(todo)} runs of "
                        f"this sweep. Rerun the same command when jobs have finished (it submits only "
                        f"what is missing), or set hydra.launcher.max_submit.")
                if len(todo) > room:
                    todo, over_limit = todo[:room], todo[room:]

        sub_n = len(manifest["submissions"])
        flats = [r.flat for r in runs]
        vary = varying_keys(flats)
        record: dict[str, Any] = {
            "n": sub_n, "time": _now_iso(), "user": user, "host": socket.gethostname(),
            "cwd": os.getcwd(), "argv": list(argv if argv is not None else sys.argv),
            "status": "planned", "launcher": _jsonable(params), "folder": str(folder),
            "base_config": {k: v for k, v in flats[0].items() if k not in set(vary)} if flats else {},
            "varying_keys": vary,
            "runs": [r.run_id for r in todo],
            "skipped": {"done": [r.run_id for r in done], "active": [r.run_id for r in active],
                        "over_limit": [r.run_id for r in over_limit], "duplicates": duplicates},
            "arrays": [], "reducer": None,
            # a run's full config = base_config + its run_values (kept small for 1000s of runs)
            "run_values": {r.run_id: {k: r.flat[k] for k in vary if k in r.flat} for r in todo},
        }
        for r in runs:
            rec = manifest["runs"].setdefault(r.run_id, {"run_dir": str(r.run_dir), "overrides": r.overrides,
                                                          "config_hash": r.config_hash, "jobs": []})
            rec.update(run_dir=str(r.run_dir), overrides=r.overrides, config_hash=r.config_hash)
        result = SubmissionResult(sweep_dir, None, [], [r.run_id for r in done], [r.run_id for r in active],
                                  [r.run_id for r in over_limit], [], None, duplicates)
        if not todo:
            write_manifest(sweep_dir, manifest)  # runs recorded, no submission record
            return result

        manifest["submissions"].append(record)
        write_manifest(sweep_dir, manifest)  # sweep.json exists before anything is submitted
        result.submission = sub_n

        folder.mkdir(parents=True, exist_ok=True)
        reducer_elsewhere = any((reducer_cfg.get(k) or params.get(k)) != params.get(k)
                                for k in ("partition", "account", "qos"))
        if want_reducer and reducer_elsewhere:
            # the reducer goes to another partition/account/qos: let SLURM check it before any
            # array is queued, so a typo there never leaves arrays without their reducer
            script_path = folder / f"sub{sub_n:03d}_reduce.sh"
            script_path.write_text(sbatch_script(params, folder, reducer=True))
            try:
                sbatch(script_path, timeout, test_only=True)
            except SlurmError as e:
                record["status"] = "failed"
                record["error"] = f"reducer job: {e}"
                write_manifest(sweep_dir, manifest)
                raise SubmissionError(f"reducer job (hydra.launcher.reducer.*): {e}") from None
        size = int(params.get("max_array_size") or max_array_size(timeout))
        chunks = _chunks(len(todo), max(1, size))
        par = params.get("array_parallelism")
        par = int(par) if par else None
        chain = par is not None and len(chunks) > 1 and par < len(todo)
        max_requeue = int(params.get("max_requeue", 20))
        prev_array = None
        try:
            for c, (offset, n) in enumerate(chunks):
                dependency = f"afterany:{prev_array}" if chain and prev_array else None
                script = sbatch_script(params, folder, array_size=n, parallelism=par, dependency=dependency)
                script_path = folder / f"sub{sub_n:03d}_array{c:02d}.sh"
                script_path.write_text(script)
                tmp_pickles = []
                for run in todo[offset:offset + n]:
                    tmp = folder / f".tmp_{uuid.uuid4().hex}.pkl"
                    ds = DelayedSubmission(RunJob(run.cfg, run.run_id, str(run.run_dir), max_requeue))
                    ds.set_timeout(int(params.get("timeout_min", 60)), max_requeue)
                    with tmp.open("wb") as f:
                        cloudpickle.dump(ds, f)
                    tmp_pickles.append(tmp)
                array_id = sbatch(script_path, timeout)
                for i, tmp in enumerate(tmp_pickles):
                    tmp.rename(JobPaths(folder, job_id=f"{array_id}_{i}").submitted_pickle)
                arr = {"job_id": array_id, "offset": offset, "size": n, "parallelism": par or n,
                       "dependency": dependency, "script": str(script_path),
                       "command": f"sbatch --parsable {script_path}"}
                record["arrays"].append(arr)
                result.arrays.append(arr)
                for i, run in enumerate(todo[offset:offset + n]):
                    manifest["runs"][run.run_id]["jobs"].append(
                        {"submission": sub_n, "job_id": f"{array_id}_{i}", "array_job_id": array_id, "index": i})
                    result.submitted.append(run.run_id)
                write_manifest(sweep_dir, manifest)
                prev_array = array_id
        except SlurmError as e:
            for tmp in folder.glob(".tmp_*.pkl"):
                tmp.unlink(missing_ok=True)
            record["status"] = "failed" if not record["arrays"] else "partial"
            record["error"] = str(e)
            write_manifest(sweep_dir, manifest)
            if record["arrays"]:
                echo(f"nondet_hpc: submitted {len(result.submitted)} runs before SLURM refused the rest; "
                     "no reducer job queued.")
            raise

        if want_reducer:
            # afterany: the arrays of this submission + the still-queued arrays of earlier ones
            deps = [a["job_id"] for a in record["arrays"]]
            earlier_reducers = []
            for s in manifest["submissions"][:-1]:
                for a in s.get("arrays", []):
                    if any(k.split("_")[0] == a["job_id"] and j.state in ACTIVE_STATES and j.belongs_to(s.get("folder"))
                           for k, j in queue.items()):
                        deps.append(a["job_id"])
                red = s.get("reducer") or {}
                rq = queue.get(red.get("job_id", ""))
                if rq and rq.state == "PENDING" and rq.belongs_to(s.get("folder")):
                    earlier_reducers.append(red["job_id"])
            dependency = "afterany:" + ":".join(dict.fromkeys(deps))
            script = sbatch_script(params, folder, reducer=True, dependency=dependency)
            script_path = folder / f"sub{sub_n:03d}_reduce.sh"
            script_path.write_text(script)
            tmp = folder / f".tmp_{uuid.uuid4().hex}.pkl"
            ds = DelayedSubmission(ReduceJob(str(sweep_dir)))
            ds.set_timeout(int(reducer_cfg.get("timeout_min", 60)), 0)
            with tmp.open("wb") as f:
                cloudpickle.dump(ds, f)
            try:
                red_id = sbatch(script_path, timeout)
            except SlurmError as e:
                tmp.unlink(missing_ok=True)
                record["status"] = "partial"
                record["error"] = f"reducer job: {e}"
                write_manifest(sweep_dir, manifest)
                raise
            tmp.rename(JobPaths(folder, job_id=red_id).submitted_pickle)
            record["reducer"] = {"job_id": red_id, "dependency": dependency, "script": str(script_path),
                                 "command": f"sbatch --parsable {script_path}"}
            result.reducer = record["reducer"]
            if earlier_reducers:
                # superseded: the new reducer waits for everything the old ones waited for
                run_command(["scancel", *earlier_reducers], timeout)
                record["superseded_reducers"] = earlier_reducers
                result.superseded = earlier_reducers
        record["status"] = "submitted"
        write_manifest(sweep_dir, manifest)
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def describe_submission(res: SubmissionResult, params: Mapping[str, Any]) -> str:
    """What the launcher prints: job ids, the sweep folder and the commands to follow it."""
    sd = shlex.quote(str(res.sweep_dir))
    n_all = len(res.submitted) + len(res.done) + len(res.active) + len(res.over_limit)
    lines = [f"nondet_hpc: sweep {res.sweep_dir}: {n_all} runs: {len(res.done)} done, "
             f"{len(res.active)} queued/running, {len(res.submitted)} submitted now"]
    if res.duplicates:
        lines.append(f"  {len(res.duplicates)} overrides named a run already in this sweep (ignored)")
    part = params.get("partition") or "(default partition)"
    for a in res.arrays:
        dep = f", after {a['dependency']}" if a.get("dependency") else ""
        lines.append(f"  array job {a['job_id']}: {a['size']} tasks (runs {a['offset']}-"
                     f"{a['offset'] + a['size'] - 1} of submission {res.submission}, at most "
                     f"{a['parallelism']} at once), partition {part}{dep}")
    if res.reducer:
        rpart = (params.get("reducer") or {}).get("partition") or part
        lines.append(f"  reducer job {res.reducer['job_id']} ({res.reducer['dependency']}), partition {rpart}: "
                     f"python -m nondet_hpc.reduce {sd}")
    if res.superseded:
        lines.append(f"  cancelled the pending reducer job(s) {' '.join(res.superseded)} of earlier submissions "
                     "(the new one waits for their arrays too)")
    if res.over_limit:
        lines.append(f"  NOT submitted: {len(res.over_limit)} runs over your submit limit; rerun the same "
                     "command when jobs have finished (it submits only what is missing)")
    if params.get("hold") and res.job_ids():
        lines.append(f"  jobs are HELD: release with  scontrol release {' '.join(res.job_ids())}")
    if not res.arrays:
        lines.append("  nothing to submit" + ("" if res.active else
                     f" (report: python -m nondet_hpc.reduce {sd})"))
    lines.append(f"  manifest: {manifest_path(res.sweep_dir)}")
    lines.append(f"  status:   python -m nondet_hpc.status {sd}")
    lines.append(f"  cancel:   python -m nondet_hpc.cancel {sd}")
    return "\n".join(lines)


# =============================================================================== status
@dataclasses.dataclass
class RunStatus:
    run_id: str
    run_dir: str
    state: str  # one of STATES
    job_id: str = ""
    slurm_state: str = ""
    exit_code: str = ""
    reason: str = ""
    restarts: int = 0
    epoch: int | None = None
    epochs: int | None = None
    progress: float | None = None
    eta_s: float | None = None
    heartbeat_age_s: float | None = None
    run_state: str = ""  # run.json "state"
    error: str = ""
    log_out: str = ""
    log_err: str = ""
    log_tail: list[str] = dataclasses.field(default_factory=list)
    note: str = ""


def read_run_json(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        with path.open() as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def heartbeat_progress(hb: Mapping[str, Any]) -> float | None:
    """Fraction of training done from run.json's heartbeat: optimizer steps done / total steps
    (``step``/``steps``), else epochs done / epochs."""
    try:
        if hb.get("step") is not None and hb.get("steps"):
            return max(0.0, min(1.0, float(hb["step"]) / float(hb["steps"])))
        if hb.get("epoch") is not None and hb.get("epochs"):
            return max(0.0, min(1.0, float(hb["epoch"]) / float(hb["epochs"])))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def _log_tail(path: Path, n: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
        return data.splitlines()[-n:]
    except OSError:
        return []


def task_logs(folder: str | os.PathLike, job_id: str) -> tuple[Path, Path]:
    """submitit's log files of a job ("A_i" for array tasks)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def sweep_status(sweep_dir: str | os.PathLike, *, timeout: float | None = None, tail: int = 8,
                 stale_s: float = 900.0) -> dict:
    """State of every run of a sweep, from DONE files, squeue, sacct and run.json.

    sacct gives the final state of finished jobs; when accounting is unavailable (or slow), squeue
    and the run folder are used instead. Every SLURM command has a timeout.
    """
    sweep_dir = Path(sweep_dir).absolute()
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        if (sweep_dir / "runs").is_dir():
            return _local_status(sweep_dir, stale_s)
        raise FileNotFoundError(f"{sweep_dir} holds neither sweep.json (written by hydra/launcher=slurm) "
                                "nor runs/: not a sweep folder")
    folders = {s["n"]: s.get("folder", str(sweep_dir / "slurm")) for s in manifest["submissions"]}
    job_ids = [j["job_id"] for r in manifest["runs"].values() for j in r.get("jobs", [])]
    reducer_ids = [s["reducer"]["job_id"] for s in manifest["submissions"] if s.get("reducer")]
    errors: dict[str, str] = {}
    queue: dict[str, JobInfo] | None = None
    acct: dict[str, JobInfo] | None = None
    if job_ids or reducer_ids:
        try:
            queue = query_squeue(current_user(), timeout)
        except SlurmError as e:
            errors["squeue"] = str(e)
        try:
            acct = query_sacct(job_ids + reducer_ids, timeout)
        except SlurmError as e:
            errors["sacct"] = str(e)
    now = time.time()
    runs: list[RunStatus] = []
    for run_id, rec in manifest["runs"].items():
        run_dir = rec.get("run_dir", "")
        st = RunStatus(run_id=run_id, run_dir=run_dir, state="unknown")
        info = read_run_json(run_dir)
        st.run_state = str(info.get("state", ""))
        hb = info.get("heartbeat") or {}
        job = latest_job(rec)
        if job:
            st.job_id = job["job_id"]
            out, err = task_logs(folders.get(job.get("submission"), sweep_dir / "slurm"), job["job_id"])
            st.log_out, st.log_err = str(out), str(err)
        q = (queue or {}).get(st.job_id) if st.job_id else None
        if q and job and not q.belongs_to(folders.get(job.get("submission"))):
            q = None  # the id now belongs to someone else's job (cluster reset)
        a = (acct or {}).get(st.job_id) if st.job_id else None
        if a:
            st.exit_code, st.restarts = a.exit_code, a.restarts
        if q:
            st.slurm_state, st.reason = q.state, q.reason
            st.restarts = max(st.restarts, q.restarts)
        elif a:
            st.slurm_state = a.state
        if is_done(Path(run_dir)):
            st.state = "done"
        elif not job:
            st.state = "unsubmitted"
        elif q and q.state in ACTIVE_STATES:
            if q.state in RUNNING_STATES:
                st.state = "running"
            elif q.state in REQUEUE_STATES or st.restarts > 0 or st.run_state == "preempted":
                st.state = "requeued"
            else:
                st.state = "pending"
        elif a and a.state in ACTIVE_STATES and queue is None:
            # squeue failed, accounting says the job is alive
            st.state = ("running" if a.state in RUNNING_STATES else
                        "requeued" if a.state in REQUEUE_STATES or a.restarts else "pending")
        elif a:
            st.state = "failed"
            if a.state == "COMPLETED":
                st.note = "SLURM says COMPLETED but the run has no DONE file"
        elif queue is not None:
            # in neither squeue nor sacct (accounting off or purged): the job is over
            st.state = "failed"
            st.slurm_state = st.slurm_state or "GONE"
            st.note = "job left the queue without DONE" + (f" (run.json: {st.run_state})" if st.run_state else "")
        else:
            st.state = "unknown"
            st.note = "SLURM did not answer; run.json state: " + (st.run_state or "none")
        if st.state == "running" or (st.state == "unknown" and st.run_state == "running"):
            st.epoch, st.epochs = hb.get("epoch"), hb.get("epochs")
            st.progress = heartbeat_progress(hb)
            if hb.get("time"):
                st.heartbeat_age_s = max(0.0, now - float(hb["time"]))
                if st.heartbeat_age_s > stale_s:
                    st.note = f"no heartbeat for {st.heartbeat_age_s / 60:.0f} min"
            el = hb.get("elapsed_s")
            if st.progress and el and st.progress > 0:
                st.eta_s = max(0.0, float(el) * (1 - st.progress) / st.progress - (st.heartbeat_age_s or 0.0))
        if st.state == "failed":
            st.error = str(info.get("error", ""))[:2000]
            if st.log_err:
                st.log_tail = _log_tail(Path(st.log_err), tail)
        runs.append(st)
    counts = {s: 0 for s in STATES}
    for r in runs:
        counts[r.state] += 1
    reducer = None
    if reducer_ids:
        rid = reducer_ids[-1]
        sub = [s for s in manifest["submissions"] if (s.get("reducer") or {}).get("job_id") == rid][-1]
        q = (queue or {}).get(rid)
        if q and not q.belongs_to(sub.get("folder")):
            q = None
        a = (acct or {}).get(rid)
        out, err = task_logs(sub.get("folder", sweep_dir / "slurm"), rid)
        reducer = {"job_id": rid, "state": (q.state if q else a.state if a else "GONE" if queue is not None else "UNKNOWN"),
                   "exit_code": a.exit_code if a else "", "log_out": str(out), "log_err": str(err),
                   "report": str(sweep_dir / "report"), "report_exists": (sweep_dir / "report").is_dir()}
    return {"sweep_dir": str(sweep_dir), "time": _now_iso(), "counts": counts,
            "runs": [dataclasses.asdict(r) for r in runs], "reducer": reducer,
            "submissions": len(manifest["submissions"]), "errors": errors,
            "accounting": "sacct" if acct is not None else ("squeue+run folder" if queue is not None else "run folder")}


def _local_status(sweep_dir: Path, stale_s: float) -> dict:
    """Status of a sweep folder without sweep.json (local launcher): from the run folders only."""
    now = time.time()
    runs = []
    for run_dir in list_runs(sweep_dir):
        info = read_run_json(run_dir)
        st = RunStatus(run_id=run_dir.name, run_dir=str(run_dir), state="unknown", run_state=str(info.get("state", "")))
        hb = info.get("heartbeat") or {}
        if is_done(run_dir):
            st.state = "done"
        elif st.run_state == "running":
            age = now - float(hb.get("time") or info.get("updated") or 0)
            st.state = "running" if age < stale_s else "failed"
            if st.state == "failed":
                st.note = f"run.json says running but nothing was written for {age / 60:.0f} min"
        elif st.run_state in ("failed", "preempted"):
            st.state = "failed"
            st.note = "preempted: rerunning the sweep resumes it" if st.run_state == "preempted" else ""
            st.error = str(info.get("error", ""))[:2000]
        if st.state == "running":
            st.epoch, st.epochs = hb.get("epoch"), hb.get("epochs")
            st.progress = heartbeat_progress(hb)
            if hb.get("time"):
                st.heartbeat_age_s = max(0.0, now - float(hb["time"]))
            el = hb.get("elapsed_s")
            if st.progress and el:
                st.eta_s = max(0.0, float(el) * (1 - st.progress) / st.progress - (st.heartbeat_age_s or 0.0))
        runs.append(st)
    counts = {s: 0 for s in STATES}
    for r in runs:
        counts[r.state] += 1
    return {"sweep_dir": str(sweep_dir), "time": _now_iso(), "counts": counts,
            "runs": [dataclasses.asdict(r) for r in runs], "reducer": None, "submissions": 0,
            "errors": {}, "accounting": "run folders (no sweep.json: not a SLURM sweep)"}


# =============================================================================== cancel
def cancel_sweep(sweep_dir: str | os.PathLike, *, dry_run: bool = False, keep_reducer: bool = False,
                 timeout: float | None = None) -> list[str]:
    """scancel the sweep's queued/running jobs (recorded in sweep.json), nothing else."""
    sweep_dir = Path(sweep_dir).absolute()
    manifest = load_manifest(sweep_dir)
    if manifest is None:
        raise FileNotFoundError(f"{manifest_path(sweep_dir)} does not exist: nothing to cancel")
    ours: dict[str, str | None] = {}  # job id -> the submission's submitit folder
    for s in manifest["submissions"]:
        for a in s.get("arrays", []):
            ours[a["job_id"]] = s.get("folder")
        if s.get("reducer") and not keep_reducer:
            ours[s["reducer"]["job_id"]] = s.get("folder")
    if not ours:
        return []
    queue = query_squeue(current_user(), timeout)
    # alive and really ours: a job id SLURM reused for another job (after a cluster reset) writes
    # its output elsewhere and is left alone. An array task's raw id can equal its array id, so a
    # plain id counts only when it is not an array.
    alive_arrays = {k.split("_")[0] for k, j in queue.items()
                    if "_" in k and j.state in ACTIVE_STATES and j.belongs_to(ours.get(k.split("_")[0]))}
    alive_single = {k for k, j in queue.items()
                    if "_" not in k and not j.array_job_id and j.state in ACTIVE_STATES and j.belongs_to(ours.get(k))}
    targets = [j for j in ours if j in alive_arrays or j in alive_single]
    if targets and not dry_run:
        res = run_command(["scancel", *targets], timeout)
        if not res.ok:
            raise SlurmError(f"`{shlex.join(res.cmd)}` failed: {res.message()}")
        with sweep_lock(sweep_dir):
            manifest = load_manifest(sweep_dir) or manifest
            manifest.setdefault("cancellations", []).append({"time": _now_iso(), "job_ids": targets})
            write_manifest(sweep_dir, manifest)
    return targets


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
