"""The ready studies (conf/experiment/), their cost table (nondet_hpc.experiments) and the evaluate CLI.

- every preset has an entry, a quick variant and a doc page, and its header numbers equal the entry
  and the composed sweep (models = seed range length, groups = the other swept values, GPU-hours
  from the cost model over every job);
- every preset composes, and so does one job of it (as the sweeper composes each job);
- presets sharing a folder agree on everything they do not sweep, and the N-models preset reruns
  exactly the sources runs;
- each quick variant runs end to end through the real CLI (training + the reducer's report);
- ``python -m nondet_hpc.evaluate`` adds a view to a DONE run that equals what training writes,
  refuses unfinished runs and snapshot views, and never overwrites without --force.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import REPO, make_cfg, run_cli
from nondet_hpc import experiments, presets
from nondet_hpc.run import evaluate, task
from nondet_hpc.config import conf_dir
from nondet_hpc.registry.options import register_configs
from nondet_hpc.rundir import run_dir, run_id

EXP_DIR = Path(conf_dir()) / "experiment"
FULL = sorted(p.stem for p in EXP_DIR.glob("*.yaml") if not p.stem.endswith("_quick"))
QUICK = sorted(p.stem for p in EXP_DIR.glob("*_quick.yaml"))
ALL = FULL + QUICK


def compose_preset(name: str, *overrides: str, hydra: bool = True):
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=hydra)


def sweep_values(cfg) -> dict[str, list]:
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False)
    return {k: experiments._sweep_values(k, str(v)) for k, v in params.items()}


def header(name: str) -> dict[str, str]:
    out = {}
    for line in (EXP_DIR / f"{name}.yaml").read_text().splitlines():
        m = re.match(r"^#\s*([A-Za-z -]+):\s*(.*)$", line)
        if m:
            out.setdefault(m.group(1).strip(), m.group(2).strip())
        elif line and not line.startswith("#"):
            break
    return out


def leading_ints(text: str) -> list[int]:
    """'100, 200, 300 (...)' -> [100, 200, 300]; '560 (V100 ...)' -> [560]."""
    head = re.match(r"^[\d,\s]+", text)
    return [int(x) for x in re.findall(r"\d+", head.group(0))] if head else []


@functools.lru_cache(maxsize=None)
def planned(name: str) -> tuple:
    return tuple(experiments.plan(name))


# ---------------------------------------------------------------------------------------------
# the preset table


def test_every_preset_has_an_entry_a_quick_variant_and_a_doc():
    assert FULL and set(FULL) == set(presets.PRESETS), "conf/experiment/*.yaml and PRESETS differ"
    index = (REPO / "docs" / "experiments" / "README.md").read_text()
    for name in FULL:
        entry = presets.PRESETS[name]
        assert f"{name}_quick" in QUICK, f"{name} has no quick variant"
        assert entry["doc"] == f"docs/experiments/{name}.md" and (REPO / entry["doc"]).is_file()
        assert f"experiment={name}" in index and f"({name}.md)" in index
        for key in ("table", "models", "epochs", "groups", "gpu_hours", "doc"):
            assert key in entry
    assert set(QUICK) == {f"{n}_quick" for n in FULL}


@pytest.mark.parametrize("name", FULL)
def test_header_numbers_match_the_entry_and_the_sweep(name):
    entry, head = presets.PRESETS[name], header(name)
    cfg = compose_preset(name)
    values = sweep_values(cfg)
    models = len(values["seed"])
    groups = math.prod(len(v) for k, v in values.items() if k != "seed")
    epochs = values.get("train.epochs", [cfg.train.epochs])
    assert values["seed"] == list(range(1, models + 1))
    assert leading_ints(head["Models"])[0] == entry["models"] == models
    assert leading_ints(head["Groups"])[0] == entry["groups"] == groups
    assert leading_ints(head["Epochs"]) == (entry["epochs"] if isinstance(entry["epochs"], list)
                                            else [entry["epochs"]]) == epochs
    assert (cfg.data.name, cfg.model.name) == (entry["data"], entry["model"])
    assert f"experiment={name} " in head["Command"] and head["Doc"] == entry["doc"]
    # GPU-hours: the cost model summed over every job; runs shared with the preset it reuses are free
    jobs = planned(name)
    assert len(jobs) == models * groups
    extra = _parents_and_barriers(name, cfg, entry, jobs, models, groups)
    alone = sum(j["gpu_hours"] for j in jobs) + extra
    shared = {j["run_id"] for j in planned(entry["reuses"])} if entry["reuses"] else set()
    new = sum(j["gpu_hours"] for j in jobs if j["run_id"] not in shared) + extra
    assert round(alone) == entry["gpu_hours_alone"]
    assert round(new) == entry["gpu_hours"] == leading_ints(head["GPU-hours"])[0]
    assert all(j["experiment"] == name for j in jobs)


def _parents_and_barriers(name, cfg, entry, jobs, models, groups) -> float:
    """GPU-hours beside the sweep's own jobs: the parents of runs perturbed from epoch k > 0 (one
    full run each, sweep/parents.py) and the loss barriers the preset asks for (barriers.pairs);
    plan() charges a perturbed run only its epochs from k on."""
    from nondet_hpc.sweep.parents import plan_parents

    per = presets.gpu_hours_per_model(cfg.model.name, int(cfg.train.epochs), views=list(cfg.eval.views))
    values = sweep_values(cfg)
    children = [compose_preset(name, f"source={s}", f"source.from_epoch={k}", hydra=False)
                for s in values["source"] for k in values.get("source.from_epoch", [0]) if k]
    parents = len(plan_parents(children))
    assert parents == entry.get("parents", 0)
    pairs = groups * min(int(cfg.barriers.pairs), models * (models - 1) // 2)
    assert pairs == entry.get("barrier_pairs", 0)
    barriers = presets.barrier_gpu_hours(pairs, cfg.model.name, points=int(cfg.barriers.points),
                                         bn_images=int(cfg.barriers.bn_images)) if pairs else 0.0
    assert round(barriers, 1) == entry.get("barrier_gpu_hours", 0)
    if "gpu_hours_unshared" in entry:  # every run training its own first k epochs, no parent
        assert round(len(jobs) * per + barriers) == entry["gpu_hours_unshared"]
    return parents * per + barriers


def test_cost_model_constants_are_the_models_macs():
    """Each model's declared MACs: its convolutions (grouped ones counted per group) and hidden linear
    layers on one 3x32x32 image, and the classifier's inputs (its last linear layer), counted with
    forward hooks on the meta device (shapes only: ResNet-1202 costs nothing to count)."""
    from nondet_hpc.registry.models import MODELS
    from nondet_hpc.run.zoo import build
    from nondet_hpc.run.zoo.cifar_resnet import CifarResNet

    for name, (body, fc_in) in presets.MACS.items():
        e = MODELS[name]
        if name == "resnet1202":  # 19M parameters: built on the meta device, never initialised
            with torch.device("meta"):
                model = CifarResNet(list(e.options["widths"]), list(e.options["blocks"]), 10, 3)
        else:
            model = build(name, (3, 32, 32), 10, torch.Generator().manual_seed(0)).to("meta")
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        macs = []

        def hook(mod, inp, out):
            if isinstance(mod, torch.nn.Conv2d):
                macs.append(out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])
            elif isinstance(mod, torch.nn.Linear) and mod is not head:
                macs.append(mod.in_features * mod.out_features)

        for mod in model.eval().modules():
            mod.register_forward_hook(hook)
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32, device="meta"))
        assert (sum(macs), head.in_features) == (body, fc_in), name
    assert set(presets.MACS) >= set(presets.ARCHITECTURES) | {"resnet18", "resnet18b", "resnet34"}
    # the anchor: one ResNet-14 / CIFAR-10 / 500-epoch model is the report's 0.7 V100 hours
    assert presets.gpu_hours_per_model("resnet14", 500) == pytest.approx(0.7, rel=1e-3)
    assert presets.transforms_per_image(["flip-crop81", "crop25", "flip"]) == 162


def test_describe_names_the_table_for_presets_quick_variants_and_strangers():
    for name, entry in presets.PRESETS.items():
        text = presets.describe(name)
        assert text.startswith("This sweep reproduces ") and entry["table"] in text and entry["doc"] in text
        assert "quick check" in presets.describe(f"{name}_quick")
    assert "not one of the presets" in presets.describe("mine")
    assert "not made from a preset" in presets.describe(None)
    both = presets.describe_sweep(["sources", "bitflip", "sources"])
    assert both.count("This sweep reproduces") == 3 and "report/ablation.md" in both  # + N-models


# ---------------------------------------------------------------------------------------------
# composition


@pytest.mark.parametrize("name", ALL)
def test_preset_and_its_jobs_compose(name, tmp_path):
    cfg = compose_preset(name)
    assert cfg.experiment == name
    values = sweep_values(cfg)
    assert "seed" in values and "source" in values
    for combo in (tuple(v[0] for v in values.values()), tuple(v[-1] for v in values.values())):
        job_overrides = [f"{k}={v}" for k, v in zip(values, combo)]
        job = compose_preset(name, *job_overrides, f"out_dir={tmp_path}", hydra=False)
        assert job.source.name == combo[list(values).index("source")] and job.seed == combo[list(values).index("seed")]
        for k, v in zip(values, combo):
            if k.startswith("train."):
                assert OmegaConf.select(job, k) == v
        task.validate(job)  # what a job checks before any work
        task.resolve_threads(job)  # train.threads=0 as the run resolves it here (the local launcher)
        # the planner's fast composition gives the same run as Hydra's own
        rid = run_id(job)
        assert rid in {j["run_id"] for j in planned(name)}


@pytest.mark.parametrize("name", ALL)
def test_preset_writes_to_its_own_out_dir(name):
    cfg = compose_preset(name)
    expected = presets.PRESETS[name.removesuffix("_quick")]["out_dir"]
    if name.endswith("_quick"):
        expected = expected + "_quick"
    assert cfg.out_dir == expected and cfg.hydra.sweep.dir == expected


def test_presets_sharing_a_folder_differ_only_in_what_they_sweep():
    by_dir: dict[str, list[str]] = {}
    for name in ALL:
        p = presets.PRESETS[name.removesuffix("_quick")]
        by_dir.setdefault(p["out_dir"] + ("_quick" if name.endswith("_quick") else ""), []).append(name)
    swept = ("seed", "source", "train.epochs", "experiment", "out_dir")
    assert sorted(by_dir["outputs/sources"]) == ["bitflip", "epochs", "nmodels", "sources"]
    for names in by_dir.values():
        flats = []
        for name in names:
            cfg = compose_preset(name, "source=none", hydra=False)
            flat = {k: v for k, v in _flat(OmegaConf.to_container(cfg, resolve=True)).items()
                    if not any(k == s or k.startswith(s + ".") for s in swept)}
            flats.append(flat)
        assert all(f == flats[0] for f in flats), f"{names} differ beyond the swept keys"


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_nmodels_reruns_exactly_the_sources_runs_and_epochs_reuses_the_500_epoch_ones():
    sources = {j["run_id"] for j in planned("sources")}
    assert {j["run_id"] for j in planned("nmodels")} == sources
    epochs = {j["run_id"] for j in planned("epochs")}
    assert len(epochs & sources) == 5 * 100 and all("-e500-" in r for r in epochs & sources)
    assert not {j["run_id"] for j in planned("bitflip")} & sources
    tta = planned("tta")
    assert len({j["run_id"] for j in tta}) == 200  # snapshots=1 and =5 are different runs


# ---------------------------------------------------------------------------------------------
# quick variants, end to end through the real command line


def _metrics(sweep: Path):
    from nondet_hpc.analysis import reduce  # noqa: F401
    import pandas as pd

    assert (sweep / "report" / "metrics.csv").is_file(), "the reducer wrote no report/metrics.csv"
    return pd.read_csv(sweep / "report" / "metrics.csv")


def _done(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in (sweep / "runs").glob("*/DONE"))


def test_quick_sources_bitflip_nmodels_epochs_end_to_end(tmp_path):
    """The four presets of outputs/sources, in order, into one folder, as a user would run them."""
    out = tmp_path / "sources_quick"
    run_cli(["-m", "nondet_hpc", "-m", "experiment=sources_quick", f"out_dir={out}"], cwd=tmp_path)
    assert len(_done(out)) == 9
    df = _metrics(out)
    assert set(df["group"]) == {"Determinism Control", "Parameter Initialization", "All Nondeterminism Sources"}
    control = df[df["group"] == "Determinism Control"].iloc[0]
    assert control["acc_sd"] == 0 and control["disagreement"] == 0 and control["correlation"] == 1
    assert np.isfinite(df["cka"]).all()  # eval.features=true feeds the CKA column

    run_cli(["-m", "nondet_hpc", "-m", "experiment=bitflip_quick", f"out_dir={out}"], cwd=tmp_path)
    assert len(_done(out)) == 12 and "Random Bit Change" in set(_metrics(out)["group"])

    proc = run_cli(["-m", "nondet_hpc", "-m", "experiment=nmodels_quick", f"out_dir={out}"], cwd=tmp_path)
    assert proc.stdout.count("skipped (DONE)") == 3 and len(_done(out)) == 20
    import pandas as pd
    ablation = pd.read_csv(out / "report" / "ablation.csv")
    assert {10, 11} <= set(ablation.loc[ablation["group"].str.startswith("All"), "n"])

    proc = run_cli(["-m", "nondet_hpc", "-m", "experiment=epochs_quick", f"out_dir={out}"], cwd=tmp_path)
    assert proc.stdout.count("skipped (DONE)") == 6 and len(_done(out)) == 26
    groups = set(_metrics(out)["group"])
    assert "All Nondeterminism Sources (train.epochs=2)" in groups

    recorded = {OmegaConf.load(d / "config.yaml").experiment for d in _done(out)}
    assert recorded == {"sources_quick", "bitflip_quick", "nmodels_quick", "epochs_quick"}


def test_quick_tta_end_to_end(tmp_path):
    out = tmp_path / "tta_quick"
    run_cli(["-m", "nondet_hpc", "-m", "experiment=tta_quick", f"out_dir={out}"], cwd=tmp_path)
    runs = _done(out)
    assert len(runs) == 6
    ens = [d for d in runs if OmegaConf.load(d / "config.yaml").train.snapshots == 2]
    assert len(ens) == 3
    names = {p.stem for p in (ens[0] / "logits").iterdir()}
    assert {"snapshot-1", "snapshot-2", "snapshot-1_flip", "snapshot-2_flip-crop81", "crop81"} <= names
    df = _metrics(out)
    views = set(df["view"].fillna(""))
    assert {"Flip", "Crop25", "Crop81", "Flip-Crop25", "Flip-Crop81", "Acc.Ens", "Acc.Ens/Flip",
            "Acc.Ens/Flip-Crop81"} <= views
    assert np.isfinite(df.loc[df["view"] == "Acc.Ens/Flip", "reduction_pct"]).all()


def test_quick_architectures_end_to_end(tmp_path):
    """experiment=architectures_quick on two rungs of its ladder and fewer seeds and epochs (the
    whole quick preset, 108 runs, is measured in docs/experiments/architectures.md): the report's
    architectures table and plot, the control exactly 0, each model's condition number from the instability
    section (the bit-change runs against the control, from their recorded trajectories)."""
    import pandas as pd

    out = tmp_path / "architectures_quick"
    run_cli(["-m", "nondet_hpc", "-m", "experiment=architectures_quick", "model=linearnet,resnet6", "seed=range(1,3)",
             "train.epochs=2", f"out_dir={out}"], cwd=tmp_path)
    assert len(_done(out)) == 12
    table = pd.read_csv(out / "report" / "architectures.csv")
    assert list(table["model"]) == ["linearnet", "resnet6"] and (table[["n_init", "n_bitflip"]] == 2).all().all()
    assert (table["control_acc_sd"] == 0).all() and (table["control_disagreement"] == 0).all()
    assert np.isfinite(table["acc_sd_ratio"]).all()
    assert np.isfinite(table["condition_number"]).all() and (table["condition_number"] > 0).all()
    assert list(table["n_parameters"]) == [650, 9_690]  # on digits: 64 inputs, 1-channel stem
    report = (out / "report" / "report.md").read_text()
    assert "## Where instability begins" in report and (out / "report" / "architectures.png").stat().st_size > 0
    assert "was not measured in this sweep" not in (out / "report" / "architectures.md").read_text()


def test_quick_cifar100_end_to_end(tmp_path):
    out = tmp_path / "cifar100_quick"
    run_cli(["-m", "nondet_hpc", "-m", "experiment=cifar100_quick", f"out_dir={out}"], cwd=tmp_path)
    runs = _done(out)
    assert len(runs) == 4
    assert {OmegaConf.load(d / "config.yaml").model.name for d in runs} == {"resnet34"}
    assert json.loads((runs[0] / "run.json").read_text())["n_parameters"] > 21_000_000
    assert len(_metrics(out)) == 2


# ---------------------------------------------------------------------------------------------
# evaluate: add views to finished runs


@pytest.fixture
def two_runs(tmp_path):
    """The same run trained twice: eval.views=[plain] in a/, [plain, flip, crop25] in b/."""
    a = make_cfg(tmp_path / "a", "source=all", "seed=2", "eval.views=[plain]")
    b = make_cfg(tmp_path / "b", "source=all", "seed=2", "eval.views=[plain,flip,crop25]")
    task.run(a)
    task.run(b)
    assert run_dir(a).name == run_dir(b).name  # views are not part of a run's identity
    return run_dir(a), run_dir(b)


def test_evaluate_adds_views_equal_to_what_training_writes(two_runs, capsys):
    ra, rb = two_runs
    assert evaluate.main([str(ra), "--views", "flip", "crop25"]) == 0
    for view in ("plain", "flip", "crop25"):
        got = np.load(ra / "logits" / f"{view}.npy", allow_pickle=False)
        assert np.array_equal(got, np.load(rb / "logits" / f"{view}.npy", allow_pickle=False)), view
        assert got.dtype == np.float32
    rec = json.loads((ra / "run.json").read_text())
    assert rec["views"] == ["plain", "flip", "crop25"]
    assert rec["evaluations"][-1]["plain_max_abs_diff"] == 0.0 and rec["state"] == "done"
    assert "warning" not in capsys.readouterr().out
    assert not list(ra.rglob("*.tmp"))


def test_evaluate_never_overwrites_without_force(two_runs, capsys):
    ra, _ = two_runs
    plain = ra / "logits" / "plain.npy"
    stamp, before = plain.stat().st_mtime_ns, plain.read_bytes()
    assert evaluate.main([str(ra), "--views", "plain"]) == 0
    assert "skipped plain: logits/plain.npy exists (--force recomputes it)" in capsys.readouterr().out
    assert plain.stat().st_mtime_ns == stamp
    assert evaluate.main([str(ra), "--views", "plain", "--features", "--force"]) == 0
    assert plain.stat().st_mtime_ns != stamp and plain.read_bytes() == before  # rewritten, same values
    assert np.load(ra / "features.npy").shape == (120, 64)
    assert json.loads((ra / "run.json").read_text())["features"] is True


def test_evaluate_refuses_unfinished_runs_and_skips_them_in_a_sweep(two_runs, tmp_path, capsys):
    ra, _ = two_runs
    unfinished = ra.parent / "all-s0099-unfinished"
    shutil.copytree(ra, unfinished)
    (unfinished / "DONE").unlink()
    rec = json.loads((unfinished / "run.json").read_text())
    rec["state"] = "preempted"
    (unfinished / "run.json").write_text(json.dumps(rec))
    assert evaluate.main([str(unfinished), "--views", "flip"]) == 2
    err = capsys.readouterr().err
    assert "is not a finished run" in err and "state: preempted" in err
    assert not (unfinished / "logits" / "flip.npy").exists()
    # a sweep folder: the DONE run is evaluated, the other one listed and left alone
    assert evaluate.main([str(ra.parent.parent), "--views", "flip"]) == 0
    out = capsys.readouterr().out
    assert "all-s0099-unfinished: skipped: not DONE (state: preempted)" in out
    assert (ra / "logits" / "flip.npy").exists() and not (unfinished / "logits" / "flip.npy").exists()
    with pytest.raises(evaluate.EvaluateError, match="not a finished run"):
        evaluate.evaluate_run(unfinished, ["flip"])


def test_evaluate_refuses_snapshot_views_and_says_why(two_runs, capsys):
    ra, _ = two_runs
    assert evaluate.main([str(ra), "--views", "snapshot-1_flip"]) == 2
    assert "cannot be recomputed" in capsys.readouterr().err
    assert evaluate.main([str(ra), "--views", "crop99"]) == 2
    assert "unknown view" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    helptext = capsys.readouterr().out
    assert "Snapshot views cannot be recomputed" in helptext and "--force" in helptext


def test_evaluate_runs_as_a_module(tmp_path):
    proc = run_cli(["-m", "nondet_hpc.evaluate", str(tmp_path / "nothing"), "--views", "flip"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_experiments_cli_lists_every_preset(capsys):
    assert experiments.main([]) == 0
    listing = capsys.readouterr().out
    for name, entry in presets.PRESETS.items():
        assert re.search(rf"^{name}\s+{entry['groups']} x {entry['models']}\s", listing, re.M)


def test_bill_scales_each_table_with_n_and_counts_shared_runs_once():
    from nondet_hpc.experiments import bill, main
    from nondet_hpc.presets import PRESETS

    def hours(text: str) -> dict[str, float]:
        return {ln.split()[0]: float(ln.split()[-1].replace(",", "")) for ln in text.splitlines()[1:]
                if ln.split() and ln.split()[0] in {*PRESETS, "total"}}

    at_100, at_50 = hours(bill(100)), hours(bill(50))
    assert at_100["sources"] == PRESETS["sources"]["gpu_hours"] and at_50["sources"] == at_100["sources"] / 2
    assert at_100["nmodels"] == 0  # it reuses the sources runs
    assert at_100["cifar100"] == round(PRESETS["cifar100"]["gpu_hours"] * 100 / 25)
    assert abs(at_50["total"] - sum(v for k, v in at_50.items() if k != "total")) <= len(at_50)  # rounding
    with pytest.raises(SystemExit, match="at least 2"):
        main(["--models", "1"])
