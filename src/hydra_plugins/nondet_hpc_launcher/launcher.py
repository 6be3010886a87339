"""Hydra launcher that submits a sweep as SLURM array job(s) through submitit and returns at once.

Unlike hydra-submitit-launcher it does not wait for the jobs: it composes every job's config
here (to know each run's id and folder), skips runs that are done or still queued/running,
writes SWEEP_DIR/sweep.json, submits arrays chunked to MaxArraySize and a reducer job behind
them (afterany), prints the job ids and the status command, and returns. See docs/slurm.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
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
        self.sweep_dir: Path | None = None
        # plan key -> (run id, run folder) of the runs earlier launches of this folder planned
        self.known: dict[str, tuple[str, str]] = {}
        # holds the composer installed from setup() until launch() returns
        self._installed = contextlib.ExitStack()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Everything that can fail without composing a job fails here, before the sweeper's
        batch validation composes every job: no sbatch, bad launcher settings."""
        from nondet_hpc.cluster import client, fields, params
        from nondet_hpc.config import ConfigError
        from nondet_hpc.sweep import trust

        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        try:
            client.require_sbatch()
        except client.SlurmUnavailable as e:
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        try:
            self.params = params.normalize(self.params, self.sweep_dir)
        except ConfigError as e:
            raise SystemExit(f"nondet_hpc: error: {e}\nNothing was submitted.") from None
        # what Hydra, the launcher and (through sbatch) the jobs create is the user's alone, and a
        # folder others could write is refused before a single job is composed
        trust_group = bool(fields.value(self.params, "trust_group"))
        self._installed.enter_context(trust.owner_only_umask(trust_group))
        try:
            trust.check_sweep_folder(self.sweep_dir, Path(str(self.params.get("submitit_folder")
                                                               or self.sweep_dir / "slurm")), trust_group=trust_group)
        except trust.TrustError as e:
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        if self.params.get("fast_compose", True):
            self.known = self._known_runs(self.sweep_dir)
            # installed before the sweeper validates the batch (it composes every job too)
            self.composer = FastSweepComposer(hydra_context.config_loader, job_only=True, known=self.known,
                                              salt=self._salt())
            self._installed.enter_context(self.composer.installed())

    # ------------------------------------------------------------------ plan keys (identical reruns)
    @staticmethod
    def _known_runs(sweep_dir: Path) -> dict[str, tuple[str, str]]:
        from nondet_hpc.sweep.manifest import load_manifest

        try:
            recorded = load_manifest(sweep_dir)
        except (OSError, ValueError):
            return {}  # the full path reads it again and says what is wrong
        return {rec["plan_key"]: (rid, rec["run_dir"]) for rid, rec in (recorded or {"runs": {}})["runs"].items()
                if rec.get("plan_key") and rec.get("run_dir")}

    def _salt(self) -> str:
        """What decides a run's id and folder besides the job's composition: recorded in every key."""
        from nondet_hpc import __version__, config, rundir

        code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (config, rundir))).hexdigest()
        return json.dumps([__version__, code, os.getcwd(), str(self.sweep_dir), self.params.get("cpus_per_task"),
                           self.params.get("runs_per_task"),
                           sorted(self.params.get("ignore_keys") or [])])

    def _plan_key(self, overrides: Sequence[str]) -> str | None:
        assert self.composer is not None and self.config is not None
        if any(o.lstrip("+~").split("=", 1)[0] == "force" for o in overrides):
            return None  # force=true retrains DONE runs: always the full path
        if self._content_addressed(overrides):
            return None  # its run id hashes file contents (registry/inputs.py): always resolved anew
        return self.composer.plan_key(self.config, list(overrides))

    def _content_addressed(self, overrides: Sequence[str]) -> bool:
        """Whether the job's run id depends on files (model=custom, data=npz|folder), which the same
        overrides do not pin: an edited model file must make new runs, not match the old plan."""
        from nondet_hpc.registry.inputs import content_addressed

        assert self.config is not None
        chosen = dict(o.lstrip("+~").partition("=")[::2] for o in overrides)
        return content_addressed(chosen.get("data", str(OmegaConf.select(self.config, "data.name", default=""))),
                                 chosen.get("model", str(OmegaConf.select(self.config, "model.name", default=""))))

    # ------------------------------------------------------------------ composing the jobs
    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        """The resolved job config (no hydra node); the composer may return it with or without one."""
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        if "hydra" in sweep_config:
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"slurm_{idx}"
                sweep_config.hydra.job.num = idx
            if self._uses_hydra_resolver(sweep_config):
                HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} resolves per job
            with open_dict(sweep_config):  # the job config is the root without its hydra node
                del sweep_config["hydra"]
            OmegaConf.resolve(sweep_config)  # now, while HydraConfig holds this job's node
        # else: resolved by plan_run's to_container (the job pickle carries that resolved copy)
        return sweep_config

    def _validate(self, planned: list, job_overrides: Sequence[Sequence[str]]) -> None:
        """The trainer's input checks, here, before hundreds of jobs fail one by one on GPUs."""
        from nondet_hpc.cluster.params import check_device
        from nondet_hpc.config import ConfigError
        from nondet_hpc.run.task import validate

        for run, overrides in zip(planned, job_overrides):
            try:
                check_device(run.cfg.train.device, self.params)  # a GPU asked for, if the run needs one
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
        from nondet_hpc.cluster import client, submit
        from nondet_hpc.sweep.identity import SweepConfigMismatch
        from nondet_hpc.sweep.manifest import SweepError

        setup_globals()
        assert self.config is not None and self.sweep_dir is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = self.sweep_dir
        rule = self._study_rule()
        if rule is not None:
            return self._launch_study(job_overrides, initial_job_idx, sweep_dir, rule)
        try:
            keys = self._plan_keys(job_overrides)
            res = self._identical_rerun(job_overrides, keys, sweep_dir)
            if res is not None:
                print(submit.describe_submission(res, self.params), flush=True)
                return self._known_returns(job_overrides, keys, res, sweep_dir)
            if self.composer is not None:
                # the sweeper's validation is over: from here every job is composed for real
                self.composer.known = {}
            planned, returns = self._plan(job_overrides, initial_job_idx, sweep_dir, keys)
            res = submit.submit_sweep(sweep_dir, planned, self.params, argv=sys.argv)
        except (client.SlurmError, SweepError, SweepConfigMismatch) as e:
            # a clean message and exit code 1, not Hydra's traceback of the launcher
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        print(submit.describe_submission(res, self.params), flush=True)
        self._fill_returns(res, planned, returns, sweep_dir)
        return returns

    # ------------------------------------------------------------------ a study grown in waves
    def _study_rule(self) -> dict | None:
        from nondet_hpc.config import ConfigError
        from nondet_hpc.sweep.waves import rule_from_config

        assert self.config is not None
        try:
            return rule_from_config(self.config.get("study"))
        except ConfigError as e:
            raise SystemExit(f"nondet_hpc: error: {e}\nNothing was submitted.") from None

    def _launch_study(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path,
                      rule: dict) -> Sequence[JobReturn]:
        """Submit the first wave of each group (a rerun: every recorded seed not done or queued, or a
        reducer job to decide a wave whose reducer was lost); its reducer jobs grow the rest
        (nondet_hpc.cluster.advance)."""
        from nondet_hpc.cluster import client, submit
        from nondet_hpc.config import ConfigError
        from nondet_hpc.sweep import waves
        from nondet_hpc.sweep.identity import SweepConfigMismatch
        from nondet_hpc.sweep.manifest import SweepError

        try:
            groups = waves.group_jobs(job_overrides)
            recorded = waves.load_study(sweep_dir)
            wanted = waves.seeds_to_plan(rule, groups, recorded)
        except (ConfigError, waves.StudyMismatch, SweepError) as e:  # SweepError: a damaged sweep.json
            raise SystemExit(f"nondet_hpc: error: {e}\nNothing was submitted.") from None
        chosen = [(label, ov) for label, jobs in groups.items() for s, ov in jobs if s in set(wanted[label])]
        if self.composer is not None:
            self.composer.known = {}  # every job of the wave is composed for real
        planned, returns = self._plan([ov for _, ov in chosen], initial_job_idx, sweep_dir, [None] * len(chosen))
        by_label: dict[str, list] = {}
        for (label, _), run in zip(chosen, planned):
            by_label.setdefault(label, []).append(run)
        try:
            study = waves.record_first_waves(sweep_dir, rule, groups, by_label, self.params,
                                             list(self.params.get("ignore_keys") or []), sign=True)
            res = submit.submit_sweep(sweep_dir, planned, self.params, argv=sys.argv)
            if study["status"] == "running":
                if not res.submitted:  # all done or queued: a lost reducer is queued again to decide
                    red = submit.submit_reducer_only(sweep_dir, self.params, argv=sys.argv)
                    if red is not None:
                        res.submission, res.reducer = red.submission, red.reducer
                waves.mark_submitted(sweep_dir, res.submission)
        except (client.SlurmError, SweepError, SweepConfigMismatch) as e:
            waves.mark_submitted(sweep_dir, None, str(e))
            raise SystemExit(f"nondet_hpc: error: {e}") from None
        print(submit.describe_submission(res, self.params), flush=True)
        print("\n".join("  " + line for line in waves.describe(waves.load_study(sweep_dir) or study)), flush=True)
        self._fill_returns(res, planned, returns, sweep_dir)
        return returns

    def _plan_keys(self, job_overrides: Sequence[Sequence[str]]) -> list[str | None]:
        if self.composer is None:
            return [None] * len(job_overrides)
        return [self._plan_key(o) for o in job_overrides]

    def _identical_rerun(self, job_overrides: Sequence[Sequence[str]], keys: list[str | None],
                         sweep_dir: Path) -> Any:
        """Every job found in sweep.json by its plan key, and every run done or queued: the result
        of submit.nothing_to_submit, without composing a single job config. Else None."""
        from nondet_hpc.cluster import submit

        if not keys or not all(k in self.known for k in keys):
            return None
        runs = [submit.KnownRun(self.known[k][0], Path(self.known[k][1])) for k in keys]  # type: ignore[index]
        res = submit.nothing_to_submit(sweep_dir, runs, self.params)
        if res is not None:
            stats = self.composer.stats if self.composer else {}
            log.info(f"identical rerun: all {len(runs)} runs done or queued, found in sweep.json by their plan keys "
                     f"(composed 0 job configs; {stats.get('slow', 0)} group compositions)")
        return res

    def _known_returns(self, job_overrides: Sequence[Sequence[str]], keys: list, res: Any,
                       sweep_dir: Path) -> list[JobReturn]:
        assert self.config is not None
        done = set(res.done)
        out = []
        for overrides, key in zip(job_overrides, keys):
            run_id, run_dir = self.known[key]
            ret = JobReturn(overrides=list(overrides), cfg=None, hydra_cfg=None, working_dir=str(sweep_dir),
                            task_name=str(self.config.hydra.job.name), status=JobStatus.COMPLETED)
            ret.return_value = {"run_id": run_id, "run_dir": run_dir, "state": "done" if run_id in done else "queued",
                                "job_id": None, "sweep_dir": str(sweep_dir)}
            out.append(ret)
        return out

    def _plan(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
              sweep_dir: Path, keys: list[str | None]) -> tuple[list, list[JobReturn]]:
        """Compose and check every job: its PlannedRun (run id, folder, identity) and JobReturn."""
        from nondet_hpc.config import ConfigError, threads_for
        from nondet_hpc.registry.inputs import resolve_inputs
        from nondet_hpc.run.task import check_groups_chosen
        from nondet_hpc.sweep.identity import plan_run

        assert self.config is not None
        t0 = time.perf_counter()
        planned = []
        returns = []
        # keys left out of the config hash beyond the bookkeeping keys, which are never in a run's
        # identity (nondet_hpc.config.BOOKKEEPING_KEYS)
        ignore = list(self.params.get("ignore_keys") or [])
        # train.threads=0: a task's CPUs split between its runs_per_task runs (config.threads_for,
        # the rule cluster/pack.py applies on the node)
        threads = threads_for(0, cpus=int(self.params.get("cpus_per_task") or 1),
                              runs_per_task=int(self.params.get("runs_per_task") or 1))
        task_name = str(self.config.hydra.job.name)
        for i, (overrides, key) in enumerate(zip(job_overrides, keys)):
            job_cfg = self._job_config(overrides, initial_job_idx + i)
            try:  # a group left unset (source=[]) has no run id: say so before computing one
                check_groups_chosen(job_cfg)
                resolve_inputs(job_cfg)  # a custom model's source, an npz/folder's content: part of the run id
            except ConfigError as e:
                raise SystemExit(f"nondet_hpc: error: job {' '.join(filter_overrides(overrides))}: {e}\n"
                                 "Nothing was submitted.") from None
            out_dir = Path(str(job_cfg.get("out_dir", sweep_dir))).absolute()
            if "out_dir" in job_cfg:
                # the job may start in another directory than this one (SLURM falls back to /tmp
                # when the submit directory is missing on the node): give it the absolute folder
                job_cfg.out_dir = str(out_dir)
            if job_cfg.train.threads == 0:
                # the thread count is part of a run's identity on CPU (it changes results), and
                # this host's count is not the node's: a job uses its cpus_per_task
                # (OMP_NUM_THREADS in the preset's setup), so that is the count of its identity
                job_cfg.train.threads = threads
            if i == 0 and out_dir != sweep_dir:
                log.warning(f"hydra.sweep.dir ({sweep_dir}) differs from out_dir ({out_dir}); sweep.json goes "
                            "to hydra.sweep.dir, the runs to out_dir/runs")
            planned.append(plan_run(job_cfg, filter_overrides(overrides), ignore, plan_key=key))
            returns.append(JobReturn(overrides=list(overrides), cfg=job_cfg, hydra_cfg=None,
                                     working_dir=str(sweep_dir), task_name=task_name,
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
        from nondet_hpc.sweep.manifest import latest_job, load_manifest

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
