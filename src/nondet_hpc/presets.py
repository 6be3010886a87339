"""The catalogue of ready studies (conf/experiment/): which table each reproduces, its size, its cost.

Torch- and Hydra-free, so the reducer and status can describe a sweep without importing the
trainer or Hydra's composer. ``python -m nondet_hpc.experiments`` prints it.

``PRESETS`` is the table the reducer reads (``describe(name)``, keyed by the ``experiment`` key that
every run's config.yaml records) to say which table of the paper or the report a sweep reproduces.
Every conf/experiment/<name>.yaml (not the ``_quick`` variants) has an entry, and the numbers in the
YAML's header equal the entry's (tests/test_experiments.py checks both against the composed sweep).

Cost model (``gpu_hours_per_model``), V100 GPU-hours:

    0.7 h  x  epochs / 500  x  MACs(model) / MACs(ResNet-14)  x  (1 + evaluation share)

0.7 h is the report's measurement for ResNet-14 on CIFAR-10, 500 epochs (490 GPU-hours for 700
models, "about 40 min" per model). MACs are multiply-accumulates of one 32x32 forward pass, counted
on models.build_model and declared with each model (registry/models.py; ResNet-34 is 43.9x
ResNet-14). The evaluation share counts every test-time view's forward passes (10,000 test
images x distinct transforms x evaluations, one at the end plus one per snapshot) against
training's 3 x epochs x 50,000 image passes (forward + backward ~ 3 forwards), and the trajectory's
probe (record.probe images per recorded point: 18 x 512 for 500 epochs, +0.01 %).
Scaling by FLOPs is pessimistic for big models: ResNet-14 keeps a V100 far from its peak,
ResNet-34 much less so, so the ResNet-34 figure is an upper bound (see docs/experiments/README.md).

Precision (``train.precision``) and runs per GPU (``hydra.launcher.runs_per_task``) change the cost
only through a measurement: ``MEASURED`` holds aggregate training images/s of K packed runs on one
GPU, measured by benchmarks/packing.py / gpu_check.sh on a lent GPU. Where a (model, precision, K)
has one, a model costs ``epochs x 50,000 / images-per-s`` GPU-seconds (the K runs share the GPU);
where it has none, the fp32, one-model-per-GPU estimate above is used and ``cost_basis`` says so
(an upper bound: packing and lower precision only make a run cheaper).

Disk (``run_files_bytes``): a run folder's logits, checkpoint, final weights and trajectory
(docs/performance.md, "Storage per run"); ``python -m nondet_hpc.experiments NAME`` adds it up.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from .config import RecordConfig
from .records.schedule import Grid
from .registry.models import MODELS
from .viewspec import view_transforms

__all__ = ["PRESETS", "BASE_HOURS", "MACS", "MEASURED", "PARAMETERS", "cost_basis", "describe", "describe_sweep",
           "gpu_hours_per_model", "barrier_gpu_hours", "n_parameters", "record_points", "run_files_bytes", "transforms_per_image",
           "model_macs"]

#: V100 GPU-hours of one ResNet-14 / CIFAR-10 / 500-epoch model (report: 490 h for 700 models).
BASE_HOURS = 0.7
BASE_EPOCHS = 500
#: Multiply-accumulates of one 32x32 forward pass without the classifier: (convolutions, fc inputs),
#: of every registered model that has them counted (registry/models.py, ``Model.macs``): the models
#: the cost model covers. The classifier adds fc_in x classes.
MACS: dict[str, tuple[int, int]] = {m.name: m.macs for m in MODELS.values() if m.macs is not None}
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
#: (model, precision, runs_per_task) -> (aggregate training images/s on one GPU, which GPU). Only
#: figures measured on a GPU go here (none yet: no GPU was lent when packing was added).
MEASURED: dict[tuple[str, str, int], tuple[float, str]] = {}


def cost_basis(model: str = "resnet14", precision: str = "fp32", runs_per_task: int = 1) -> dict[str, Any]:
    """Where a model's cost figure comes from: a GPU measurement or the report-based estimate."""
    key = (model, precision, int(runs_per_task))
    if key in MEASURED:
        images_per_s, gpu = MEASURED[key]
        return {"measured": True, "images_per_s": images_per_s,
                "note": f"measured on a {gpu}: {images_per_s:,.0f} training images/s with {runs_per_task} run(s) "
                        f"per GPU, {precision}"}
    extra = "" if (precision, int(runs_per_task)) == ("fp32", 1) else \
        f"; no GPU measurement of {precision} with {runs_per_task} run(s) per GPU yet, so an upper bound"
    return {"measured": False, "images_per_s": None,
            "note": f"estimate from the report's {BASE_HOURS:g} V100-hours per fp32 ResNet-14 run, one model per "
                    f"GPU{extra}"}


def model_macs(model: str, num_classes: int = 10) -> int:
    conv, fc_in = MACS[model]
    return conv + fc_in * num_classes


