"""The sweep folder's contract, SLURM-free: sweep.json and its lock (:mod:`.manifest`), a run's
configuration as the folder compares it (:mod:`.identity`), and the stop rule of a study grown in
waves (:mod:`.waves`). The local launcher, the SLURM code (:mod:`nondet_hpc.cluster`) and the
reducer all read a sweep folder through this package; it imports neither torch nor SLURM code."""
