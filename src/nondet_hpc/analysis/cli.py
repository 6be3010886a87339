"""``python -m nondet_hpc.reduce SWEEP_DIR``: the reducer's command line (code in :mod:`.reduce`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import metrics as M
from .accounting import DEFAULT_SLURM_TIMEOUT_S, JobStates
from .reduce import ReduceError, reduce_sweep


def main(argv: Sequence[str] | None = None, job_states: JobStates | None = None) -> int:
    """Reduce the sweep, print the summary; 2 (message on stderr) when there is nothing to reduce.

    ``job_states``: the SLURM lookup for planned runs that never started (the entry point passes
    the cluster's; None: SLURM is not asked)."""
    p = argparse.ArgumentParser(prog="python -m nondet_hpc.reduce",
                                description="Reduce a sweep's logits to metrics tables and plots in SWEEP_DIR/report/.")
    p.add_argument("sweep_dir", help="sweep folder holding runs/<run id>/")
    p.add_argument("--formula", choices=M.FORMULAS, default="paper",
                   help="variability-reduction formula (docs/metrics.md); default: paper")
    p.add_argument("--baseline", default=None,
                   help="row name to compare every row with (default: each TTA/Acc.Ens row against its single model)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap/subsampling seed (default 0)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="reduce groups whose runs come from different environments (threads, device, GPU, "
                        "torch/CUDA/cuDNN, fp32 settings) together, the mix stated in the report; "
                        "default: refuse with exit 2, naming the runs")
    p.add_argument("--slurm-timeout", type=float, default=DEFAULT_SLURM_TIMEOUT_S,
                   help="seconds sacct may take to give the state of planned runs that never started "
                        f"(default {DEFAULT_SLURM_TIMEOUT_S:g}; 0: do not ask SLURM)")
    args = p.parse_args(argv)
    try:
        df = reduce_sweep(args.sweep_dir, formula=args.formula, n_boot=args.n_boot, seed=args.seed,
                          baseline=args.baseline, allow_mixed=args.allow_mixed, slurm_timeout=args.slurm_timeout,
                          job_states=job_states)
    except ReduceError as e:
        print(f"nondet_hpc.reduce: {e}", file=sys.stderr)
        return 2
    print(df.attrs["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
