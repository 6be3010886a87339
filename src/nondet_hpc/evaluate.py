"""`python -m nondet_hpc.evaluate`: entry point; the code is in :mod:`nondet_hpc.run.evaluate`."""

import sys

from .run.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
