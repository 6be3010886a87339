"""Instability, end to end on real digits runs: what each run keeps, the reducer's Instability
section, and ``python -m nondet_hpc.compare``.

One small sweep (control, bit change and all sources, two seeds each; 2 epochs of 4 steps, every
step of the first epoch recorded) is trained once for the module (about 10 s on one core); runs
that need another config train beside it. Every number the tests check is computed here again
from the files (numpy, safetensors) or known by construction (a planted perturbation).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_cfg, run_cli
from nondet_hpc.analysis.reduce import reduce_sweep
from nondet_hpc.config import ConfigError
from nondet_hpc.records.projection import CountSketch, Layout, fingerprint, relative_sd
from nondet_hpc.records.trajectory import read_trajectory
from nondet_hpc.records.weights import read_weights
from nondet_hpc.rundir import TRAJECTORY, WEIGHTS, kept_checkpoint, run_dir
from nondet_hpc.run import task, train
from nondet_hpc.run.models import init_weights, model_from_config
from nondet_hpc.run.sources import Streams, resolve_seeds

REC = ["record.step_base=1", "train.checkpoint_every=1"]  # steps 0, 1, 2, 3, 4 (= epoch 1), 8
RUNS = [("none", 1), ("none", 2), ("bitflip", 1), ("bitflip", 2), ("all", 1), ("all", 2)]
CONTROL, ALL = "Determinism Control", "All Nondeterminism Sources"  # their rows' names
PERTURB_AT = 2  # the planted perturbation moves a weight after 2 steps: first visible after step 3


def _cfg(out: Path, source: str, seed: int, *extra: str):
    return make_cfg(out, f"source={source}", f"seed={seed}", *REC, *extra)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("instab") / "sweep"
    for source, seed in RUNS:
        extra = ["record.keep_checkpoints=[1]"] if (source, seed) == ("none", 1) else []
        task.run(_cfg(out, source, seed, *extra))
    reduce_sweep(out, n_boot=200)
    return out


def _rd(out: Path, source: str, seed: int, *extra: str) -> Path:
    return run_dir(_cfg(out, source, seed, *extra))


def _info(rd: Path) -> dict:
    return json.loads((rd / "run.json").read_text())


def _perturbed_run(out: Path, monkeypatch, source: str = "none", seed: int = 2) -> Path:
    """Train a run with one weight moved by one ulp after PERTURB_AT steps (an uncontrolled source)."""
    real, done = train.Trainer.set_lr, []

    def set_lr(self, step):
        if step == PERTURB_AT and not done:
            with torch.no_grad():
                w = next(self.model.parameters()).view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(math.inf))
            done.append(step)
        return real(self, step)
    monkeypatch.setattr(train.Trainer, "set_lr", set_lr)
    try:
        task.run(_cfg(out, source, seed))
    finally:
        monkeypatch.setattr(train.Trainer, "set_lr", real)
    assert done == [PERTURB_AT]
    return _rd(out, source, seed)


# --- what every run keeps ---------------------------------------------------------------------
def test_control_replicates_are_identical_at_every_point_and_a_bit_change_starts_one_ulp_away(sweep):
    c1, c2 = (read_trajectory(_rd(sweep, "none", s) / TRAJECTORY) for s in (1, 2))
    assert c1.step.tolist() == [0, 1, 2, 3, 4, 8]
    assert np.array_equal(c1.fingerprint, c2.fingerprint) and np.array_equal(c1.sketch, c2.sketch)
    bit_rd = _rd(sweep, "bitflip", 1)
    bit, flip = read_trajectory(bit_rd / TRAJECTORY), _info(bit_rd)["bitflip"]
    assert not np.array_equal(bit.fingerprint[0], c1.fingerprint[0])
    ulp = abs(np.float64(flip["new"]) - np.float64(flip["old"]))
    # the float64 sketch keeps the one-ulp change exactly: one bucket moves by exactly that ulp
    assert np.linalg.norm(bit.sketch[0] - c1.sketch[0]) == ulp
    assert np.count_nonzero(bit.sketch[0] - c1.sketch[0]) == 1
    # the final weights are the model of the trajectory's last point, as run.json says
    for rd in (bit_rd, _rd(sweep, "none", 1)):
        w, info, traj = read_weights(rd / WEIGHTS), _info(rd)["record"], read_trajectory(rd / TRAJECTORY)
        assert w.meta["fingerprint"] == info["fingerprint"] == traj.fingerprint[-1].tobytes().hex()
        assert info["complete"] and info["points"] == 6 and info["weights"] == WEIGHTS


def test_a_kept_checkpoint_holds_the_model_the_trajectory_recorded_at_that_epoch(sweep):
    rd = _rd(sweep, "none", 1, "record.keep_checkpoints=[1]")
    state = torch.load(kept_checkpoint(rd, 1), map_location="cpu", weights_only=True)
    assert state["run_id"] == rd.name and state["progress"]["epoch"] == 1
    cfg = _cfg(sweep, "none", 1)
    names = [n for n, _ in model_from_config(cfg).named_parameters()]
    flat = np.concatenate([state["model"][n].numpy().reshape(-1) for n in names])
    layout = Layout.of((n, tuple(state["model"][n].shape)) for n in names)
    traj = read_trajectory(rd / TRAJECTORY)
    assert fingerprint(layout, flat) == traj.fingerprint[list(traj.step).index(4)].tobytes()


def test_the_sketch_estimate_is_within_its_stated_error_of_the_exact_final_distance(sweep):
    a, b = (read_weights(_rd(sweep, "all", s) / WEIGHTS) for s in (1, 2))
    exact = np.linalg.norm(a.flat().astype(np.float64) - b.flat().astype(np.float64))
    sa, sb = (read_trajectory(_rd(sweep, "all", s) / TRAJECTORY).sketch[-1] for s in (1, 2))
    assert abs(np.linalg.norm(sa - sb) / exact - 1) < 4 * relative_sd(4096)
    # the same projection in every run: the package's sketch of the weights is the recorded one
    assert np.array_equal(CountSketch(a.layout.n_values).apply(a.flat()), sa)


# --- the report ---------------------------------------------------------------------------------
def test_the_reducer_writes_the_instability_section_for_every_group_and_point(sweep):
    report = sweep / "report"
    table = pd.read_csv(report / "instability.csv")
    assert sorted(table["source"].unique()) == ["all", "bitflip", "none"]
    assert table.groupby("group").size().tolist() == [6, 6, 6]
    control = table[table["source"] == "none"]
    assert control["identical"].all() and (control["param_distance"] == 0).all()
    assert (control["probe_disagreement"] == 0).all()
    bit = table[table["source"] == "bitflip"].sort_values("step")
    assert (bit["param_distance"].diff().dropna() >= 0).all() or bit["param_distance"].iloc[-1] > 0
    metrics = pd.read_csv(report / "metrics.csv").set_index("group")
    assert metrics.loc[CONTROL, "param_distance"] == 0.0 and metrics.loc[ALL, "param_distance"] > 1
    last = table[table["param_distance_exact"].notna()].set_index("group")
    assert last.loc[ALL, "param_distance_exact"] == pytest.approx(metrics.loc[ALL, "param_distance"])
    claims = pd.read_csv(report / "claims.csv")
    assert "final parameter distance ratio" in set(claims["statistic"])
    md = (report / "report.md").read_text()
    assert "## Instability" in md and "Condition number of training" in md and "![divergence]" in md
    assert (report / "divergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "WARNING" not in md
    groups = pd.read_csv(report / "instability_groups.csv").set_index("source")
    assert groups.loc["bitflip", "condition_number_n"] == 2 and groups.loc["bitflip", "pairs"] == "twin"
    assert math.isnan(groups.loc["none", "first_split_step"]) and groups.loc["none", "param_distance_exact"] == 0


def test_the_condition_number_equals_an_independent_computation_from_the_weights(sweep):
    pairs = pd.read_csv(sweep / "report" / "instability_pairs.csv")
    assert len(pairs) == 2 and set(pairs["mode"]) == {"twin"}
    for _, p in pairs.iterrows():
        bit_rd, twin_rd = sweep / "runs" / p["run"], sweep / "runs" / p["other"]
        assert _info(twin_rd)["bitflip"] is None
        wb, wt = read_weights(bit_rd / WEIGHTS).flat(), read_weights(twin_rd / WEIGHTS).flat()
        final = np.linalg.norm(wb.astype(np.float64) - wt.astype(np.float64)) / np.linalg.norm(wt.astype(np.float64))
        cfg = make_cfg(sweep, *[f"{k}={v}" for k, v in (("source", "none"), ("seed", 1))], *REC)
        model = model_from_config(cfg)
        init_weights(model, Streams.from_seeds(resolve_seeds([], 1, True)).init)
        theta0 = np.concatenate([q.detach().numpy().reshape(-1) for q in model.parameters()]).astype(np.float64)
        flip = _info(bit_rd)["bitflip"]
        initial = abs(np.float64(flip["new"]) - np.float64(flip["old"])) / np.linalg.norm(theta0)
        assert p["condition_number"] == pytest.approx(final / initial, rel=1e-9)


def test_an_uncontrolled_control_is_said_at_the_top_of_the_report(sweep, tmp_path, monkeypatch):
    other = tmp_path / "other"
    bad = _perturbed_run(other, monkeypatch)  # control seed 2, perturbed
    good = _rd(sweep, "none", 1)
    shutil.copytree(good, other / "runs" / good.name)
    reduce_sweep(other, n_boot=50)
    md = (other / "report" / "report.md").read_text()
    head = md.split("## Claims")[0]
    assert "WARNING: the determinism control" in head and f"step {PERTURB_AT + 1}" in head
    assert "python -m nondet_hpc.compare" in head
    assert "WARNING: the determinism control" in (other / "report" / "summary.txt").read_text().splitlines()[0]
    assert bad.name != good.name


# --- compare ------------------------------------------------------------------------------------
def test_compare_two_runs_of_the_same_config_one_perturbed_at_a_known_step(sweep, tmp_path, monkeypatch):
    bad = _perturbed_run(tmp_path / "copy", monkeypatch)
    good = _rd(sweep, "none", 2)
    assert bad.name == good.name
    p = run_cli(["-m", "nondet_hpc.compare", str(good), str(bad)], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last == (f"Verdict: differ although config and environment match: a source of nondeterminism is not "
                    f"controlled, first visible at step {PERTURB_AT + 1} (epoch 0.75).")
    assert "Identity keys that differ (A | B):\n  none" in p.stdout
    assert f"First divergent point: step {PERTURB_AT + 1}" in p.stdout and "conv1.weight" in p.stdout


def test_compare_two_runs_that_differ_in_thread_count(sweep, tmp_path):
    # one epoch of 2 steps: a 2-thread run on a busy 2-core machine is slow (threads wait on each other)
    small = ["train.epochs=1", "data.train_subset=128"]
    one, two = (task.run(_cfg(tmp_path / f"t{n}", "none", 1, f"train.threads={n}", *small))["run_dir"] for n in (1, 2))
    p = run_cli(["-m", "nondet_hpc.compare", one, two], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "\n  train.threads: 1 | 2" in p.stdout and "\n  threads: 1 | 2" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("Verdict: differ as their configs imply (identity keys and "
                                                        "environment differ")
    same = run_cli(["-m", "nondet_hpc.compare", str(_rd(sweep, "none", 1)), str(_rd(sweep, "none", 2))])
    assert same.stdout.strip().splitlines()[-1].startswith("Verdict: identical")


def test_compare_refuses_what_is_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_cli(["-m", "nondet_hpc.compare", str(tmp_path / "empty"), str(tmp_path / "missing")], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "is not a run folder: file missing (run.json)" in p.stderr


# --- nothing is unpickled -------------------------------------------------------------------------
class _Payload:
    """Unpickling it would create the file ``mark``."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (self.mark,))


