"""SLURM: the client (sbatch/squeue/sacct with timeouts), the launcher's fields, submission, the
jobs on the nodes, status, cancel and a study's next wave. What a sweep folder holds and what a
study runs next are the sweep layer's (:mod:`nondet_hpc.sweep`); this package only submits."""
