"""`python -m nondet_hpc.reduce`: entry point; the code is in :mod:`nondet_hpc.analysis.reduce`."""

import sys

from .analysis.reduce import main

if __name__ == "__main__":
    sys.exit(main())