def transforms_per_image(views: Iterable[str], pad: int = 4) -> int:
    """Distinct forward passes per test image that evaluating ``views`` costs (plain always included)."""
    union: set = set()
    for v in ["plain", *views]:
        union.update(view_transforms(v, pad))
    return len(union)


#: (parameter values without the classifier, BatchNorm buffer values, parameter tensors, buffer tensors)
#: of every model the cost model covers, counted on run/models.build_model (tests/test_instability_runs.py); resnet18b is version 0.1.0's resnet18
PARAMETERS: dict[str, tuple[int, int, int, int]] = {
    "resnet14": (171_952, 1_039, 45, 45), "resnet18b": (11_168_832, 9_620, 62, 60),
    "resnet34": (21_276_992, 17_060, 110, 108)}
_NAME_CHARS, _ENTRY, _STREAMS = 32, 200, 50_000  # longest tensor name, bytes per archive entry, stream states


def n_parameters(model: str, num_classes: int = 10) -> int:
    return PARAMETERS[model][0] + (MACS[model][1] + 1) * num_classes


def record_points(epochs: int, steps_per_epoch: int, record: Any = None) -> int:
    """Points of the recording grid of ``record`` (config.RecordConfig; default: the log2 grid)."""
    rec = record if record is not None else RecordConfig()
    grid = Grid(rec.step_base, rec.epoch_base, tuple(rec.extra_epochs) + tuple(rec.keep_checkpoints))
    return len(grid.steps(steps_per_epoch, epochs))


