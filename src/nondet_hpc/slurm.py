"""Old import path of the node-side jobs, kept so that job pickles already queued on a cluster
(written before the cluster code moved to :mod:`nondet_hpc.cluster`) still load."""

from .cluster.jobs import ReduceJob, RunJob

__all__ = ["RunJob", "ReduceJob"]
