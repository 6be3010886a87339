"""`python -m nondet_hpc.cancel`: entry point; the code is in :mod:`nondet_hpc.cluster.cancel`."""

import sys

from .cluster.cancel import main

if __name__ == "__main__":
    sys.exit(main())
