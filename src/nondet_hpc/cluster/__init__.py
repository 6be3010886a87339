"""Stage 2: the cluster (SLURM client, sweep manifest, submission, node-side jobs, status, cancel)."""
