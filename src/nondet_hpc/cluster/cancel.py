"""`python -m nondet_hpc.cancel SWEEP_DIR`: scancel this sweep's SLURM jobs, nothing else.

Only the job ids recorded in SWEEP_DIR/sweep.json (array jobs and reducer jobs) that SLURM still
lists as queued or running are cancelled. Runs that finished keep their results; cancelled runs
keep their last checkpoint, so rerunning the sweep command later resumes them.

    python -m nondet_hpc.cancel outputs/digits_resnet14
    python -m nondet_hpc.cancel outputs/digits_resnet14 --dry-run       # list, do not cancel
    python -m nondet_hpc.cancel outputs/digits_resnet14 --keep-reducer  # the report still comes
"""

from __future__ import annotations

import argparse
import sys

from . import slurm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nondet_hpc.cancel", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="the sweep folder (holds sweep.json)")
    ap.add_argument("--dry-run", action="store_true", help="print the job ids, cancel nothing")
    ap.add_argument("--keep-reducer", action="store_true",
                    help="leave the reducer job queued (it reduces what completed, after the cancel)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a SLURM command is given up")
    args = ap.parse_args(argv)
    try:
        ids = slurm.cancel_sweep(args.sweep_dir, dry_run=args.dry_run, keep_reducer=args.keep_reducer,
                                 timeout=args.timeout)
    except (FileNotFoundError, ValueError) as e:
        print(f"nondet_hpc.cancel: {e}", file=sys.stderr)
        return 2
    except slurm.SlurmError as e:
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
