"""The local launcher (``hydra/launcher=local``, the default): a sweep's jobs on this machine,
``n_jobs`` at a time, each in its own process with the thread count its config fixes.

Why our own and not hydra-joblib-launcher: Hydra runs ``on_job_end`` callbacks inside the job,
which in a worker process is a copy of the callback: ``ReduceAtSweepEnd`` would never see a
failed run. Here the workers run the job without callbacks and this process calls every
callback's ``on_job_start`` / ``on_job_end`` with each job's config and JobReturn, so the
end-of-sweep report and the exit code see every job, as with Hydra's basic launcher.

- ``n_jobs=1`` runs the jobs in this process, one after another (Hydra's basic launcher's way).
- ``n_jobs>1``: a pool of ``spawn`` processes (no fork of a process holding torch threads), reused
  for job after job. Each job's output goes to ``<sweep>/.hydra/job-N/job.log`` and is printed
  here as one block when the job ends, so parallel jobs never interleave their lines.
- A job's result depends on its thread count (``train.threads``, part of the run identity), never
  on how many jobs run beside it: a run trained alone or beside others gives the same logits.
- Ctrl-C or SIGTERM stops the sweep: running jobs checkpoint, no job starts, the launcher lists what
  finished and what to rerun and exits non-zero (``stopping.py``); rerunning the same command
  finishes the rest bit-identically.
- Job folders and logs are written through nondet_hpc.safeio: a link planted at
  ``.hydra/job-N/job.log`` (or anywhere below the sweep folder) is refused, never written through.
- ``study.target.*`` (a study grown in waves): the waves run here in sequence, recorded, measured
  and decided by the sweep layer (nondet_hpc.sweep.waves) as a SLURM study's reducer job does
  (``_launch_waves``); nothing here imports SLURM code.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from nondet_hpc.config import ConfigError  # torch-free

# by module: Hydra's plugin scan executes each plugin module again, so a function must be looked up
# on the module when it is pickled for a worker (its current object), not bound at import
from . import phases, stopping

log = logging.getLogger(__name__)

JOB_LOG = "job.log"  # in the job's Hydra folder (hydra.sweep.subdir)


@dataclass
class NondetLocalLauncherConf:
    _target_: str = "hydra_plugins.nondet_hpc_launcher.local.NondetLocalLauncher"
    # jobs at once; null = cores // train.threads (at least 1). train.threads=0 (torch's default
    # pool, which already spans every core) gives 1: jobs one after another, as before.
    n_jobs: Optional[int] = None


def register() -> None:
    ConfigStore.instance().store(group="hydra/launcher", name="nondet_local_schema",
                                 node=NondetLocalLauncherConf, provider="nondet_hpc")


def usable_cores() -> int:
    """CPUs this process may run on (affinity, e.g. inside a SLURM allocation), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_n_jobs(threads: Sequence[int], cores: int) -> int:
    """cores // the largest train.threads of the sweep, at least 1; 1 when a job keeps torch's
    default thread pool (train.threads=0), which uses every core by itself."""
    if not threads or min(threads) <= 0:
        return 1
    return max(1, cores // max(threads))


class _WorkerCallbacks:
    """The callbacks a worker's run_job calls: none; the launching process calls the real ones."""

    def on_job_start(self, **kwargs: Any) -> None:
        pass

    def on_job_end(self, **kwargs: Any) -> None:
        pass


def _job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def _make_job_dir(config: DictConfig) -> Path:
    """The job's Hydra folder, every component below the sweep folder a real folder (no link)."""
    from nondet_hpc import safeio

    return safeio.make_dirs(_job_dir(config), root=str(config.hydra.sweep.dir))


def _work(payload: bytes) -> tuple[JobReturn | None, str | None]:
    """In a worker: run one job (its config composed by the launcher) with output to its job.log.

    Returns the JobReturn and, for a job that raised, the exception as text (the exception itself
    may not pickle, or unpickle in the launcher); (None, None) when the sweep is being stopped."""
    if stopping.is_stopping():
        return None, None
    stopping.set_busy(True)
    try:
        return _work_now(payload)
    finally:
        stopping.set_busy(False)


def _work_now(payload: bytes) -> tuple[JobReturn, str | None]:
    import cloudpickle  # pickles the task function by value (it lives in __main__)

    from nondet_hpc import safeio

    task_function, config = cloudpickle.loads(payload)
    raised: list[Exception] = []

    def task(cfg: DictConfig) -> Any:
        try:
            return task_function(cfg)
        except Exception as e:  # run_job records it as the job's failure; kept here for its text
            raised.append(e)
            raise

    try:  # a link planted in the job's folder is refused: the job fails with that message
        job_dir = _make_job_dir(config)
        log_file = safeio.open_stream(job_dir / JOB_LOG, root=str(config.hydra.sweep.dir))
    except safeio.RefusedFile as e:
        return _lost_job(config, list(config.hydra.overrides.task), f"refused: {e}"), None
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_file as f:
        # file descriptors, not sys.stdout: torch's and numpy's C-level output lands there too
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            setup_globals()
            # a spawned worker starts with fresh Hydra state: the job's name (HydraConfig's
            # hydra.job.name, used by the task and its logs) is the launching process's
            JobRuntime.instance().set("name", str(config.hydra.job.name))
            ret = run_job(hydra_context=HydraContext(config_loader=None, callbacks=_WorkerCallbacks()),  # type: ignore[arg-type]
                          task_function=task, config=config, job_dir_key="hydra.sweep.dir",
                          job_subdir_key="hydra.sweep.subdir")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    if ret.hydra_cfg is not None:
        # plain nodes: its structured-config classes may be another import of the same module here
        # (Hydra's plugin scan) and then do not pickle by reference
        ret.hydra_cfg = OmegaConf.create(OmegaConf.to_container(ret.hydra_cfg, resolve=False))
    error = None
    if ret.status == JobStatus.FAILED:
        # the exception may not pickle (or unpickle) in the launcher: send its text
        error = f"{type(raised[-1]).__name__}: {raised[-1]}"  # run_job fails a job only when the task raised
        ret.return_value = RuntimeError(error)
    return ret, error


def _finished(ret: JobReturn | None) -> bool:
    """A job that ran to its end (not stopped, failed or unstarted)."""
    if ret is None or ret.status != JobStatus.COMPLETED:
        return False
    value = ret.return_value
    return not (isinstance(value, dict) and value.get("state") == "failed")


def _lost_job(config: DictConfig, overrides: Sequence[str], error: str) -> JobReturn:
    """The JobReturn of a job whose worker died (killed, out of memory): a failed run the
    end-of-sweep report lists, like any failure task.run catches."""
    task_cfg = copy.deepcopy(config)
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=None, working_dir=os.getcwd(),
                    task_name=str(config.hydra.job.name), status=JobStatus.COMPLETED)
    ret.return_value = {"state": "failed", "error": error}
    return ret


