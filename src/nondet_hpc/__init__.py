"""nondet_hpc: run-to-run variability of neural-network training, one source at a time."""

__version__ = "0.1.0"
