"""Hydra callbacks: a local sweep ends with the reducer's table and a list of what failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# SLURM_LAUNCHER: the launcher whose sweeps return before their jobs ran (it queues a reducer job
# instead); after any other launcher (the local preset: hydra_plugins.nondet_hpc_launcher.local,
# which calls on_job_end here for every job, also those its worker processes ran) the jobs are
# over at sweep end
from .cluster.fields import SLURM_LAUNCHER
from .rundir import RUNS


class ReduceAtSweepEnd(Callback):
    """After a local multirun: reduce the sweep folder, print the table, fail if any job failed.

    SLURM sweeps return before their jobs run; their launcher queues a reducer job instead.
    """

    def __init__(self) -> None:
        self.failures: list[tuple[int, str]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # a job that raised is Hydra's to report (return_value re-raises it); a run that failed
        # returns its state, as task.run does for every failure it catches
        if job_return.status != JobStatus.COMPLETED:
            return
        value = job_return.return_value
        if isinstance(value, dict) and value.get("state") == "failed":
            self.failures.append((config.hydra.job.num, value.get("error", "")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.launcher.get("_target_") == SLURM_LAUNCHER:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        from .analysis import reduce
        from .cluster.client import job_states

        if (sweep_dir / RUNS).is_dir():
            try:
                # planned runs that never started get their SLURM state, as from python -m nondet_hpc.reduce
                table = reduce.reduce_sweep(sweep_dir, job_states=job_states)
                print(table.attrs.get("summary") or reduce.format_table(table), flush=True)
                print(f"[nondet_hpc] report: {sweep_dir / 'report'}  (metrics.csv, metrics.md, metrics.tex, plots)",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - the runs are safe; say why there is no report
                print(f"[nondet_hpc] reducer failed: {type(e).__name__}: {e}; rerun it with "
                      f"python -m nondet_hpc.reduce {sweep_dir}", flush=True)
        print(f"[nondet_hpc] runs: {sweep_dir / RUNS}", flush=True)
        if self.failures:
            lines = "\n".join(f"  job {n}: {err}" for n, err in self.failures)
            # SystemExit, not an exception: Hydra turns callback exceptions into warnings and exit 0.
            raise SystemExit(f"{len(self.failures)} job(s) of the sweep failed:\n{lines}\n"
                              f"Fix the cause and rerun the same command: finished runs are skipped.")
