"""Loss barriers between two runs (issue 21, part 2): sweep/barriers.py, run/barrier.py, run/barriers.py.

Real digits runs (tiny: the FAST config), their final weights in weights.safetensors. Until the
trainer writes that file itself (issue 20), ``with_weights`` writes it here from the run's final
checkpoint, in the format records/weights.py defines.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_cfg, run_cli
from nondet_hpc.config import ConfigError
from nondet_hpc.records.weights import read_weights
from nondet_hpc.run import task
from nondet_hpc.run.barrier import WEIGHTS_FILE, PairEvaluator, bn_subset, interpolated, recompute_bn
from nondet_hpc.run.barriers import Settings, choose_pairs, sweep_barriers
from nondet_hpc.run.data import Normalize, load_dataset
from nondet_hpc.run.models import model_from_config
from nondet_hpc.run.recorder import write_model_weights
from nondet_hpc.run.train import load_checkpoint_file
from nondet_hpc.rundir import CHECKPOINT
from nondet_hpc.safeio import RefusedFile
from nondet_hpc.sweep import barriers as B

CPU = torch.device("cpu")
# the independently initialised pair trains longer than FAST, so the two models are real models
LONGER = ["train.epochs=4", "train.batch_size=32"]


def with_weights(cfg) -> Path:
    """Train ``cfg`` (task.run) and make sure its folder holds weights.safetensors."""
    res = task.run(cfg)
    rd = Path(res["run_dir"])
    if not (rd / WEIGHTS_FILE).exists():
        state = load_checkpoint_file(rd / CHECKPOINT, res["run_id"])
        model = model_from_config(cfg)
        model.load_state_dict(state["model"])
        write_model_weights(rd / WEIGHTS_FILE, model, run_id=res["run_id"], step=state["progress"]["step"])
    return rd


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """A sweep with two control runs (bit-identical) and two independently initialised runs."""
    out = tmp_path_factory.mktemp("barriers") / "sweep"
    runs = {"c1": with_weights(make_cfg(out, "source=none", "seed=1")),
            "c2": with_weights(make_cfg(out, "source=none", "seed=2")),
            "i1": with_weights(make_cfg(out, "source=init", "seed=1", *LONGER)),
            "i2": with_weights(make_cfg(out, "source=init", "seed=2", *LONGER))}
    return {"dir": out, "runs": runs, "cfg": make_cfg(out, "source=init", "seed=1", *LONGER)}


def _records(sweep_dir: Path) -> dict[frozenset, B.PairRecord]:
    recs, refused = B.read_sweep(sweep_dir)
    assert not refused
    return {frozenset(r.runs): r for r in recs}


def _line_excess(rec: dict, curve: str) -> np.ndarray:
    """Direct: f(alpha) - ((1 - alpha) f(0) + alpha f(1)) at every point."""
    a, f = np.array(rec["alpha"]), np.array(rec[curve])
    return f - ((1 - a) * f[0] + a * f[-1])


# --- the definition ------------------------------------------------------------------------
def test_barrier_height_is_the_largest_excess_over_the_line():
    a = B.alphas(5)
    assert a.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    height, where = B.barrier_height(a, [1.0, 2.0, 3.0, 1.5, 2.0])
    assert height == pytest.approx(3.0 - 1.5) and where == 0.5  # the line is 1.5 at alpha 0.5
    assert B.barrier_height(a, [1.0, 0.5, 0.2, 0.1, 0.0])[0] == 0.0  # below the line: the end points' 0
    assert B.barrier_height(a, [0.3] * 5) == (0.0, 0.0)  # equal values: exactly 0, no rounding
    with pytest.raises(B.BarrierError):
        B.barrier_height([0.0, 0.4], [1.0, 2.0])  # must end at exactly 1
    with pytest.raises(B.BarrierError):
        B.alphas(1)


def test_interpolation_is_exact_at_the_end_points_and_for_equal_weights(sweep):
    wa = read_weights(sweep["runs"]["i1"] / WEIGHTS_FILE)
    wb = read_weights(sweep["runs"]["i2"] / WEIGHTS_FILE)
    for alpha, w in ((0.0, wa), (1.0, wb)):
        s = interpolated(wa, wb, alpha)
        assert all(np.array_equal(s[n].numpy(), w.params[n]) for n in w.params)
    mid = interpolated(wa, wa, 0.3)
    assert all(np.array_equal(mid[n].numpy(), wa.params[n]) for n in wa.params)


# --- the barrier of real models ------------------------------------------------------------
def test_model_with_itself_is_exactly_zero(sweep):
    cfg = sweep["cfg"]
    data = load_dataset(cfg.data)
    ev = PairEvaluator(cfg, data, CPU, bn_images=128)
    w = read_weights(sweep["runs"]["i1"] / WEIGHTS_FILE)
    loss, error = ev.curve(w, w, B.alphas(11))
    assert len(set(loss)) == 1 and len(set(error)) == 1  # the same model at every point
    assert B.barrier_height(B.alphas(11), loss) == (0.0, 0.0)
    assert B.barrier_height(B.alphas(11), error) == (0.0, 0.0)


def test_sweep_barriers_control_zero_init_positive_and_reruns_skip(sweep, capsys):
    out = sweep["dir"]
    res = sweep_barriers(out, Settings(device="cpu", bn_images=128, self_check=True))
    by_label = {g["label"]: g for g in res["groups"]}
    assert {g["computed"] for g in res["groups"]} == {1} and not any(g["failed"] for g in res["groups"])
    assert all(g["self_check"] == "0 exactly" for g in res["groups"])
    recs = _records(out)
    runs = sweep["runs"]
    control = recs[frozenset((runs["c1"].name, runs["c2"].name))].data
    assert control["fingerprints"][0] == control["fingerprints"][1]  # bit-identical control runs
    assert control["barrier_loss"] == 0.0 and control["barrier_error"] == 0.0
    init = recs[frozenset((runs["i1"].name, runs["i2"].name))].data
    assert init["fingerprints"][0] != init["fingerprints"][1]
    # positive, and it is the curve above the line (not the line above the curve)
    assert init["barrier_loss"] > 0
    assert init["barrier_loss"] == pytest.approx(_line_excess(init, "test_loss").max(), abs=1e-12)
    assert init["barrier_error"] == pytest.approx(max(0.0, _line_excess(init, "test_error").max()), abs=1e-9)
    assert init["bn"]["recomputed"] and init["bn"]["images"] == 128 and init["settings"]["bn_images"] == 128
    assert by_label["Parameter Initialization"]["pairs"] == 1
    # a rerun computes nothing
    again = sweep_barriers(out, Settings(device="cpu", bn_images=128))
    assert [(g["done_before"], g["computed"]) for g in again["groups"]] == [(1, 0), (1, 0)]
    assert {p: r.data["time"] for p, r in _records(out).items()} == {p: r.data["time"] for p, r in recs.items()}


def test_bn_statistics_come_from_the_fixed_subset_and_change_the_result(sweep):
    out = sweep["dir"]
    runs = sweep["runs"]
    name = B.pair_name(runs["i1"].name, runs["i2"].name)
    curves = {}
    for images in (32, 200):
        sweep_barriers(out, Settings(device="cpu", bn_images=images), groups=["init"])
        rec = B.read_record(out / B.FOLDER / name).data
        assert rec["bn"]["images"] == images and rec["settings"]["bn_images"] == images
        idx = bn_subset(256, images, 64).indices
        assert rec["bn"]["indices_sha256"] == hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
        curves[images] = rec["test_loss"]
    assert curves[32][5] != curves[200][5]  # the middle point depends on the BN subset


def test_recompute_bn_averages_the_subset_batches(sweep):
    """The first BatchNorm layer's running mean/var after recompute_bn equal the average over the
    subset's batches of its input's batch mean and unbiased variance (computed here directly)."""
    cfg = sweep["cfg"]
    data = load_dataset(cfg.data)
    model = model_from_config(cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                           {**read_weights(sweep["runs"]["i1"] / WEIGHTS_FILE).params,
                            **read_weights(sweep["runs"]["i1"] / WEIGHTS_FILE).buffers}.items()})
    norm = Normalize(list(cfg.data.mean), list(cfg.data.std))
    sub = bn_subset(len(data.train_x), 100, 40)  # batches of 40, 40, 20
    x = data.train_x[torch.from_numpy(sub.indices)]
    with torch.no_grad():
        means, vars_ = [], []
        for lo in range(0, 100, 40):
            h = model.conv1(norm(x[lo:lo + 40]))
            means.append(h.mean(dim=(0, 2, 3)))
            vars_.append(h.var(dim=(0, 2, 3), unbiased=True))
    assert recompute_bn(model, x, norm, 40) > 1
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    assert not model.training and model.bn1.momentum == 0.1


# --- pairs, reruns, refusals ----------------------------------------------------------------
def test_choose_pairs_is_deterministic_disjoint_first_and_all_when_few():
    ids = [f"r{i:02d}" for i in range(7)]
    every = choose_pairs(ids, 1000, "g")
    assert len(every) == 21 == len(set(every)) and all(a < b for a, b in every)
    assert choose_pairs(list(reversed(ids)), 1000, "g") == every  # order of the input does not matter
    first = choose_pairs(ids, 3, "g")
    assert first == every[:3] and len({r for p in first for r in p}) == 6  # 3 pairs share no run
    assert choose_pairs(ids, 3, "other group") != first  # the group key seeds the order
    assert choose_pairs(ids[:1], 5, "g") == [] and choose_pairs(ids, 0, "g") == []


def test_stale_or_tampered_records_are_recomputed(sweep):
    out = sweep["dir"]
    sweep_barriers(out, Settings(device="cpu", bn_images=128), groups=["none"])
    path = next((out / B.FOLDER).glob("none-*.json"))
    data = json.loads(path.read_text())
    data["test_loss"][3] += 1.0  # the stored barrier no longer follows from the curve
    path.write_text(json.dumps(data))
    with pytest.raises(RefusedFile, match="not the one its own test_loss curve gives"):
        B.read_record(path)
    res = sweep_barriers(out, Settings(device="cpu", bn_images=128), groups=["none"])
    assert res["groups"][0]["computed"] == 1
    B.read_record(path)  # rewritten, valid


def test_a_planted_pickle_as_weights_file_is_refused_and_never_runs(tmp_path):
    out = tmp_path / "sweep"
    rds = [with_weights(make_cfg(out, "source=init", f"seed={s}")) for s in (1, 2, 3)]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (rds[2] / WEIGHTS_FILE).write_bytes(pickle.dumps({"model": Payload()}))
    res = sweep_barriers(out, Settings(device="cpu", bn_images=64))
    assert not marker.exists()
    why = dict(res["skipped_runs"])[rds[2].name]
    assert "refused" in why and "safetensors" in why
    g = res["groups"][0]
    assert g["runs"] == 2 and g["computed"] == 1 and not g["failed"]
    assert all(rds[2].name not in r.runs for r in B.read_sweep(out)[0])


def test_cli_runs_and_refuses_bad_input_in_one_line(sweep, tmp_path):
    out = sweep["dir"]
    p = run_cli(["-m", "nondet_hpc.barriers", str(out), "--pairs", "1", "--device", "cpu", "--bn-images", "128",
                 "--group", "none"])
    assert "Determinism Control" in p.stdout and "1 pairs" in p.stdout
    bad = run_cli(["-m", "nondet_hpc.barriers", str(tmp_path), "--device", "cpu"], check=False)
    assert bad.returncode == 2 and "is not a sweep folder" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(ConfigError, match="matches no group with usable runs; groups: .*Determinism Control"):
        sweep_barriers(out, Settings(device="cpu"), groups=["nosuch"])
