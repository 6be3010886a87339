"""`python -m nondet_hpc.reduce`: entry point; the command line is :mod:`nondet_hpc.analysis.cli`."""

import sys

from .analysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
