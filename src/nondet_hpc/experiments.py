"""The ready studies of conf/experiment/: which table each reproduces, its size, and what it costs.

    python -m nondet_hpc.experiments                    # every preset: table, groups x models, GPU-hours
    python -m nondet_hpc.experiments sources [KEY=VALUE ...]
                                                        # one preset: what it tests, and how many of its
                                                        # runs are already DONE in its out_dir

``PRESETS`` is the table the reducer reads (``describe(name)``, keyed by the ``experiment`` key that
every run's config.yaml records) to say which table of the paper or the report a sweep reproduces.
Every conf/experiment/<name>.yaml (not the ``_quick`` variants) has an entry, and the numbers in the
YAML's header equal the entry's (tests/test_experiments.py checks both against the composed sweep).

Cost model (``gpu_hours_per_model``), V100 GPU-hours:

    0.7 h  x  epochs / 500  x  MACs(model) / MACs(ResNet-14)  x  (1 + evaluation share)

0.7 h is the report's measurement for ResNet-14 on CIFAR-10, 500 epochs (490 GPU-hours for 700
models, "about 40 min" per model). MACs are multiply-accumulates of one 32x32 forward pass, counted
on models.build_model (ResNet-34 is 43.9x ResNet-14). The evaluation share counts every test-time
view's forward passes (10,000 test images x distinct transforms x evaluations, one at the end plus
one per snapshot) against training's 3 x epochs x 50,000 image passes (forward + backward ~ 3
forwards). Scaling by FLOPs is pessimistic for big models: ResNet-14 keeps a V100 far from its peak,
ResNet-34 much less so, so the ResNet-34 figure is an upper bound (see docs/experiments/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["PRESETS", "BASE_HOURS", "MACS", "describe", "describe_sweep", "gpu_hours_per_model",
           "transforms_per_image", "plan", "main"]

#: V100 GPU-hours of one ResNet-14 / CIFAR-10 / 500-epoch model (report: 490 h for 700 models).
BASE_HOURS = 0.7
BASE_EPOCHS = 500
#: Multiply-accumulates of one 32x32 forward pass without the classifier: (convolutions, fc inputs).
#: The classifier adds fc_in x classes. Counted with forward hooks on models.build_model.
MACS: dict[str, tuple[int, int]] = {
    "resnet14": (26_394_624, 64),
    "resnet18": (555_417_600, 512),
    "resnet34": (1_159_397_376, 512),
}
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


def model_macs(model: str, num_classes: int = 10) -> int:
    conv, fc_in = MACS[model]
    return conv + fc_in * num_classes


def transforms_per_image(views: Iterable[str], pad: int = 4) -> int:
    """Distinct forward passes per test image that evaluating ``views`` costs (plain always included)."""
    from .run.views import view_transforms

    union: set = set()
    for v in ["plain", *views]:
        union.update(view_transforms(v, pad))
    return len(union)


def gpu_hours_per_model(model: str = "resnet14", epochs: int = BASE_EPOCHS, *, num_classes: int = 10,
                        snapshots: int = 1, views: Sequence[str] = ("plain",), n_train: int = CIFAR_TRAIN,
                        n_test: int = CIFAR_TEST) -> float:
    """Estimated V100 GPU-hours of one run (module docstring: how)."""
    train = BASE_HOURS * epochs / BASE_EPOCHS * model_macs(model, num_classes) / model_macs("resnet14", 10)
    evaluations = 1 + (snapshots if snapshots > 1 else 0)
    eval_share = evaluations * transforms_per_image(views) * n_test / (3 * epochs * n_train)
    return train * (1 + eval_share)


# --------------------------------------------------------------------------------------------
# the presets

_SOURCES_ROWS = "none,init,shuffle,augment,cudnn,shuffle+cudnn,shuffle+augment+cudnn,all"

PRESETS: dict[str, dict[str, Any]] = {
    "sources": {
        "table": "Sources of nondeterminism, ResNet-14 on CIFAR-10 (paper Table 1, replicated by the report)",
        "claims": [1],
        "what": "each source alone (init, shuffle, augment, cuDNN), two combinations, all sources "
                "together, and the determinism control",
        "models": 100, "epochs": 500, "groups": 8,
        "gpu_hours": 560, "gpu_hours_alone": 560, "reuses": None,
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/sources",
        "report": "report/metrics.md (one row per source), report/claim1.csv",
        "doc": "docs/experiments/sources.md",
    },
    "bitflip": {
        "table": "Random bit change (one float32 ulp of one initial weight), ResNet-14 on CIFAR-10 "
                 "(the paper's instability experiment)",
        "claims": [2],
        "what": "one weight of the stem convolution moved by one ulp before training, everything else fixed",
        "models": 100, "epochs": 500, "groups": 1,
        "gpu_hours": 70, "gpu_hours_alone": 70, "reuses": None,
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/sources",
        "report": "report/metrics.md, row 'Random Bit Change' beside the source rows of the sources preset",
        "doc": "docs/experiments/bitflip.md",
    },
    "tta": {
        "table": "Test-time augmentation and accelerated ensembling, ResNet-14 on CIFAR-10 (the paper's "
                 "variability-reduction table: Flip, Crop25, Crop81, Flip-Crop25, Flip-Crop81, Acc.Ens, "
                 "Acc.Ens/Flip, Acc.Ens/Flip-Crop81)",
        "claims": [3],
        "what": "all sources of nondeterminism; 100 single models evaluated with every TTA view, and 100 "
                "accelerated ensembles (5 snapshot cycles in the same 500 epochs)",
        "models": 100, "epochs": 500, "groups": 2,
        "gpu_hours": 151, "gpu_hours_alone": 151, "reuses": None,
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/tta",
        "report": "report/metrics.md (TTA and Acc.Ens rows with their reduction %)",
        "doc": "docs/experiments/tta.md",
    },
    "nmodels": {
        "table": "Number of models N = 10, 25, 50, 75, 100 (report Table 8): subsampled from the sources runs",
        "claims": [1],
        "what": "no new training: the sources sweep again (every run is skipped), then the reducer's "
                "N-models ablation on random N-subsets of the 100 runs of each group",
        "models": 100, "epochs": 500, "groups": 8,
        "gpu_hours": 0, "gpu_hours_alone": 560, "reuses": "sources",
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/sources",
        "report": "report/ablation.md and report/sd_vs_n.png",
        "doc": "docs/experiments/nmodels.md",
    },
    "epochs": {
        "table": "Number of epochs, 100 to 500 (the report's ablation): the single sources and all sources "
                 "at 100, 200, 300, 400 and 500 epochs",
        "claims": [1],
        "what": "init, shuffle, augment, cuDNN and all sources, 100 models each, at 5 training lengths; "
                "the 500-epoch runs are those of the sources preset (same folder, skipped if done)",
        "models": 100, "epochs": [100, 200, 300, 400, 500], "groups": 25,
        "gpu_hours": 700, "gpu_hours_alone": 1050, "reuses": "sources",
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/sources",
        "report": "report/metrics.md (rows labelled train.epochs=...) and report/claim1.csv per length",
        "doc": "docs/experiments/epochs.md",
    },
    "cifar100": {
        "table": "Generalisation: CIFAR-100 with ResNet-34, 25 models, 200 epochs (the report's extension)",
        "claims": [1, 2],
        "what": "each single source, the random bit change and all sources, 25 models each",
        "models": 25, "epochs": 200, "groups": 6,
        "gpu_hours": 1846, "gpu_hours_alone": 1846, "reuses": None,
        "data": "cifar100", "model": "resnet34", "out_dir": "outputs/cifar100",
        "report": "report/metrics.md, report/claim1.csv",
        "doc": "docs/experiments/cifar100.md",
    },
}

QUICK_SUFFIX = "_quick"

_CLAIMS = {
    1: "every source alone gives about the same variability as all sources together",
    2: "one ulp of one initial weight gives as much variability as any source (instability)",
    3: "test-time augmentation and accelerated ensembling reduce variability at 1x training cost",
}


def _epochs_text(epochs: Any) -> str:
    if isinstance(epochs, (list, tuple)):
        return f"{min(epochs)}-{max(epochs)} epochs"
    return f"{epochs} epochs"


def describe(name: str | None) -> str:
    """One paragraph: the table a sweep made with ``experiment=name`` reproduces, its size and cost.

    Quick variants (``<name>_quick``) say that they check the pipeline and reproduce nothing;
    an unknown or empty name says so instead of raising.
    """
    if not name:
        return "This sweep was not made from a preset (no experiment= key): it reproduces no table by itself."
    quick = name.endswith(QUICK_SUFFIX) and name[: -len(QUICK_SUFFIX)] in PRESETS
    key = name[: -len(QUICK_SUFFIX)] if quick else name
    p = PRESETS.get(key)
    if p is None:
        return (f"This sweep was made with experiment={name}, which is not one of the presets "
                f"({', '.join(PRESETS)}): it reproduces no table of the study.")
    claims = "; ".join(f"claim {c}: {_CLAIMS[c]}" for c in p["claims"])
    if quick:
        return (f"This sweep is the quick check of experiment={key} (digits, a few epochs and seeds): it "
                f"exercises the pipeline of '{p['table']}' in minutes on a CPU; its numbers say nothing "
                f"about the claims. The real table: python -m nondet_hpc -m experiment={key} "
                f"hydra/launcher=slurm_v100 (see {p['doc']}).")
    cost = (f"about {p['gpu_hours']:g} V100 GPU-hours" if not p["reuses"] else
            f"about {p['gpu_hours']:g} V100 GPU-hours once experiment={p['reuses']} has run "
            f"({p['gpu_hours_alone']:g} without it)")
    return (f"This sweep reproduces {p['table']}: {p['groups']} group(s) x {p['models']} models, "
            f"{p['model']} on {p['data']}, {_epochs_text(p['epochs'])}; {cost}. It tests {claims}. "
            f"Read it in {p['report']}; how to judge the outcome: {p['doc']}.")


def describe_sweep(names: Iterable[str | None]) -> str:
    """``describe`` for every distinct experiment name found in one sweep folder, in order.

    Several presets share outputs/sources (sources, bitflip, epochs, nmodels), so one folder can
    hold runs made under several names; runs without a preset count as "not from a preset".
    """
    seen = list(dict.fromkeys(n or "" for n in names))
    lines = [describe(n or None) for n in seen]
    if "sources" in seen and "nmodels" not in seen:  # its N-models ablation is that table
        lines.append(describe("nmodels"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# planning a preset: its jobs, their run ids, what is done already, what the rest costs


def _sweep_values(key: str, value: str) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ov = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    return list(ov.sweep_iterator()) if ov.is_sweep_override() else [ov.value()]


def plan(name: str, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every job of ``python -m nondet_hpc -m experiment=name OVERRIDES``, without running anything.

    Returns one dict per job: ``run_id``, ``run_dir``, ``done`` (DONE exists), ``gpu_hours`` and
    ``overrides``. Composes the config once per combination of config-group choices (source, data,
    model) and sets the other swept keys directly, so 2,500 jobs take about a second. Overrides in
    ``KEY=a,b`` form sweep like on the command line and replace the preset's value of KEY.
    Call it outside a running Hydra app.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .__main__ import conf_dir
    from .compose import GroupedComposer
    from .config import register_configs
    from .rundir import is_done, run_dir, run_id

    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
        params = dict(OmegaConf.to_container(base.hydra.sweeper.params or {}, resolve=False))
        groups = set(base.hydra.runtime.choices)
        # command-line overrides replace the preset's sweep values of the same key, as in Hydra
        for o in overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+~").startswith("hydra"):  # launcher settings: no effect on what a run computes
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
            rd = run_dir(cfg)
            hours = gpu_hours_per_model(cfg.model.name, int(cfg.train.epochs), num_classes=int(cfg.data.num_classes),
                                        snapshots=int(cfg.train.snapshots), views=list(cfg.eval.views))
            jobs.append({"run_id": run_id(cfg), "run_dir": str(rd), "done": is_done(rd), "gpu_hours": hours,
                         "overrides": [f"{k}={v}" for k, v in job.items()], "experiment": cfg.experiment,
                         "data": cfg.data.name})
    return jobs


# --------------------------------------------------------------------------------------------
# command line


def _table() -> str:
    rows = [("preset", "groups x models", "epochs", "V100 GPU-h", "out_dir", "table")]
    for k, p in PRESETS.items():
        ep = p["epochs"]
        eps = ",".join(map(str, ep)) if isinstance(ep, (list, tuple)) else str(ep)
        cost = f"{p['gpu_hours']:g}" + (f" ({p['gpu_hours_alone']:g} alone)" if p["reuses"] else "")
        rows.append((k, f"{p['groups']} x {p['models']}", eps, cost, p["out_dir"], p["table"].split(" (")[0]))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w[i]) if i < 5 else c for i, c in enumerate(r)) for r in rows)


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
    a = p.parse_args(argv)
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
    cost = (f"about {hours:,.0f} V100 GPU-hours to go" if any(j["data"] != "digits" for j in jobs) else
            "digits: a CPU does it in seconds per run, no GPU needed")
    print(f"{len(jobs)} runs in {', '.join(folders)}: {len(done)} DONE, {len(todo)} to train; {cost}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
