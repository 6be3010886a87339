"""Hydra callbacks: a local sweep ends with its loss barriers (when the config asks for them), the
reducer's table and a list of what failed; it exits non-zero when a job failed, a barrier could not
be measured or the report could not be made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# SLURM_LAUNCHER: the launcher whose sweeps return before their jobs ran (it queues a reducer job
# instead); after any other launcher (the local preset: hydra_plugins.nondet_hpc_launcher.local,
# which calls on_job_end here for every job, also those its worker processes ran) the jobs are
# over at sweep end
from .cluster.fields import SLURM_LAUNCHER
from .rundir import RUNS


def sweep_end_barriers(config: DictConfig, sweep_dir: Path) -> str:
    """The loss barriers of a local sweep whose config asks for them (``barriers.pairs > 0``), measured
    before the reducer so its report has their columns (docs/experiments/stability.md); "" when every
    pair asked for was measured (or none was asked for), else what failed and how to finish it.

    The settings are the config's ``barriers`` node (pairs, points, bn_images); the device is the
    runs' ``train.device``, the CPU threads each group's runs' own ``train.threads``. Pairs already
    recorded for the same weights and settings are skipped, so a rerun of the sweep does only what
    is missing.
    """
    node = config.get("barriers")
    pairs = int(node.get("pairs", 0) or 0) if node is not None else 0
    if pairs <= 0:
        return ""
    from .config import ConfigError
    from .run.barriers import Settings, sweep_barriers
    from .sweep.barriers import BarrierError

    settings = Settings(pairs=pairs, points=int(node.points), bn_images=int(node.bn_images),
                        device=str(OmegaConf.select(config, "train.device", default="auto") or "auto"))
    again = (f"python -m nondet_hpc.barriers {sweep_dir} --pairs {settings.pairs} --points {settings.points} "
             f"--bn-images {settings.bn_images} --device {settings.device}, then python -m nondet_hpc.reduce "
             f"{sweep_dir}")
    print(f"[nondet_hpc] loss barriers: at most {pairs} pair(s) per group, {settings.points} points, "
          f"{settings.bn_images} BatchNorm images", flush=True)
    try:
        res = sweep_barriers(sweep_dir, settings, echo=lambda m: print(m, flush=True))
    except (ConfigError, BarrierError) as e:
        return f"loss barriers not measured: {e} The runs are safe; once fixed: {again}"
    except Exception as e:  # noqa: BLE001 - the runs are safe; the reducer still runs without barriers
        return (f"loss barriers failed: {type(e).__name__}: {e}. The runs are safe; the report has no barriers "
                f"from this attempt. Rerun them with {again}")
    failed = [(g["label"] or g["group_key"], what, why) for g in res["groups"] for what, why in g["failed"]]
    counts = [sum(g[k] for g in res["groups"]) for k in ("pairs", "computed", "done_before")]
    print(f"[nondet_hpc] loss barriers: {len(res['groups'])} group(s), {counts[0]} pair(s): {counts[1]} computed, "
          f"{counts[2]} recorded before, {len(failed)} failed (records in {sweep_dir / 'barriers'})", flush=True)
    if not failed:
        return ""
    lines = "; ".join(f"{label}: {what}: {why}" for label, what, why in failed)
    return f"{len(failed)} loss barrier pair(s) failed ({lines}). Fix the cause, then {again}"


class ReduceAtSweepEnd(Callback):
    """After a local multirun: measure the loss barriers the config asks for (a failure there is
    reported and the reducer still runs), reduce the sweep folder, print the table, fail (exit 1)
    if any job failed, a barrier pair or the reducer did.

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

        reducer_error, barrier_error = "", ""
        if (sweep_dir / RUNS).is_dir():
            barrier_error = sweep_end_barriers(config, sweep_dir)
            if barrier_error:
                print(f"[nondet_hpc] {barrier_error}", flush=True)
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
        also = "".join(f"\nAlso: {e}" for e in (barrier_error, reducer_error) if e)
        if self.failures:
            lines = "\n".join(f"  job {n}: {err}" for n, err in self.failures)
            raise SystemExit(f"{len(self.failures)} job(s) of the sweep failed:\n{lines}\n"
                             f"Fix the cause and rerun the same command: finished runs are skipped." + also)
        if reducer_error:
            raise SystemExit(f"nondet_hpc: the sweep's runs finished but its report was not made: {reducer_error}"
                             + (f"\nAlso: {barrier_error}" if barrier_error else ""))
        if barrier_error:
            raise SystemExit(f"nondet_hpc: the sweep's runs finished and its report was made, but without every "
                             f"loss barrier asked for: {barrier_error}")
