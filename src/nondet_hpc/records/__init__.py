"""The per-run records of training itself, torch-free: final weights and the trajectory.

A run folder keeps, beside its logits, the model it ended with (:mod:`.weights`, safetensors) and
a trajectory of fingerprints, norms, a fixed random projection and probe logits at a grid of
training steps (:mod:`.trajectory`, an ``.npz`` read without pickle). What is recorded when
(:mod:`.schedule`) and how parameters are fingerprinted and projected (:mod:`.projection`) are
defined here too, so the trainer that writes these files and the reducer that reads them compute
the same numbers from the same definitions. Reading never executes anything from a file and
opens only regular files of bounded size (:mod:`nondet_hpc.safeio`).
"""