def test_planted_pickles_in_the_record_files_do_not_run(sweep, tmp_path):
    copy, mark = tmp_path / "planted", tmp_path / "payload-ran"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("report"))
    rd, other = (copy / "runs" / _rd(sweep, "all", s).name for s in (1, 2))
    (rd / WEIGHTS).write_bytes(pickle.dumps(_Payload(mark)))
    np.savez(rd / "x.npz", obj=np.array([_Payload(mark)], dtype=object))  # an npz of pickled objects
    (rd / "x.npz").replace(rd / TRAJECTORY)
    (other / TRAJECTORY).write_bytes(pickle.dumps(_Payload(mark)))  # a bare pickle
    df = reduce_sweep(copy, n_boot=50)
    p = run_cli(["-m", "nondet_hpc.compare", str(rd), str(other)], check=False)
    assert not mark.exists()
    refused = [w for w in df.attrs["warnings"] if "left out of the Instability section" in w]
    assert any(rd.name in w and TRAJECTORY in w for w in refused)
    assert any(other.name in w and TRAJECTORY in w for w in refused)
    assert math.isnan(df.set_index("group").loc[ALL, "param_distance"])  # its weights file was refused
    assert p.returncode == 0 and "refused" in p.stdout


def test_bad_record_settings_are_refused_before_anything_is_written(tmp_path):
    for override, match in (("record.step_base=-1", "record.step_base=-1 is invalid"),
                            ("record.extra_epochs=[7]", r"record.extra_epochs=\[7\]: \[7\] outside 0..2"),
                            ("record.keep_checkpoints=[0]", r"record.keep_checkpoints=\[0\]: \[0\] outside 1..2"),
                            ("record.sketch_dim=0", "record.sketch_dim=0 is invalid"),
                            ("record.probe=-3", "record.probe=-3 is invalid")):
        with pytest.raises(ConfigError, match=match):
            task.run(make_cfg(tmp_path / "bad", override))
        assert not list((tmp_path / "bad").glob("runs/*"))


