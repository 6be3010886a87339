"""The SLURM client: running sbatch/squeue/sacct/scontrol/sacctmgr with timeouts, parsing their
output, the cluster's facts (MaxArraySize, submit limits) and the errors users see.

Nothing here knows about sweeps or run folders; every command has a timeout, so no caller can
hang on a dead controller. nondet_hpc never uses submitit's job-state calls (they wait on sacct).
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_TIMEOUT_S = float(os.environ.get("NONDET_SLURM_TIMEOUT", "60"))
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize

# SLURM job states (long names, as squeue %T and sacct print them)
ACTIVE_STATES = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
}
RUNNING_STATES = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"}


# =============================================================================== errors
class SlurmError(RuntimeError):
    """A SLURM command failed or could not be run."""


class SlurmUnavailable(SlurmError):
    """No SLURM client on this machine."""


class SubmissionError(SlurmError):
    """sbatch refused a job: carries SLURM's message and the command line."""


class SlurmTimeout(SlurmError):
    """A SLURM command gave no answer within its timeout; it may still have acted (a late sbatch
    may have queued its job: :mod:`.tokens` looks it up)."""


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

    def check(self) -> "CommandResult":
        """Raise SlurmError with the command and SLURM's message unless it succeeded."""
        if not self.ok:
            raise SlurmError(f"`{shlex.join(self.cmd)}` failed: {self.message()}")
        return self


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
        raise SlurmTimeout(f"no answer from `{shlex.join(cmd)}` within {timeout:g} s") from e
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
    return parse_squeue(run_command(squeue_command(user), timeout).check().stdout)


def query_sacct(job_ids: Iterable[str], timeout: float | None = None) -> dict[str, JobInfo]:
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    return parse_sacct(run_command(sacct_command(ids), timeout).check().stdout)


def job_states(job_ids: list[str], timeout: float) -> tuple[dict[str, str], str]:
    """job id -> SLURM state from sacct, and a note when SLURM was not asked or did not answer.

    The reducer's lookup for planned runs that never started (``analysis.reduce.reduce_sweep``'s
    ``job_states``): a missing or silent sacct only changes the note, never stops the report.
    """
    if not job_ids:
        return {}, ""
    if timeout <= 0:
        return {}, "SLURM not asked (--slurm-timeout 0)"
    try:
        infos = query_sacct(job_ids, timeout)
    except SlurmError as e:
        return {}, f"SLURM not reachable ({e})"
    return {j: infos[j].state for j in job_ids if j in infos}, ""


#: squeue's view of every job of a user, in any state SLURM still holds, with its comment
TOKEN_FIELDS = ["JobArrayID", "State", "Comment"]


def find_tokens(tokens: Iterable[str], user: str, timeout: float | None = None) -> dict[str, str]:
    """Submission token -> the job id (an array's id for an array) of the job of ``user`` whose
    comment holds it, among the jobs squeue lists in any state (pending, running, or ended within
    MinJobAge). Raises SlurmError when squeue does not answer."""
    wanted = [t for t in tokens if t]
    if not wanted:
        return {}
    fmt = ",".join(f"{f}:|" for f in TOKEN_FIELDS)
    res = run_command(["squeue", "-h", "-r", "-t", "all", "-u", user, "-O", fmt], timeout).check()
    found: dict[str, str] = {}
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.rstrip().removesuffix("|").split("|")]
        if len(parts) < 3 or not parts[0]:
            continue
        comment = "|".join(parts[2:]).split()
        for token in wanted:
            if token in comment:
                found.setdefault(token, parts[0].split("_")[0])
    return found


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())


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

