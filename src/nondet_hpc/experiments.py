"""`python -m nondet_hpc.experiments`: the ready studies of conf/experiment/, and what one costs.

    python -m nondet_hpc.experiments                    # every preset: table, groups x models, GPU-hours
    python -m nondet_hpc.experiments --models 60         # the whole study's bill at N = 60 models per group
    python -m nondet_hpc.experiments --plan SWEEP --target acc_sd_se=0.02   # N from the planner
    python -m nondet_hpc.experiments sources [KEY=VALUE ...]
                                                        # one preset: what it tests, and how many of its
                                                        # runs are already DONE in its out_dir

The catalogue itself (tables, sizes, cost model) is :mod:`nondet_hpc.presets`; this module adds
``plan`` (compose a preset's jobs with Hydra) and the command line.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import threads_for
from .presets import CIFAR_TEST, CIFAR_TRAIN, MEASURED, PARAMETERS, PRESETS, barrier_gpu_hours, cost_basis, \
    describe, gpu_hours_per_model, run_files_bytes

__all__ = ["plan", "main"]


# --------------------------------------------------------------------------------------------
# planning a preset: its jobs, their run ids, what is done already, what the rest costs


def _sweep_values(key: str, value: str) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ov = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    return list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]


def _thread_rule(launcher: Any, overrides: Sequence[str]) -> tuple[Callable[[int], int], int]:
    """(train.threads -> the count a run computes with, runs per task) for the launcher the sweep uses.

    ``config.threads_for`` is the rule: with ``hydra/launcher=slurm*`` (named in ``overrides``, as on
    the sweep's command line) train.threads=0 is the task's ``cpus_per_task // runs_per_task``; with
    the local launcher it is torch's default pool here, as in the process that would train.
    """
    from .cluster.fields import SLURM_LAUNCHER

    if launcher.get("_target_") == SLURM_LAUNCHER:
        cpus, k = int(launcher.cpus_per_task or 1), int(launcher.runs_per_task or 1)
        return (lambda t: threads_for(t, cpus=cpus, runs_per_task=k)), k
    packing = 1
    for o in overrides:  # the local launcher has no runs_per_task: it only changes the cost per model
        key, _, v = o.partition("=")
        if key.lstrip("+~") == "hydra.launcher.runs_per_task" and v.isdigit():
            packing = int(v)

    def local(t: int) -> int:
        if t:
            return threads_for(t)
        import torch  # only a run left at torch's default thread count needs torch's count

        return threads_for(t, local_default=torch.get_num_threads())
    return local, packing


def plan(name: str, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every job of ``python -m nondet_hpc -m experiment=name OVERRIDES``, without running anything.

    Returns one dict per job: ``run_id``, ``run_dir``, ``done`` (DONE exists), ``gpu_hours`` and
    ``overrides``. Composes the config once per combination of config-group choices (source, data,
    model) and sets the other swept keys directly, so 2,500 jobs take about a second. Overrides in
    ``KEY=a,b`` form sweep like on the command line and replace the preset's value of KEY. The run
    ids are the launcher's: ``train.threads=0`` resolves as on ``hydra/launcher=...`` in
    ``overrides`` (default: the local launcher), by the one thread rule (``config.threads_for``).
    Call it outside a running Hydra app.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .compose import GroupedComposer
    from .config import conf_dir
    from .registry.inputs import resolve_inputs
    from .registry.options import register_configs

    register_configs()
    # the launcher's choice and settings decide a run's thread count, nothing else a run computes;
    # its settings compose only with a launcher named (the default local one has other fields)
    launcher_overrides = [o for o in overrides if o.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher."))]
    if not any(o.lstrip("+~").startswith("hydra/launcher=") for o in launcher_overrides):
        launcher_overrides = []
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={name}", *launcher_overrides], return_hydra_config=True)
        params = dict(OmegaConf.to_container(base.hydra.sweeper.params or {}, resolve=False))
        groups = set(base.hydra.runtime.choices)
        threads, packing = _thread_rule(base.hydra.launcher, overrides)
        # command-line overrides replace the preset's sweep values of the same key, as in Hydra
        for o in overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+~").startswith("hydra"):  # the launcher's: read above
                continue
            params[k.lstrip("+~")] = v
        keys = list(params)
        values = [_sweep_values(k, str(params[k])) for k in keys]
        group_keys = [k for k in keys if k in groups]
        # one composition per combination of group choices; the value keys are set on a copy
        bases = GroupedComposer(lambda gk: compose("config", overrides=[f"experiment={name}",
                                                                        *(f"{k}={v}" for k, v in gk)]),
                                copy_config=lambda c: c.copy())
        jobs = []
        for combo in itertools.product(*values):
            job = dict(zip(keys, combo))
            cfg = bases.get(tuple((k, job[k]) for k in group_keys))
            for k, v in job.items():
                if k not in groups:
                    OmegaConf.update(cfg, k, v, merge=False)
            cfg.train.threads = threads(int(cfg.train.threads))
            resolve_inputs(cfg)  # model=custom, data=npz|folder: their content is part of the run id
            jobs.append(_job_record(cfg, job, packing))
    return jobs


def _job_record(cfg: Any, job: dict[str, Any], packing: int) -> dict[str, Any]:
    """One planned job: its run id and folder, whether it is DONE, and its cost."""
    from omegaconf import OmegaConf

    from .rundir import is_done, run_dir, run_id

    rd = run_dir(cfg)
    precision = str(OmegaConf.select(cfg, "train.precision", default="fp32"))
    # a run perturbed from epoch k trains epochs k..E only: its first k are its parent's (sweep/parents.py)
    trained = int(cfg.train.epochs) - int(OmegaConf.select(cfg, "source.from_epoch", default=0) or 0)
    hours = gpu_hours_per_model(cfg.model.name, trained, num_classes=int(cfg.data.num_classes or 10),
                                snapshots=int(cfg.train.snapshots), views=list(cfg.eval.views),
                                precision=precision, runs_per_task=packing)
    return {"run_id": run_id(cfg), "run_dir": str(rd), "done": is_done(rd), "gpu_hours": hours,
            "disk_bytes": _disk_bytes(cfg),
            "cost_basis": cost_basis(cfg.model.name, precision, packing)["note"],
            "overrides": [f"{k}={v}" for k, v in job.items()], "experiment": cfg.experiment,
            "data": cfg.data.name}


def _disk_bytes(cfg: Any) -> float:
    """Bytes of the run's folder when finished (presets.run_files_bytes; digits: its 1,300/497 split);
    NaN for a model whose tensors the cost model does not count (presets.PARAMETERS)."""
    from .run.recording import record_settings

    if cfg.model.name not in PARAMETERS:
        return math.nan
    d = cfg.data
    n_train, n_test = (1797 - int(d.test_size), int(d.test_size)) if d.name == "digits" else (CIFAR_TRAIN, CIFAR_TEST)
    n_train, n_test = int(d.get("train_subset") or n_train), int(d.get("test_subset") or n_test)
    sizes = run_files_bytes(cfg.model.name, int(cfg.train.epochs), num_classes=int(d.num_classes), n_train=n_train,
                            n_test=n_test, batch_size=int(cfg.train.batch_size), views=list(cfg.eval.views),
                            snapshots=int(cfg.train.snapshots), record=record_settings(cfg))
    return sum(sizes.values())


def _preset_disk(p: dict[str, Any]) -> float:
    """GB of run folders of a preset (plain logits; the default record.* files included)."""
    eps = p["epochs"] if isinstance(p["epochs"], list) else [p["epochs"]]
    classes = 100 if p["data"] == "cifar100" else 10
    per_epochs = p["groups"] * p["models"] / len(eps)
    return sum(per_epochs * sum(run_files_bytes(p["model"], e, num_classes=classes).values()) for e in eps) / 1e9


# --------------------------------------------------------------------------------------------
# command line


def _table() -> str:
    rows = [("preset", "groups x models", "epochs", "V100 GPU-h*", "disk**", "out_dir", "table")]
    for k, p in PRESETS.items():
        ep = p["epochs"]
        eps = ",".join(map(str, ep)) if isinstance(ep, (list, tuple)) else str(ep)
        cost = f"{p['gpu_hours']:g}" + (f" ({p['gpu_hours_alone']:g} alone)" if p["reuses"] else "")
        rows.append((k, f"{p['groups']} x {p['models']}", eps, cost, f"{_preset_disk(p):.1f} GB", p["out_dir"],
                     p["table"].split(" (")[0]))
    w = [max(len(r[i]) for r in rows) for i in range(6)]
    text = "\n".join("  ".join(c.ljust(w[i]) if i < 6 else c for i, c in enumerate(r)) for r in rows)
    measured = "none of these figures was measured on a GPU" if not MEASURED else \
        f"GPU measurements exist for {len(MEASURED)} (model, precision, runs per GPU) settings: see plan NAME"
    return (text + f"\n* {cost_basis()['note']} ({measured}).\n** run folders of all its runs (shared runs "
            f"counted in each preset): logits, checkpoint, final weights and trajectory with the default record.*; "
            f"per run: docs/performance.md, 'Storage per run'.")


def bill(n: int) -> str:
    """Every preset's V100 GPU-hours with N models per group beside its figure at the preset's N.

    Runs shared between tables are counted once (a preset that reuses another's runs, e.g. nmodels
    and the 500-epoch rows of epochs, counts only its own), as in the presets' figures."""
    rows = [("preset", "models", "V100 GPU-h at its N", f"at N={n}")]
    total_p = total_n = 0.0
    for k, p in PRESETS.items():
        if k == "sources_clean":
            continue  # our variant, not a table of the report
        at_n = p["gpu_hours"] * n / p["models"]
        total_p, total_n = total_p + p["gpu_hours"], total_n + at_n
        rows.append((k, str(p["models"]), f"{p['gpu_hours']:,.0f}", f"{at_n:,.0f}"))
    rows.append(("total", "", f"{total_p:,.0f}", f"{total_n:,.0f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    out = "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)
    note = ("\nCost model: presets.gpu_hours_per_model (0.7 V100-h per 500-epoch ResNet-14). The nmodels "
            "ablation subsamples the sources runs, so it needs N >= its largest subset." if n < 100 else "")
    return out + note


def _bill_n(a: argparse.Namespace) -> int:
    if a.models is not None:
        if a.models < 2:
            raise SystemExit("nondet_hpc.experiments: error: --models must be at least 2 (an SD needs 2 models)")
        return int(a.models)
    from .analysis.planning import PlanError, parse_target, plan_sweep

    try:
        targets = dict(parse_target(t) for t in a.target or [])
        plan_ = plan_sweep(a.plan, targets, check=False)
    except PlanError as e:
        raise SystemExit(f"nondet_hpc.experiments: error: {e}") from None
    need = [t["common_n_needed"] for t in plan_["study"]["targets"].values()]
    if not need or not all(math.isfinite(x) for x in need):
        raise SystemExit(f"nondet_hpc.experiments: error: the planner cannot predict N from {a.plan} for "
                         f"{', '.join(a.target)}; see python -m nondet_hpc.plan {a.plan} --target ...")
    n = int(max(need))
    print(f"N = {n} models per group: the planner's prediction from {a.plan} for {', '.join(a.target)}")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nondet_hpc.experiments",
        description="List the ready studies (conf/experiment/), or plan one: its table, claims, number of "
                    "runs, how many are DONE already in its out_dir, and the estimated V100 GPU-hours left.",
        epilog="Run a preset: python -m nondet_hpc -m experiment=NAME hydra/launcher=slurm_v100. "
               "Check the pipeline first: python -m nondet_hpc -m experiment=NAME_quick (minutes on a CPU). "
               "Cost model and every preset: docs/experiments/README.md.")
    p.add_argument("name", nargs="?", help="a preset (or NAME_quick); omit to list them all")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides as on the sweep command line, e.g. out_dir=X")
    p.add_argument("--models", type=int, help="print the whole study's bill at this many models per group")
    p.add_argument("--plan", metavar="SWEEP_DIR", help="the bill at the N the planner predicts from this pilot sweep")
    p.add_argument("--target", action="append", help="with --plan: a target as in python -m nondet_hpc.plan, "
                                                     "e.g. acc_sd_se=0.02 (repeatable)")
    a = p.parse_args(argv)
    if a.models is not None or a.plan:
        if a.plan and not a.target:
            p.error("--plan needs --target, e.g. --target acc_sd_se=0.02")
        print(bill(_bill_n(a)))
        return 0
    if not a.name:
        print(_table())
        return 0
    try:
        jobs = plan(a.name, a.overrides)
    except Exception as e:  # noqa: BLE001 - composition errors name the problem
        print(f"nondet_hpc.experiments: cannot compose experiment={a.name}: {e}", file=sys.stderr)
        return 2
    print(describe(a.name))
    done = [j for j in jobs if j["done"]]
    todo = [j for j in jobs if not j["done"]]
    folders = sorted({str(Path(j["run_dir"]).parent.parent) for j in jobs})
    hours = math.fsum(j["gpu_hours"] for j in todo)
    cost = ("digits: a CPU does it in seconds per run, no GPU needed" if all(j["data"] == "digits" for j in jobs) else
            f"about {hours:,.0f} V100 GPU-hours to go" if math.isfinite(hours) else
            "no V100 estimate: some models have no cost figure (the cost model is CIFAR-10's; docs/models.md)")
    disk = math.fsum(j["disk_bytes"] for j in todo) / 1e9
    disk_text = (f"about {disk:,.2f} GB of run folders to write (logits, checkpoints, final weights and trajectories)"
                 if math.isfinite(disk) else "no disk estimate: the storage model counts the tensors of "
                 f"{', '.join(sorted(PARAMETERS))} only (presets.PARAMETERS)")
    print(f"{len(jobs)} runs in {', '.join(folders)}: {len(done)} DONE, {len(todo)} to train; {cost}; {disk_text}.")
    entry = PRESETS.get(a.name, {})
    if entry.get("parents") and jobs and jobs[0]["data"] != "digits":  # not among the sweep's own jobs
        extra = entry["parents"] * gpu_hours_per_model(entry["model"], entry["epochs"]) + \
            barrier_gpu_hours(entry["barrier_pairs"], entry["model"])
        print(f"Besides: {entry['parents']} parent run(s) whose first epochs the runs perturbed later share, and "
              f"{entry['barrier_pairs']} loss-barrier pairs: about {extra:,.1f} V100 GPU-hours more, unless done.")
    if jobs and jobs[0]["data"] != "digits":
        print(f"Cost basis: {jobs[0]['cost_basis']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
