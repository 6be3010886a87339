"""nondet_hpc: run-to-run variability of neural-network training, one source at a time."""

import os as _os

# cuBLAS reads its workspace setting when it first initialises, which may be before a run asks for
# deterministic kernels (a local sweep trains many runs in one process). Setting it on import, for
# every run, keeps cuBLAS deterministic whenever torch.use_deterministic_algorithms(True) is on.
_os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

__version__ = "0.1.0"
