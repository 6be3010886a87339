"""`python -m nondet_hpc.reduce`: entry point; the command line is :mod:`nondet_hpc.analysis.cli`.

The report asks SLURM (sacct) for the state of planned runs that never started through the
cluster's lookup, passed in here: the analysis code imports no SLURM code."""

import sys

from .analysis.cli import main
from .cluster.client import job_states

if __name__ == "__main__":
    sys.exit(main(job_states=job_states))
