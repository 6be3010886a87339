"""Runs perturbed from epoch k (``source.from_epoch=k``): the parent, the child, the checks between
them, the local launcher's order, and the loss barriers at the end of a local sweep (issue 21).

Tiny digits runs (helpers.FAST: 2 epochs of 4 steps), so k = 1 is the only epoch a child can start
from. The parent is the determinism control of the same config (sweep/parents.py), trained here
with ``parent_config`` as the launchers train it.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import FAST, make_cfg, run_cli
from nondet_hpc.config import ConfigError
from nondet_hpc.records.trajectory import read_trajectory
from nondet_hpc.records.weights import read_weights
from nondet_hpc.run import task
from nondet_hpc.run.parent import ParentError
from nondet_hpc.rundir import RUN_JSON, TRAJECTORY, WEIGHTS, is_done, kept_checkpoint, read_json, run_dir, run_id
from nondet_hpc.sweep import barriers as barrier_files
from nondet_hpc.sweep.parents import parent_config

K = 1
SPE = 4  # steps per epoch: 256 training images in batches of 64 (FAST)


def _child(out: Path, source: str, seed: int, *extra: str):
    return make_cfg(out, f"source={source}", f"source.from_epoch={K}", f"seed={seed}", *extra)


def _info(rd: Path) -> dict:
    return read_json(rd / RUN_JSON)


def _final(rd: Path) -> np.ndarray:
    return read_weights(rd / WEIGHTS).flat()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """One parent (checkpoint kept at the end of epoch K) and its children: the bit change of two
    seeds, a new data order, and cudnn (which on a CPU changes nothing: the parent again)."""
    out = tmp_path_factory.mktemp("from_epoch") / "sweep"
    parent = task.run(parent_config(_child(out, "bitflip", 1), keep=[K]))
    runs = {"parent": Path(parent["run_dir"])}
    for name, source, seed in [("bit1", "bitflip", 1), ("bit2", "bitflip", 2), ("shuffle", "shuffle", 2),
                               ("cudnn", "cudnn", 1)]:
        res = task.run(_child(out, source, seed))
        assert res["state"] == "done"
        runs[name] = Path(res["run_dir"])
    return {"out": out, "runs": runs, "parent_id": parent["run_id"]}


# --- refused configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,words", [
    (["source=bitflip", "source.from_epoch=2"], ["source.from_epoch=2 is invalid", "train.epochs=2"]),
    (["source=shuffle", "source.from_epoch=-1"], ["source.from_epoch=-1 is invalid"]),
    (["source=init", "source.from_epoch=1"], ["initialised once, before epoch 0", "source=bitflip"]),
    (["source=none", "source.from_epoch=1"], ["varies nothing", "the parent run itself"]),
])
def test_configs_that_cannot_mean_anything_are_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as e:
        task.validate(make_cfg(tmp_path, *overrides))
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_a_refused_config_is_one_clear_line_on_the_command_line(tmp_path):
    p = run_cli(["-m", "nondet_hpc", "source=init", "source.from_epoch=1", *FAST, f"out_dir={tmp_path}"],
                check=False)
    assert p.returncode != 0
    assert "initialised once, before epoch 0" in p.stderr and "Traceback" not in p.stdout + p.stderr
    assert not (tmp_path / "runs").exists()


# --- a child -------------------------------------------------------------------------------------
def test_a_child_shares_its_parents_first_k_epochs_and_names_it(family):
    runs = family["runs"]
    ptraj = read_trajectory(runs["parent"] / TRAJECTORY)
    assert kept_checkpoint(runs["parent"], K).is_file()
    for name in ("bit1", "bit2", "shuffle"):
        info, traj = _info(runs[name]), read_trajectory(runs[name] / TRAJECTORY)
        assert info["from_epoch"] == K and info["trained_epochs"] == 2 - K
        parent = info["parent"]
        assert (parent["run_id"], parent["epoch"], parent["step"]) == (family["parent_id"], K, K * SPE)
        at = int(np.flatnonzero(ptraj.step == K * SPE)[0])
        assert parent["fingerprint"] == ptraj.fingerprint[at].tobytes().hex()
        # the points before the end of epoch K are the parent's, bit for bit (adopted); the run id is the child's
        before = ptraj.step < K * SPE
        n = int(before.sum())
        assert traj.run_id == runs[name].name and n >= 2 and np.array_equal(traj.step, ptraj.step)
        np.testing.assert_array_equal(traj.fingerprint[:n], ptraj.fingerprint[before])
        # the point at the end of epoch K the child records itself: the parent's weights as loaded, after
        # the bit change where there is one
        same_at_k = traj.fingerprint[at].tobytes() == ptraj.fingerprint[at].tobytes()
        assert same_at_k == (name == "shuffle"), name
        # after it, the child's own training: every later point differs from the parent's
        assert len(traj.step) > at + 1
        assert all(traj.fingerprint[t].tobytes() != ptraj.fingerprint[t].tobytes()
                   for t in range(at + 1, len(traj.step))), name
        assert not np.array_equal(_final(runs[name]), _final(runs["parent"]))
    assert _info(runs["shuffle"])["bitflip"] is None


def test_the_bit_change_happens_at_the_start_of_epoch_k(family):
    runs = family["runs"]
    flips = [_info(runs[n])["bitflip"] for n in ("bit1", "bit2")]
    for flip in flips:
        assert (flip["epoch"], flip["step"]) == (K, K * SPE) and flip["old"] != flip["new"]
    assert flips[0]["index"] != flips[1]["index"] or flips[0]["direction"] != flips[1]["direction"]
    # the weight that moved is the parent's at epoch K, moved by one float32 ulp
    state = torch.load(kept_checkpoint(runs["parent"], K), map_location="cpu", weights_only=True)
    for flip in flips:
        value = state["model"][flip["param"]].reshape(-1)[flip["index"]].reshape(1)
        assert float(value) == pytest.approx(flip["old"], abs=0) and float(value) != flip["new"]
        up = torch.nextafter(value, torch.tensor([float("inf") if flip["direction"] == "up" else -float("inf")]))
        assert float(up) == flip["new"]


def test_resuming_from_the_parent_is_exact(family):
    """source=cudnn varies nothing on a CPU (its kernels are deterministic there): its child from epoch
    K must end bit-identical to the parent, so nothing of the training state is lost at the hand-over."""
    runs = family["runs"]
    assert _info(runs["cudnn"])["parent"]["run_id"] == family["parent_id"]
    np.testing.assert_array_equal(_final(runs["cudnn"]), _final(runs["parent"]))
    assert read_trajectory(runs["cudnn"] / TRAJECTORY).fingerprint.tobytes() == \
        read_trajectory(runs["parent"] / TRAJECTORY).fingerprint.tobytes()


# --- a parent that cannot serve ------------------------------------------------------------------
def test_from_epoch_0_is_todays_run_with_todays_run_id(tmp_path):
    """source.from_epoch=0 (the default) is a neutral default: the same run id as a config that does
    not name it, no parent, and the same bits as that run trained elsewhere."""
    today = make_cfg(tmp_path / "a", "source=bitflip", "seed=2")
    explicit = make_cfg(tmp_path / "b", "source=bitflip", "seed=2", "source.from_epoch=0")
    assert run_id(today) == run_id(explicit)
    runs = [Path(task.run(c)["run_dir"]) for c in (today, explicit)]
    assert all("parent" not in _info(r) or _info(r)["parent"] is None for r in runs)
    assert _info(runs[0])["bitflip"] == _info(runs[1])["bitflip"] and "epoch" not in _info(runs[1])["bitflip"]
    np.testing.assert_array_equal(_final(runs[0]), _final(runs[1]))


def test_a_child_does_not_retrain_its_parents_epochs(family, monkeypatch):
    """Counted, not timed: a child from epoch K trains only epochs K..E-1 (one pass over the data per
    epoch, each of SPE optimizer steps); its parent trained all of them."""
    from nondet_hpc.run import train

    epochs, steps = [], []
    real = train.Trainer._batches

    def counting(self, x_epoch, y_epoch, start):
        epochs.append(self.progress.epoch)
        before = self.progress.step
        out = real(self, x_epoch, y_epoch, start)
        steps.append(self.progress.step - before)
        return out
    monkeypatch.setattr(train.Trainer, "_batches", counting)
    res = task.run(_child(family["out"], "augment", 3))
    assert res["state"] == "done"
    assert epochs == list(range(K, 2)) and steps == [SPE] * (2 - K), (epochs, steps)
    epochs.clear()
    task.run(parent_config(_child(family["out"] / "again", "augment", 3), keep=[K]))
    assert epochs == [0, 1]


def test_a_missing_parent_is_named_with_the_fix(tmp_path):
    cfg = _child(tmp_path / "empty", "bitflip", 1)
    pid = run_id(parent_config(cfg))
    with pytest.raises(ParentError) as e:
        task.run(cfg)
    msg = str(e.value)
    assert pid in msg and "does not exist" in msg and "source=none seed=1" in msg
    assert "record.keep_checkpoints=[1]" in msg
    assert not is_done(run_dir(cfg)) and _info(run_dir(cfg))["state"] == "failed"


def _copy_parent(family: dict, dest: Path) -> Path:
    src = family["runs"]["parent"]
    target = dest / "runs" / src.name
    shutil.copytree(src, target)
    return target


def test_a_tampered_parent_checkpoint_is_refused(family, tmp_path):
    out = tmp_path / "sweep"
    pdir = _copy_parent(family, out)
    path = kept_checkpoint(pdir, K)
    state = torch.load(path, map_location="cpu", weights_only=True)
    name = next(n for n, v in state["model"].items() if v.is_floating_point())
    state["model"][name].view(-1)[0] += 1e-3  # one weight edited; the file is otherwise the parent's
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())
    cfg = _child(out, "bitflip", 1)
    with pytest.raises(ParentError) as e:
        task.run(cfg)
    msg = str(e.value)
    assert family["parent_id"] in msg and "tampered" in msg and "Retrain the parent" in msg
    assert "nothing was trained from it" in msg
    assert not is_done(run_dir(cfg))


def test_a_parent_without_the_kept_epoch_is_refused(family, tmp_path):
    out = tmp_path / "sweep"
    pdir = _copy_parent(family, out)
    kept_checkpoint(pdir, K).unlink()
    with pytest.raises(ParentError) as e:
        task.run(_child(out, "shuffle", 1))
    assert family["parent_id"] in str(e.value) and "force=true" in str(e.value)


# --- the local launcher and the sweep's end -----------------------------------------------------
SWEEP = ["-m", "nondet_hpc", "-m", "source=bitflip", f"source.from_epoch={K}", "seed=1,2", *FAST,
         "hydra.launcher.n_jobs=1", "barriers.pairs=1", "barriers.points=3", "barriers.bn_images=64"]


def test_local_sweep_runs_the_parent_first_then_children_and_barriers(tmp_path):
    out = tmp_path / "sweep"
    p = run_cli([*SWEEP, f"out_dir={out}"])
    text = p.stdout + p.stderr
    pid = run_id(parent_config(_child(out, "bitflip", 1)))
    parent = _info(out / "runs" / pid)
    children = [_info(out / "runs" / run_id(_child(out, "bitflip", s))) for s in (1, 2)]
    assert parent["state"] == "done" and all(c["state"] == "done" for c in children)
    assert all(c["parent"]["run_id"] == pid and c["started"] >= parent["finished"] for c in children)
    # the barrier of the one pair of the group, recorded and in the report
    recs, refused = barrier_files.read_sweep(out)
    assert not refused and len(recs) == 1
    rec = recs[0]
    assert set(rec.runs) == {c["run_id"] for c in children} and len(rec.data["alpha"]) == 3
    assert "loss barriers: " in text and "1 computed" in text
    metrics = pd.read_csv(out / "report" / "metrics.csv")
    row = metrics[metrics["group"] == f"Random Bit Change at epoch {K}"]
    assert len(row) == 1 and int(row["barrier_pairs"].iloc[0]) == 1
    assert row["barrier_loss"].iloc[0] == pytest.approx(rec.barrier_loss, abs=1e-9)
    # a barrier setting that cannot work: reported, the report still made, the exit non-zero
    bad = run_cli([*SWEEP, "barriers.points=1", f"out_dir={out}"], check=False)
    assert bad.returncode != 0
    assert "loss barriers not measured" in bad.stdout + bad.stderr and "python -m nondet_hpc.barriers" in bad.stderr
    assert "[nondet_hpc] report:" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


def test_children_of_a_failed_parent_are_not_started(tmp_path):
    out = tmp_path / "sweep"
    pid = run_id(parent_config(_child(out, "bitflip", 1)))
    (out / "runs" / pid).mkdir(parents=True)
    (out / "runs" / pid / "logits").symlink_to(tmp_path)  # a link in the run folder: the parent is refused
    p = run_cli([*SWEEP, f"out_dir={out}"], check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    # the sweep's list of failures: the parent's own error, and each child not run, naming the parent
    assert len(re.findall(rf"job \d+: not run: its parent run {pid}, .* it failed \(.*symbolic link", text)) == 2
    assert "rerun the same command" in text and "Traceback" not in text
    for s in (1, 2):
        assert not (out / "runs" / run_id(_child(out, "bitflip", s))).exists()
