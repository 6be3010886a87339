"""`python -m nondet_hpc.status`: entry point; the code is in :mod:`nondet_hpc.cluster.status`."""

import sys

from .cluster.status import main

if __name__ == "__main__":
    sys.exit(main())