class NondetLocalLauncher(Launcher):
    def __init__(self, n_jobs: Optional[int] = None) -> None:
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _compose(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[DictConfig]:
        assert self.hydra_context is not None and self.config is not None
        configs = []
        for i, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = initial_job_idx + i
                sweep_config.hydra.job.num = initial_job_idx + i
            configs.append(sweep_config)
        return configs

    def resolve_n_jobs(self, configs: Sequence[DictConfig]) -> int:
        if self.n_jobs is not None:
            if int(self.n_jobs) < 1:
                raise SystemExit(f"nondet_hpc: error: hydra.launcher.n_jobs={self.n_jobs} is invalid: run at least "
                                 "1 job at a time (null = cores // train.threads).")
            return int(self.n_jobs)
        threads = [int(OmegaConf.select(c, "train.threads", default=0) or 0) for c in configs]
        return default_n_jobs(threads, usable_cores())

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        from nondet_hpc.config import ConfigError
        from nondet_hpc.sweep.waves import rule_from_config

        try:
            rule = rule_from_config(self.config.get("study"))
        except ConfigError as e:
            raise SystemExit(f"nondet_hpc: error: {e}\nNothing was run.") from None
        if rule is not None:
            return self._launch_waves(job_overrides, initial_job_idx, rule)
        return self._launch_jobs(job_overrides, initial_job_idx)

    # ------------------------------------------------------------------ a study grown in waves
    def _launch_waves(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                      rule: dict) -> list[JobReturn]:
        """The waves in sequence, with the sweep layer's record and decision: run the recorded seeds
        (a new study: wave 1 of each group; a rerun: every seed recorded, the finished ones skipped by
        the task), reduce, measure, decide, run the next seeds; job numbers go on."""
        from nondet_hpc.analysis import reduce
        from nondet_hpc.analysis.planning import sweep_groups
        from nondet_hpc.config import ConfigError
        from nondet_hpc.sweep import waves
        from nondet_hpc.sweep.manifest import SweepError

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        try:
            groups = waves.group_jobs(job_overrides)
            wanted = waves.seeds_to_plan(rule, groups, waves.load_study(sweep_dir))
        except (ConfigError, waves.StudyMismatch, SweepError) as e:  # SweepError: a damaged sweep.json
            raise SystemExit(f"nondet_hpc: error: {e}\nNothing was run.") from None
        jobs = {label: dict(seed_jobs) for label, seed_jobs in groups.items()}
        chosen = [ov for label, seed_jobs in groups.items() for s, ov in seed_jobs if s in set(wanted[label])]
        returns = self._launch_jobs(chosen, initial_job_idx, record=(rule, groups))
        while True:
            try:
                reduce.reduce_sweep(sweep_dir)  # measure() reads the reducer's per-model values
                error = None
            except Exception as e:  # noqa: BLE001 - the runs are safe; the study stops with the reason
                error = f"{type(e).__name__}: {e}"
            nxt = waves.decide_local(sweep_dir, error, lambda d, study: waves.precision(study, sweep_groups(d)),
                                     echo=lambda line: log.info(line))
            if not nxt:
                break
            log.info("nondet_hpc: study: next wave: " + "; ".join(f"{k}: seeds {v[0]}-{v[-1]}" for k, v in nxt.items()))
            chosen = [jobs[label][s] for label, seeds in nxt.items() for s in seeds]
            returns += self._launch_jobs(chosen, initial_job_idx + len(returns))
        study = waves.load_study(sweep_dir)
        if study:
            print("\n".join("[nondet_hpc] " + line for line in waves.describe(study)), flush=True)
        return returns

    def _record_first_waves(self, configs: Sequence[DictConfig], job_overrides: Sequence[Sequence[str]],
                            rule: dict, groups: dict) -> None:
        """sweep.json's study record (stop rule, groups, their configs, wave 1) before any job runs,
        with each job's run id as the task computes it."""
        from hydra.core.hydra_config import HydraConfig
        from nondet_hpc.sweep import waves
        from nondet_hpc.sweep.identity import plan_run

        assert self.config is not None
        label_of = {tuple(ov): label for label, seed_jobs in groups.items() for _, ov in seed_jobs}
        by_label: dict[str, list] = {}
        for config, overrides in zip(configs, job_overrides):
            job_cfg = copy.deepcopy(config)
            HydraConfig.instance().set_config(job_cfg)  # ${hydra:...} resolves per job
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            OmegaConf.resolve(job_cfg)
            by_label.setdefault(label_of[tuple(overrides)], []).append(plan_run(job_cfg, list(overrides)))
        waves.record_first_waves(self.config.hydra.sweep.dir, rule, groups, by_label,
                                 {"launcher": "local", "n_jobs": self.n_jobs}, [])

    def _launch_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                     record: tuple[dict, dict] | None = None) -> list[JobReturn]:
        assert self.config is not None
        configs = self._compose(job_overrides, initial_job_idx)
        if record is not None:
            self._record_first_waves(configs, job_overrides, *record)
        if not configs:
            return []
        n_jobs = min(self.resolve_n_jobs(configs), max(1, len(configs)))
        threads = sorted({int(OmegaConf.select(c, "train.threads", default=0) or 0) for c in configs})
        log.info(f"Launching {len(configs)} jobs locally, {n_jobs} at a time (train.threads={threads}, "
                 f"{usable_cores()} cores)")
        if n_jobs > 1 and 0 in threads:
            log.warning("train.threads=0: every job uses torch's default thread pool (all cores), so "
                        f"{n_jobs} jobs at once compete for the cores; set train.threads=N")
        with stopping.SweepStop() as stop:
            try:
                results, parents = self._run_phases(configs, job_overrides, n_jobs, stop)
            finally:
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if stop.stopped:
            names = [f"#{c.hydra.job.num} {' '.join(filter_overrides(o))}" for c, o in zip(configs, job_overrides)]
            stop.exit([n for n, r in zip(names, results) if _finished(r)],
                      [n for n, r in zip(names, results) if not _finished(r)])
        return [r for r in results + parents if r is not None]

    def _run(self, configs: list[DictConfig], job_overrides: Sequence[Sequence[str]], n_jobs: int,
             stop: stopping.SweepStop) -> list[JobReturn | None]:
        if not configs:
            return []
        n_jobs = min(n_jobs, len(configs))
        return (self._serial(configs, job_overrides, stop) if n_jobs == 1 else
                self._parallel(configs, job_overrides, n_jobs, stop))

    def _run_phases(self, configs: list[DictConfig], job_overrides: Sequence[Sequence[str]], n_jobs: int,
                    stop: stopping.SweepStop) -> tuple[list[JobReturn | None], list[JobReturn | None]]:
        """Parents first, then the runs that start from them (phases.py); every job of the sweep's
        result in its order, and the results of the parent jobs made here."""
        ph = phases.split(configs, job_overrides, int(configs[-1].hydra.job.num) + 1)
        if not ph.plans:
            return self._run(configs, job_overrides, n_jobs, stop), []
        log.info(f"{len(ph.plans)} parent run(s) first (their first epochs are shared by {len(ph.children)} "
                 f"run(s) perturbed later), then those runs")
        got = self._run([c for c, _, _ in ph.first], [o for _, o, _ in ph.first], n_jobs, stop)
        results: list[JobReturn | None] = [None] * len(configs)
        made = [r for (_, _, i), r in zip(ph.first, got) if i is None]
        for (_, _, i), r in zip(ph.first, got):
            if i is not None:
                results[i] = r
        if stop.stopped:
            return results, made
        failed = phases.orphans(ph, got, configs, _finished)
        for i, error in failed.items():
            results[i] = _lost_job(configs[i], job_overrides[i], error)
            log.error(f"#{configs[i].hydra.job.num} {error}")
            assert self.hydra_context is not None
            self.hydra_context.callbacks.on_job_end(config=configs[i], job_return=results[i])
        todo = [i for i in ph.children if i not in failed]
        for i, r in zip(todo, self._run([configs[i] for i in todo], [job_overrides[i] for i in todo], n_jobs, stop)):
            results[i] = r
        return results, made

    def _serial(self, configs: list[DictConfig], job_overrides: Sequence[Sequence[str]],
                stop: stopping.SweepStop) -> list[JobReturn | None]:
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        runs: list[JobReturn | None] = [None] * len(configs)
        for i, (config, overrides) in enumerate(zip(configs, job_overrides)):
            if stop.stopped:
                break
            log.info(f"\t#{config.hydra.job.num} : {' '.join(filter_overrides(overrides))}")
            try:  # Hydra creates the job's folder too, following links: a planted one is refused first
                _make_job_dir(config)
            except ConfigError as e:
                runs[i] = _lost_job(config, overrides, f"refused: {e}")
                log.error(f"#{config.hydra.job.num} refused: {e}")
                self.hydra_context.callbacks.on_job_end(config=config, job_return=runs[i])
                continue
            runs[i] = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def _parallel(self, configs: list[DictConfig], job_overrides: Sequence[Sequence[str]],
                  n_jobs: int, stop: stopping.SweepStop) -> list[JobReturn | None]:
        import cloudpickle

        assert self.hydra_context is not None and self.task_function is not None
        callbacks = self.hydra_context.callbacks
        results: list[JobReturn | None] = [None] * len(configs)
        futures: dict[Future, int] = {}
        ctx = get_context("spawn")
        pids = ctx.SimpleQueue()
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx, initializer=stopping.init_worker,
                                 initargs=(pids, os.getpid())) as pool:
            for i, config in enumerate(configs):
                callbacks.on_job_start(config=config, task_function=self.task_function)
                futures[pool.submit(_work, cloudpickle.dumps((self.task_function, config)))] = i
            pending = set(futures)
            while pending:
                # short waits: a signal is acted on here, outside its handler
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                stop.add_workers(pids)
                if stop.stopped:
                    stop.stop_workers()
                    pending = {f for f in pending if not f.cancel()}
                for fut in sorted(finished, key=lambda f: futures[f]):
                    i = futures[fut]
                    results[i] = self._collect(fut, configs[i], job_overrides[i], len(configs) - len(pending))
        return results

    def _collect(self, fut: Future, config: DictConfig, overrides: Sequence[str], n_finished: int) -> JobReturn | None:
        """A finished future's JobReturn, echoed and passed to the callbacks (None: never started)."""
        assert self.hydra_context is not None
        if fut.cancelled():
            return None
        try:
            ret, error = fut.result()
        except Exception as e:  # noqa: BLE001 - the worker died; the other jobs go on
            ret, error = _lost_job(config, overrides, f"worker process lost: {type(e).__name__}: {e}"), None
        if ret is None:  # returned unstarted: the sweep is being stopped
            return None
        self._echo(config, overrides, error, n_finished)
        self.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
        return ret

    @staticmethod
    def _echo(config: DictConfig, overrides: Sequence[str], error: str | None, n_finished: int) -> None:
        """One block per finished job: a header, then what the job printed (and what it raised)."""
        from nondet_hpc import safeio

        text = safeio.tail(_job_dir(config) / JOB_LOG, 8 << 20)  # a regular file only, never a FIFO
        print(f"[nondet_hpc] --- job #{config.hydra.job.num} ({n_finished} finished): "
              f"{' '.join(filter_overrides(overrides))}", flush=True)
        if text:
            print(text.rstrip("\n"), flush=True)
        if error is not None:
            print(f"[nondet_hpc] job #{config.hydra.job.num} raised {error}", flush=True)
