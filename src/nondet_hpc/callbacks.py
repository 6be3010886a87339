"""Hydra callbacks: a local sweep ends with the reducer's table and a list of what failed; it exits
non-zero when a job failed or the report could not be made."""

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
    """After a local multirun: reduce the sweep folder, print the table, fail (exit 1) if any job
    failed or the reducer did.

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

        reducer_error = ""
        if (sweep_dir / RUNS).is_dir():
            try:
                # planned runs that never started get their SLURM state, as from python -m nondet_hpc.reduce
                table = reduce.reduce_sweep(sweep_dir, job_states=job_states)
                print(table.attrs.get("summary") or reduce.format_table(table), flush=True)
                print(f"[nondet_hpc] report: {sweep_dir / 'report'}  (metrics.csv, metrics.md, metrics.tex, plots)",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - the runs are safe; say why there is no report
                reducer_error = (f"reducer failed: {type(e).__name__}: {e}; the runs are safe, the previous report "
                                 f"(if any) is unchanged. Rerun it with python -m nondet_hpc.reduce {sweep_dir}")
                print(f"[nondet_hpc] {reducer_error}", flush=True)
        print(f"[nondet_hpc] runs: {sweep_dir / RUNS}", flush=True)
        # SystemExit, not an exception: Hydra turns callback exceptions into warnings and exit 0.
        if self.failures:
            lines = "\n".join(f"  job {n}: {err}" for n, err in self.failures)
            raise SystemExit(f"{len(self.failures)} job(s) of the sweep failed:\n{lines}\n"
                             f"Fix the cause and rerun the same command: finished runs are skipped."
                             + (f"\nAlso: {reducer_error}" if reducer_error else ""))
        if reducer_error:
            raise SystemExit(f"nondet_hpc: the sweep's runs finished but its report was not made: {reducer_error}")