def run_files_bytes(model: str = "resnet14", epochs: int = BASE_EPOCHS, *, num_classes: int = 10,
                    n_train: int = CIFAR_TRAIN, n_test: int = CIFAR_TEST, batch_size: int = 512,
                    views: Sequence[str] = ("plain",), snapshots: int = 1, record: Any = None) -> dict[str, int]:
    """Bytes of one finished run folder by file (estimate within a few %; tests/test_experiments.py
    checks it against a real run): logits and labels, checkpoint.pt (model, optimizer momentum and
    the recorder's state), and with the defaults of ``record`` (config.RecordConfig) the final
    weights and the trajectory of the default grid."""
    rec = record if record is not None else RecordConfig()
    P, b = n_parameters(model, num_classes), PARAMETERS[model][1]
    n_tensors = PARAMETERS[model][2] + 2
    T = record_points(epochs, -(-n_train // batch_size), rec) if rec.trajectory else 0
    K = min(rec.probe, n_test)
    trajectory = (T * (8 * rec.sketch_dim + 40 * n_tensors + 48 + 4 * K * num_classes)
                  + n_tensors * (4 * _NAME_CHARS + 8) + 16 * K + 15 * _ENTRY) if rec.trajectory else 0
    weights = 4 * (P + b) + 100 * (n_tensors + PARAMETERS[model][3]) if rec.weights and P <= \
        rec.weights_max_params else 0
    n_views = len(views) + (snapshots * len(views) if snapshots > 1 else 0)
    return {"logits": 4 * n_views * n_test * num_classes + 8 * n_test + 128 * (n_views + 1),
            "checkpoint": 8 * P + 4 * b + trajectory + _STREAMS, "weights": weights, "trajectory": trajectory}


def gpu_hours_per_model(model: str = "resnet14", epochs: int = BASE_EPOCHS, *, num_classes: int = 10,
                        snapshots: int = 1, views: Sequence[str] = ("plain",), n_train: int = CIFAR_TRAIN,
                        n_test: int = CIFAR_TEST, precision: str = "fp32", runs_per_task: int = 1) -> float:
    """GPU-hours of one run: measured where ``cost_basis`` has a figure, else the V100 estimate
    (module docstring: how)."""
    basis = cost_basis(model, precision, runs_per_task)
    if basis["measured"]:
        train = epochs * n_train / basis["images_per_s"] / 3600
    elif model not in MACS:  # model=custom, the MNIST and ImageNet models: no CIFAR-10 cost figure
        return math.nan
    else:
        train = BASE_HOURS * epochs / BASE_EPOCHS * model_macs(model, num_classes) / model_macs("resnet14", 10)
    evaluations = 1 + (snapshots if snapshots > 1 else 0)
    # the trajectory's probe: one forward pass of record.probe test images per recorded point
    probe = record_points(epochs, -(-n_train // 512)) * min(RecordConfig.probe, n_test)
    eval_share = (evaluations * transforms_per_image(views) * n_test + probe) / (3 * epochs * n_train)
    return train * (1 + eval_share)


def barrier_gpu_hours(pairs: int, model: str = "resnet14", *, points: int = 11, bn_images: int = 5000,
                      n_train: int = CIFAR_TRAIN, n_test: int = CIFAR_TEST, num_classes: int = 10) -> float:
    """GPU-hours of ``pairs`` loss-barrier pairs (run/barrier.py): at each of ``points`` models on the
    line, one forward pass of ``min(bn_images, n_train)`` training images (BatchNorm statistics)
    and of the ``n_test`` test images, charged like training's image passes (forward + backward ~
    3 forwards) in the V100 estimate of ``gpu_hours_per_model``."""
    if model not in MACS:
        return math.nan
    passes = pairs * points * (min(bn_images, n_train) + n_test)
    scale = model_macs(model, num_classes) / model_macs("resnet14", 10)
    return BASE_HOURS * passes / (3 * n_train * BASE_EPOCHS) * scale


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
    "sources_clean": {  # the same sweep with conf/variant/clean.yaml: ours, not the authors' experiment
        "table": "Sources of nondeterminism, ResNet-14 on CIFAR-10, with our cleaner variant (parameter "
                 "groups by type, augmentation drawn per image: 'Data Shuffling' is the order only)",
        "claims": [1],
        "what": "the sources preset's 8 groups with train.param_groups=by_type and data.augment_draw=by_image",
        "models": 100, "epochs": 500, "groups": 8,
        "gpu_hours": 560, "gpu_hours_alone": 560, "reuses": None,
        "data": "cifar10", "model": "resnet14", "out_dir": "outputs/sources_clean",
        "report": "report/metrics.md (one row per source), report/claim1.csv",
        "doc": "docs/experiments/sources_clean.md",
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

#: The ladder of experiment=architectures: from a convex linear model to a wide ResNet (claim 2 across
#: architectures; analysis/architectures.py makes its table in this order).
ARCHITECTURES = ("linearnet", "hiddennet1", "hiddennet2", "resnet6", "resnet14", "resnet14_2")
PRESETS["architectures"] = {
    "table": "Where instability begins: each architecture's bit-change variability as a fraction of its "
             "initialisation variability, from a linear model to ResNet-14 at twice the width, on CIFAR-10",
    "claims": [2],
    "what": "six architectures (linear; one hidden fully connected layer; one hidden conv layer; ResNet-6; "
            "ResNet-14; ResNet-14 at 2x width), each with the control, init and the bit change; grown in waves "
            "of 10 models per group until the bootstrap SE of the accuracy SD is 0.02 pp (at most 100)",
    "models": 100, "epochs": 500, "groups": 18,
    "gpu_hours": 1146, "gpu_hours_alone": 1146, "reuses": None,
    "data": "cifar10", "model": "resnet14", "models_swept": list(ARCHITECTURES), "out_dir": "outputs/architectures",
    "report": "report/architectures.md and report/architectures.png (each architecture's bit-change accuracy SD "
              "and disagreement over its init's), beside report/metrics.md",
    "doc": "docs/experiments/architectures.md",
}

#: experiment=stability: the bit change and a new data order applied from epoch k (source.from_epoch).
#: How its numbers were made (tests/test_experiments.py recomputes them from the composed sweep):
#: models 77 = the planner's rule N = 25 x (SE / 0.02)^2 (analysis/planning.py, target acc_sd_se=0.02)
#: from the report's 25-model pilots (bit change SE 0.027 -> 46, shuffle 0.035 -> 77; one N for every
#: group, the largest); gpu_hours = the 1,386 runs charged gpu_hours_per_model(500 - k) (their first k
#: epochs are the parent's: experiments.plan charges a run only the epochs it trains) = 886.8, + the
#: one parent (the determinism control, 500 epochs) 0.70, + barrier_gpu_hours(810 pairs: 45 per group)
#: 1.25 = 888.7; gpu_hours_unshared: every run training its own first k epochs (1,386 x 0.70) + the
#: barriers = 971.7.
STABILITY_KS = (0, 1, 2, 5, 10, 20, 50, 100, 200)
PRESETS["stability"] = {
    "table": "When does training become stable? The bit change and a new data order applied from epoch k "
             "(0 to 200), ResNet-14 on CIFAR-10 (Frankle et al. 2020's instability analysis, Altintas et al. 2025)",
    "claims": [2],
    "what": "bitflip and shuffle, each applied from epoch k = " + ", ".join(map(str, STABILITY_KS)) + "; every run "
            "perturbed at k > 0 starts from the end of epoch k of one parent run (the determinism control, trained "
            "once); loss barriers of 45 pairs per group",
    "models": 77, "epochs": 500, "groups": 18,
    "gpu_hours": 889, "gpu_hours_alone": 889, "reuses": None,
    "gpu_hours_unshared": 972, "parents": 1, "barrier_pairs": 810, "barrier_gpu_hours": 1.2,
    "data": "cifar10", "model": "resnet14", "out_dir": "outputs/stability",
    "report": "report/report.md section 'When does training become stable?', report/stability.csv, "
              "report/stability_summary.csv, report/stability.png, barrier columns in report/metrics.csv",
    "doc": "docs/experiments/stability.md",
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
    models = ", ".join(p["models_swept"]) if p.get("models_swept") else p["model"]
    return (f"This sweep reproduces {p['table']}: {p['groups']} group(s) x {p['models']} models, "
            f"{models} on {p['data']}, {_epochs_text(p['epochs'])}; {cost}. It tests {claims}. "
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
