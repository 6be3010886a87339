"""Every sbatch call of a sweep is identifiable, so a late answer never leaves a job nobody knows.

Each array and reducer job carries a submission token (``nondet-`` + 12 hex digits) in its comment
(``#SBATCH --comment``, after the user's own), and its job pickles wait under names made from the
token until SLURM gives the job id. When sbatch gives no answer within ``command_timeout_s`` the
job may have been queued all the same (a busy controller answers late): :func:`sbatch_identifiable`
then asks squeue for the token (every state squeue still holds) before deciding anything, and
records what it found:

- found: the job id is recorded as if sbatch had answered (``late_answer`` in its record), its
  pickles get their real names, the submission goes on;
- not found (squeue answered): the job was not queued; its pickles are removed;
- squeue silent as well: whether it was queued is unknown. The submission records the call in
  ``unanswered`` (token, runs) and stops; the next command on this sweep folder looks the token up
  again (:func:`resolve`) before it submits anything, and refuses to submit while SLURM is silent,
  so no run is ever queued twice.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from ..sweep.manifest import now_iso
from .client import SlurmError, SlurmTimeout, SubmissionError, find_tokens, sbatch
from .pickles import adopt_pickles, discard_pickles

TOKEN_PREFIX = "nondet-"
#: seconds waited before each squeue lookup of a token whose sbatch did not answer
LOOKUP_WAITS = (0.0, 2.0)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_hex(6)


class LateAnswer(SubmissionError):
    """sbatch did not answer and the job was not found by its token (``record["outcome"]`` says
    whether SLURM said so or could not tell)."""

    def __init__(self, message: str, record: dict) -> None:
        super().__init__(message)
        self.record = record

    @property
    def unknown(self) -> bool:
        return self.record["outcome"] == "unknown"


def lookup(token: str, user: str, timeout: float) -> tuple[str | None, str]:
    """(the job id, "found") or (None, "not queued" | "unknown") for a token, after sbatch's silence."""
    for wait in LOOKUP_WAITS:
        time.sleep(wait)
        try:
            found = find_tokens([token], user, timeout)
        except SlurmError:
            return None, "unknown"
        if token in found:
            return found[token], "found"
    return None, "not queued"


def sbatch_identifiable(script_path: Path, token: str, timeout: float, user: str, what: str) -> tuple[str, dict | None]:
    """sbatch the script (whose comment holds ``token``): (job id, None) when sbatch answered,
    (job id, the lookup's record) when it answered too late but squeue lists the job; else
    :class:`LateAnswer` with the record."""
    try:
        return sbatch(script_path, timeout), None
    except SlurmTimeout as e:
        silence = str(e)
    job_id, outcome = lookup(token, user, timeout)
    record = {"token": token, "after": silence, "outcome": outcome, "job_id": job_id, "time": now_iso(),
              "script": str(script_path)}
    if job_id is not None:
        return job_id, record
    if outcome == "not queued":
        raise LateAnswer(f"{what}: {silence}, and squeue lists no job with its submission token {token}: it was not "
                         f"queued. Rerun the same command (it submits what is missing); if the controller is slow, "
                         f"raise hydra.launcher.command_timeout_s.", record)
    raise LateAnswer(f"{what}: {silence}, and squeue did not answer either, so whether it was queued is unknown. "
                     f"sweep.json records its submission token {token} (in the job's comment): the next command "
                     f"on this sweep folder looks it up before it submits anything, so no run is queued twice. "
                     f"Rerun the same command when SLURM answers (and raise hydra.launcher.command_timeout_s if "
                     f"the controller is slow).", record)


def record_array_jobs(manifest: dict, submission: int, arr: Mapping[str, Any]) -> None:
    """Each run of an array's tasks gets its job (``A_i``; with K > 1 its slot in the task)."""
    k = int(arr.get("runs_per_task", 1))
    for i, task in enumerate(arr["tasks"]):
        for slot, run_id in enumerate(task):
            job = {"submission": submission, "job_id": f"{arr['job_id']}_{i}", "array_job_id": arr["job_id"],
                   "index": i}
            if k > 1:
                job["slot"] = slot  # the task's K runs share its job id
            manifest["runs"][run_id]["jobs"].append(job)


def unanswered(manifest: Mapping) -> list[tuple[dict, dict]]:
    """(submission, call) of every sbatch call whose outcome is still unknown."""
    return [(s, u) for s in manifest["submissions"] for u in s.get("unanswered", []) if u["outcome"] == "unknown"]


def resolve(manifest: dict, user: str, timeout: float) -> list[str]:
    """Look up the tokens of the sbatch calls whose outcome is unknown and record what is found:
    a queued array joins its submission's arrays (its runs get their jobs, its pickles their
    names), a queued reducer or barrier job becomes the submission's reducer / barriers entry; one
    not found was not queued.
    Lines saying what was found; SlurmError while squeue does not answer (submit nothing then)."""
    pending = unanswered(manifest)
    if not pending:
        return []
    tokens = [u["token"] for _, u in pending]
    try:
        found = find_tokens(tokens, user, timeout)
    except SlurmError as e:
        raise SlurmError(f"sweep.json records {len(pending)} sbatch call(s) that never answered (submission tokens "
                         f"{', '.join(tokens)}), and squeue does not answer now either ({e}): whether they were "
                         "queued is unknown, so nothing is submitted (rather than a run twice). Rerun the same "
                         "command when SLURM answers.") from None
    lines = []
    for sub, call in pending:
        job_id = found.get(call["token"])
        call.update(outcome="found later" if job_id else "not queued", job_id=job_id, resolved=now_iso())
        late = {k: v for k, v in call.items() if k != "job"}
        folder = Path(str(sub.get("folder") or ""))
        if job_id is None:
            discard_pickles(folder, call["token"])
            lines.append(f"sbatch call {call['token']} of submission {sub['n']} was not queued")
            continue
        if call["kind"] in ("reducer", "barriers"):  # one job each: the submission's reducer / barriers entry
            adopt_pickles(folder, call["token"], job_id, None)
            sub[call["kind"]] = {**call["job"], "job_id": job_id, "late_answer": late}
        else:
            adopt_pickles(folder, call["token"], job_id, len(call["job"]["tasks"]))
            arr = {**call["job"], "job_id": job_id, "late_answer": late}
            sub["arrays"].append(arr)
            record_array_jobs(manifest, sub["n"], arr)
        lines.append(f"sbatch call {call['token']} of submission {sub['n']} was queued after all: job {job_id} "
                     "(recorded now)")
    return lines
