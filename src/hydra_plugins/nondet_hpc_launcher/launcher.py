"""Hydra launcher that submits a sweep as SLURM array job(s) through submitit and returns at once.

Unlike hydra-submitit-launcher it does not wait for the jobs: it composes every job's config
here (to know each run's id and folder), skips runs that are done or still queued/running,
writes SWEEP_DIR/sweep.json, submits arrays chunked to MaxArraySize and a reducer job behind
them (afterany), prints the job ids and the status command, and returns. See docs/slurm.md.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from nondet_hpc.compose import FastSweepComposer

log = logging.getLogger(__name__)


class NondetSlurmLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = {}
        for k, v in params.items():
            if OmegaConf.is_config(v):
                v = OmegaConf.to_container(v, resolve=True)
            self.params[k] = v
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.composer: FastSweepComposer | None = None
        # holds the composer installed from setup() until launch() returns
        self._installed = contextlib.ExitStack()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        if self.params.get("fast_compose", True):
            # installed before the sweeper validates the batch (it composes every job too)
            self.composer = FastSweepComposer(hydra_context.config_loader)
            self._installed.enter_context(self.composer.installed())

    # ------------------------------------------------------------------ composing the jobs
    def _job_config(self, overrides: Sequence[str], idx: int) -> tuple[DictConfig, DictConfig]:
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"slurm_{idx}"
            sweep_config.hydra.job.num = idx
        if self._uses_hydra_resolver(sweep_config):
            HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} resolves per job
        hydra_cfg = sweep_config.hydra
        with open_dict(sweep_config):  # the job config is the root without its hydra node
            del sweep_config["hydra"]
        OmegaConf.resolve(sweep_config)
        return hydra_cfg, sweep_config

    @staticmethod
    def _validate(planned: list, job_overrides: Sequence[Sequence[str]]) -> None:
        """The trainer's input checks, here, before hundreds of jobs fail one by one on GPUs."""
        from nondet_hpc.config import ConfigError
        from nondet_hpc.run.task import validate

        for run, overrides in zip(planned, job_overrides):
            try:
                validate(run.cfg, check_device=False)  # the device is the compute node's
            except ConfigError as e:
                raise SystemExit(f"nondet_hpc: error: job {' '.join(filter_overrides(overrides))}: {e}\n"
                                 "Nothing was submitted.") from None

    _hydra_resolver: bool | None = None

    def _uses_hydra_resolver(self, sweep_config: DictConfig) -> bool:
        if self._hydra_resolver is None:
            text = OmegaConf.to_yaml({k: v for k, v in sweep_config.items_ex(resolve=False) if k != "hydra"})
            self._hydra_resolver = "${hydra:" in text
        return self._hydra_resolver

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with contextlib.ExitStack() as stack:
            if self.composer is not None and self.composer.loader.load_sweep_config is not self.composer:
                # a later batch of the same sweep (hydra.sweeper.max_batch_size): fast for this launch
                stack.enter_context(self.composer.installed())
            try:
                return self._launch(job_overrides, initial_job_idx)
            finally:
                self._installed.close()  # installed in setup(): Hydra's own load_sweep_config again

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from nondet_hpc.cluster import client, manifest, submit

        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            client.require_sbatch()  # fail fast, before composing hundreds of configs
        except client.SlurmUnavailable as e:
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        planned, returns = self._plan(job_overrides, initial_job_idx, sweep_dir)
        try:
            res = submit.submit_sweep(sweep_dir, planned, self.params, argv=sys.argv)
        except (client.SlurmError, manifest.SweepConfigMismatch) as e:
            # a clean message and exit code 1, not Hydra's traceback of the launcher
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        print(submit.describe_submission(res, self.params), flush=True)
        self._fill_returns(res, planned, returns, sweep_dir)
        return returns

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
              sweep_dir: Path) -> tuple[list, list[JobReturn]]:
        """Compose and check every job: its PlannedRun (run id, folder, identity) and JobReturn."""
        from nondet_hpc.cluster.manifest import plan_run

        assert self.config is not None
        t0 = time.perf_counter()
        planned = []
        returns = []
        # keys left out of the config hash beyond the bookkeeping keys, which are never in a run's
        # identity (nondet_hpc.config.BOOKKEEPING_KEYS)
        ignore = list(self.params.get("ignore_keys") or [])
        for i, overrides in enumerate(job_overrides):
            hydra_cfg, job_cfg = self._job_config(overrides, initial_job_idx + i)
            out_dir = Path(str(job_cfg.get("out_dir", sweep_dir))).absolute()
            if "out_dir" in job_cfg:
                # the job may start in another directory than this one (SLURM falls back to /tmp
                # when the submit directory is missing on the node): give it the absolute folder
                job_cfg.out_dir = str(out_dir)
            if i == 0 and out_dir != sweep_dir:
                log.warning(f"hydra.sweep.dir ({sweep_dir}) differs from out_dir ({out_dir}); sweep.json goes "
                            "to hydra.sweep.dir, the runs to out_dir/runs")
            planned.append(plan_run(job_cfg, filter_overrides(overrides), ignore))
            returns.append(JobReturn(overrides=list(overrides), cfg=job_cfg, hydra_cfg=None,
                                     working_dir=str(sweep_dir), task_name=str(hydra_cfg.job.name),
                                     status=JobStatus.COMPLETED))
        self._validate(planned, job_overrides)
        compose_s = time.perf_counter() - t0
        HydraConfig.instance().set_config(self.config)
        if self.composer is not None:
            self.composer.cache.clear()
            log.info(f"composed {len(planned)} job configs in {compose_s:.1f} s ({self.composer.stats})")
        else:
            log.info(f"composed {len(planned)} job configs in {compose_s:.1f} s")
        return planned, returns

    @staticmethod
    def _fill_returns(res: Any, planned: list, returns: list[JobReturn], sweep_dir: Path) -> None:
        """Each job's return value: its run, folder and what happened to it in this launch."""
        from nondet_hpc.cluster.manifest import latest_job, load_manifest

        by_run: dict[str, str] = {}
        jobs: dict[str, str | None] = {}
        recorded = load_manifest(sweep_dir) or {"runs": {}}
        for run_id in res.submitted:
            job = latest_job(recorded["runs"].get(run_id))
            jobs[run_id] = job["job_id"] if job else None
        for run_id in res.done:
            by_run[run_id] = "done"
        for run_id in res.active:
            by_run[run_id] = "queued"
        for run_id in res.over_limit:
            by_run[run_id] = "not submitted (submit limit)"
        for run, ret in zip(planned, returns):
            state = "submitted" if run.run_id in jobs else by_run.get(run.run_id, "duplicate")
            ret.return_value = {"run_id": run.run_id, "run_dir": str(run.run_dir), "state": state,
                                "job_id": jobs.get(run.run_id), "sweep_dir": str(sweep_dir)}