def test_a_model_above_the_weights_cap_keeps_its_trajectory_and_says_why(tmp_path):
    out = task.run(make_cfg(tmp_path / "cap", "record.weights_max_params=1000"))
    rd = Path(out["run_dir"])
    info = _info(rd)["record"]
    assert not (rd / WEIGHTS).exists() and (rd / TRAJECTORY).exists()
    assert info["weights"] is None and "record.weights_max_params=1,000" in info["weights_skipped"]
    assert info["fingerprint"] == read_trajectory(rd / TRAJECTORY).fingerprint[-1].tobytes().hex()


# --- cost ---------------------------------------------------------------------------------------
def test_the_storage_estimate_of_the_cost_model_is_the_size_of_real_run_files(sweep):
    from nondet_hpc import presets
    from nondet_hpc.run.models import build_model
    from nondet_hpc.run.recording import record_settings

    for name, (params, buffers, n_params, n_buffers) in presets.PARAMETERS.items():
        m = build_model(name, 10, 3)
        assert sum(p.numel() for p in m.parameters()) == presets.n_parameters(name, 10)
        assert (params + m.fc.weight.numel() + m.fc.bias.numel(), buffers) == \
            (presets.n_parameters(name, 10), sum(b.numel() for b in m.buffers()))
        assert (n_params, n_buffers) == (len(list(m.parameters())), len(list(m.buffers())))
    cfg = _cfg(sweep, "all", 1)
    rd = run_dir(cfg)
    est = presets.run_files_bytes("resnet14", 2, n_train=256, n_test=120, batch_size=64,
                                  record=record_settings(cfg))
    real = {"weights": (rd / WEIGHTS).stat().st_size, "trajectory": (rd / TRAJECTORY).stat().st_size,
            "checkpoint": (rd / "checkpoint.pt").stat().st_size,
            "logits": sum(p.stat().st_size for p in (rd / "logits").iterdir()) + (rd / "labels.npy").stat().st_size}
    for key, size in real.items():
        assert est[key] == pytest.approx(size, rel=0.03), key
