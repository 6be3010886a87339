"""`python -m nondet_hpc.cancel SWEEP_DIR`: scancel this sweep's SLURM jobs, nothing else.

Only the job ids recorded in SWEEP_DIR/sweep.json (array jobs, reducer and barrier jobs, and those found
by the submission token of an sbatch call that never answered) that SLURM still lists as queued
or running are cancelled. Runs that finished keep their results; cancelled runs
keep their last checkpoint, so rerunning the sweep command later resumes them.

    python -m nondet_hpc.cancel outputs/digits_resnet14
    python -m nondet_hpc.cancel outputs/digits_resnet14 --dry-run       # list, do not cancel
    python -m nondet_hpc.cancel outputs/digits_resnet14 --keep-reducer  # the report (and barriers) still come
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..sweep.manifest import (ManifestError, SweepError, load_manifest, manifest_path, now_iso, read_salvaged,
                              sweep_lock, write_manifest)
from .cli import main_quietly
from .client import ACTIVE_STATES, SlurmError, current_user, find_tokens, query_squeue, run_command
from .tokens import unanswered


class DamagedManifest(RuntimeError):
    """sweep.json is damaged: ``problems`` could not be read; ``cancelled`` (what its readable
    entries named) was cancelled, or nothing when no entry could be read."""

    def __init__(self, path: Path, problems: list[str], cancelled: list[str] | None, dry_run: bool):
        self.path, self.problems, self.cancelled = path, problems, cancelled
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        if cancelled is None:
            did = "nothing of it can be read, so nothing was cancelled"
        else:
            verb = "would cancel" if dry_run else "cancelled"
            did = (f"{verb} the {len(cancelled)} queued or running job(s) its readable entries name"
                   f"{': ' + ' '.join(cancelled) if cancelled else ''}; jobs named only by the damaged entries were "
                   f"not touched" + ("" if dry_run else ", and the cancellation was not recorded in the damaged file "
                                                       "(left as it is)"))
        super().__init__(f"{path} is damaged ({shown}): {did}. Find any job of this sweep still queued with "
                         f"`squeue --me -o '%i %j %o'` (its output path lies in the sweep's slurm/ folder) and "
                         f"scancel it; repair or restore sweep.json (docs/troubleshooting.md).")


def cancel_sweep(sweep_dir: str | os.PathLike, *, dry_run: bool = False, keep_reducer: bool = False,
                 timeout: float | None = None) -> list[str]:
    """scancel the sweep's queued/running jobs (recorded in sweep.json), nothing else.

    A damaged sweep.json: the jobs its readable entries name are cancelled, then
    :class:`DamagedManifest` says what could not be read and what was done."""
    sweep_dir = Path(sweep_dir).absolute()
    try:
        manifest = load_manifest(sweep_dir)
    except ManifestError as e:
        salvaged, _ = read_salvaged(sweep_dir)
        done = _cancel(sweep_dir, salvaged, dry_run, keep_reducer, timeout, record=False) if salvaged else None
        raise DamagedManifest(e.path, e.problems, done, dry_run) from None
    if manifest is None:
        raise FileNotFoundError(f"{manifest_path(sweep_dir)} does not exist: nothing to cancel")
    return _cancel(sweep_dir, manifest, dry_run, keep_reducer, timeout, record=True)


def _cancel(sweep_dir: Path, manifest: dict, dry_run: bool, keep_reducer: bool, timeout: float | None,
            record: bool) -> list[str]:
    ours: dict[str, str | None] = {}  # job id -> the submission's submitit folder
    for s in manifest["submissions"]:
        for a in s.get("arrays", []):
            ours[a["job_id"]] = s.get("folder")
        for job in ("reducer", "barriers"):  # the report's jobs (--keep-reducer keeps both)
            if s.get(job) and not keep_reducer:
                ours[s[job]["job_id"]] = s.get("folder")
    # sbatch calls that never answered: their jobs, if SLURM queued them, carry the call's token
    pending = [(s, u) for s, u in unanswered(manifest) if u["kind"] == "array" or not keep_reducer]
    found = find_tokens([u["token"] for _, u in pending], current_user(), timeout) if pending else {}
    ours.update({found[u["token"]]: s.get("folder") for s, u in pending if u["token"] in found})
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
        run_command(["scancel", *targets], timeout).check()
        if not record:
            return targets
        with sweep_lock(sweep_dir):
            manifest = load_manifest(sweep_dir) or manifest
            manifest.setdefault("cancellations", []).append({"time": now_iso(), "job_ids": targets})
            write_manifest(sweep_dir, manifest)
    return targets


def main(argv: list[str] | None = None) -> int:
    return main_quietly(_main, argv)  # `... | head` ends quietly


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nondet_hpc.cancel", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="the sweep folder (holds sweep.json)")
    ap.add_argument("--dry-run", action="store_true", help="print the job ids, cancel nothing")
    ap.add_argument("--keep-reducer", action="store_true",
                    help="leave the reducer job (and the barrier job) queued: they reduce what completed, after the "
                         "cancel")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a SLURM command is given up")
    args = ap.parse_args(argv)
    try:
        ids = cancel_sweep(args.sweep_dir, dry_run=args.dry_run, keep_reducer=args.keep_reducer,
                           timeout=args.timeout)
    except DamagedManifest as e:
        print(f"nondet_hpc.cancel: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"nondet_hpc.cancel: {e}", file=sys.stderr)
        return 2
    except (SlurmError, SweepError) as e:
        print(f"nondet_hpc.cancel: {e}", file=sys.stderr)
        return 1
    if not ids:
        print(f"nondet_hpc.cancel: no queued or running job of {args.sweep_dir}")
    elif args.dry_run:
        print(f"nondet_hpc.cancel: would cancel {len(ids)} job(s): {' '.join(ids)}")
    else:
        print(f"nondet_hpc.cancel: cancelled {len(ids)} job(s): {' '.join(ids)}")
        print(f"  status: python -m nondet_hpc.status {args.sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
