"""A study grown in waves with the local launcher (hydra_plugins/nondet_hpc_launcher/local.py):
real digits sweeps that stop at the maximum after several waves, or at wave 1 when the target is
met; seeds 1..N each trained once, the study recorded in sweep.json as sweep/waves.py records
it, and a second identical command trains nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

from helpers import run_cli
from nondet_hpc.rundir import list_runs, logits_path

TINY = ["train.epochs=1", "train.warmup_epochs=1", "data.train_subset=64", "data.test_subset=60",
        "train.batch_size=32", "train.threads=1", "train.snapshots=1"]


def _sweep(out: Path, sources: str, seeds: int, target: str, wave: int, max_models: int):
    return run_cli(["-m", "nondet_hpc", "-m", f"source={sources}", f"seed=range(1,{seeds + 1})", *TINY,
                    f"study.target.{target}", f"study.wave={wave}", f"study.max_models={max_models}",
                    f"out_dir={out}"])


def _seeds_by_source(out: Path) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for rd in list_runs(out):
        info = json.loads((rd / "run.json").read_text())
        by.setdefault(str(info["identity"]["source.name"]), []).append(int(info["seed"]))
    return {k: sorted(v) for k, v in by.items()}


def _state(out: Path) -> dict[str, int]:
    """Every run's logits file and its modification time: what a rerun that trains would change."""
    return {str(p): p.stat().st_mtime_ns for rd in list_runs(out) for p in [logits_path(rd, "plain")]}


def test_unreachable_target_stops_at_max_after_several_waves(tmp_path):
    out = tmp_path / "sweep"
    wave, max_models = 2, 5
    # a cross-entropy SD's SE is never 0 over distinct models: this target is never met
    p = _sweep(out, "init", 7, "ce_sd_se=1e-12", wave, max_models)
    assert _seeds_by_source(out) == {"init": list(range(1, max_models + 1))}  # each seed once, 6 and 7 never
    study = json.loads((out / "sweep.json").read_text())["study"]
    assert study["rule"] == {"targets": {"ce_sd_se": 1e-12}, "wave": wave, "max_models": max_models}
    assert study["status"] == "done"
    assert len(study["waves"]) == math.ceil(max_models / wave)
    assert all(w["decided"] for w in study["waves"])
    (g,) = study["groups"].values()
    assert g["submitted"] == list(range(1, max_models + 1))
    assert g["state"].startswith("maximum reached") and g["precision"]["ce_sd_se"] > 1e-12
    assert sorted(g["run_ids"].values()) == [rd.name for rd in list_runs(out)]  # the task's run ids
    assert "maximum reached" in p.stdout + p.stderr  # the study's lines after the sweep
    assert (out / "report" / "metrics.csv").is_file()
    report = (out / "report" / "report.md").read_text()
    section = report[report.index("## Study grown in waves"):]
    # the last report is brought up to date by the decision taken after it was written
    assert f"**State: done**: {study['stop_reason']}" in section
    assert "maximum reached (5 models)" in section and "growing" not in section

    before = _state(out)
    _sweep(out, "init", 7, "ce_sd_se=1e-12", wave, max_models)
    assert _state(out) == before and _seeds_by_source(out) == {"init": list(range(1, max_models + 1))}
    again = json.loads((out / "sweep.json").read_text())["study"]
    assert len(again["waves"]) == len(study["waves"]) and again["status"] == "done"


def test_target_met_at_wave_one_trains_only_the_first_wave(tmp_path):
    out = tmp_path / "sweep"
    wave = 2
    _sweep(out, "init,shuffle", 6, "acc_sd_se=1e9", wave, 6)
    assert _seeds_by_source(out) == {"init": [1, 2], "shuffle": [1, 2]}
    study = json.loads((out / "sweep.json").read_text())["study"]
    assert len(study["waves"]) == 1 and study["status"] == "done"
    assert {g["state"] for g in study["groups"].values()} == {"target met"}
    assert all(g["submitted"] == [1, 2] for g in study["groups"].values())
    status = run_cli(["-m", "nondet_hpc.status", str(out)])
    assert "target met" in status.stdout
