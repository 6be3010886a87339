"""`python -m nondet_hpc.barriers`: entry point; the code is in :mod:`nondet_hpc.run.barriers`."""

import sys

from .run.barriers import main

if __name__ == "__main__":
    sys.exit(main())
