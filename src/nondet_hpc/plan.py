"""`python -m nondet_hpc.plan`: entry point; the code is in :mod:`nondet_hpc.analysis.planning`."""

import sys

from .analysis.planning import main

if __name__ == "__main__":
    sys.exit(main())
