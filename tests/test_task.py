"""End-to-end behaviour of one job: determinism, each source, resume, skip/force, the contract."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import interrupt_run
from nondet_hpc.run import task
from nondet_hpc.rundir import run_dir
from nondet_hpc.config import ConfigError


def _logits(out):
    return np.load(os.path.join(out["run_dir"], "logits", "plain.npy"), allow_pickle=False)


def test_determinism_control_replicates_are_bit_identical(cfg_factory):
    a = task.run(cfg_factory("source=none", "seed=1"))
    b = task.run(cfg_factory("source=none", "seed=2"))
    assert a["run_dir"] != b["run_dir"]
    assert np.array_equal(_logits(a), _logits(b))


@pytest.mark.parametrize("source", ["init", "shuffle", "augment", "bitflip", "all"])
def test_each_source_alone_changes_the_logits(cfg_factory, source):
    a = task.run(cfg_factory(f"source={source}", "seed=1"))
    b = task.run(cfg_factory(f"source={source}", "seed=2"))
    assert not np.array_equal(_logits(a), _logits(b))
    rec = json.load(open(os.path.join(b["run_dir"], "run.json")))
    expected = {s: (2 if s in rec["source"]["vary"] else 1) for s in ("init", "shuffle", "augment")}
    assert {k: rec["seeds"][k] for k in expected} == expected


def test_bitflip_run_records_the_change_and_starts_one_ulp_from_the_control(cfg_factory):
    out = task.run(cfg_factory("source=bitflip", "seed=3", "train.epochs=1"))
    rec = json.load(open(os.path.join(out["run_dir"], "run.json")))
    bf = rec["bitflip"]
    assert 0 <= bf["index"] < 144 and bf["shape"] == [16, 1, 3, 3]
    assert np.nextafter(np.float32(bf["old"]), np.float32(np.inf if bf["direction"] == "up" else -np.inf)) \
        == np.float32(bf["new"])
    assert rec["seeds"] == {"init": 1, "shuffle": 1, "augment": 1, "bitflip": 3, "deterministic_kernels": True}


def test_a_run_leaves_the_global_rng_alone(cfg_factory):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    task.run(cfg_factory("source=all", "seed=2", "train.epochs=1"))
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("stop_at_step", [5, 8])  # mid-epoch, and exactly at an epoch boundary (4 steps/epoch)
def test_resume_from_checkpoint_is_bit_exact(bit_exact_resume, stop_at_step):
    rec = bit_exact_resume("source=all", "seed=3", "train.epochs=3", "train.checkpoint_every=1", "eval.features=true",
                           stop_at_step=stop_at_step)  # logits and features.npy compared
    assert rec["resumed_from"]["epoch"] * 4 + rec["resumed_from"]["batch"] == stop_at_step + 1


def test_run_directory_contract(cfg_factory, monkeypatch):
    cfg = cfg_factory("source=init", "seed=4", "eval.views=[plain,flip]", "eval.features=true")
    writes: list = []
    real_replace = os.replace

    def recording_replace(src, dst, *a, **k):  # every file of a run is published by a rename
        real_replace(src, dst, *a, **k)
        # safeio renames inside the folder's descriptor: the folder comes from dst_dir_fd
        fd = k.get("dst_dir_fd")
        writes.append(Path(os.readlink(f"/proc/self/fd/{fd}")) / dst if fd is not None else Path(dst))
    monkeypatch.setattr(os, "replace", recording_replace)
    out = task.run(cfg)
    monkeypatch.setattr(os, "replace", real_replace)
    rd = run_dir(cfg)
    names = {p.name for p in rd.iterdir()}
    assert {"config.yaml", "run.json", "logits", "labels.npy", "features.npy", "checkpoint.pt", "DONE"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    plain = np.load(rd / "logits" / "plain.npy", allow_pickle=False)
    flip = np.load(rd / "logits" / "flip.npy", allow_pickle=False)
    labels = np.load(rd / "labels.npy", allow_pickle=False)
    assert plain.dtype == np.float32 and plain.shape == (120, 10) and flip.shape == (120, 10)
    assert labels.dtype == np.int64 and labels.shape == (120,)
    assert np.load(rd / "features.npy").shape == (120, 64)
    rec = json.load(open(rd / "run.json"))
    assert rec["state"] == "done" and rec["run_id"] == rd.name and rec["seed"] == 4
    assert rec["result"]["test_acc"] == pytest.approx(float((plain.argmax(1) == labels).mean()))
    assert rec["heartbeat"]["epoch"] == rec["heartbeat"]["epochs"] == 2
    for key in ("versions", "host", "threads", "kernels", "data", "group_key", "identity", "timings"):
        assert key in rec
    assert rec["threads"] == 1 and rec["versions"]["torch"] == torch.__version__
    assert "none at kernel level" in rec["kernels"]["effect"]
    assert "seed" not in rec["identity"] and rec["identity"]["source.name"] == "init"
    assert out["state"] == "done"
    # DONE is written last: checked by the order of the renames that publish each file
    assert writes[-1] == rd / "DONE" and writes.count(rd / "DONE") == 1
    assert {rd / "run.json", rd / "logits" / "plain.npy", rd / "labels.npy"} <= set(writes[:-1])


def test_runs_differing_only_by_seed_share_a_group_and_not_a_folder(cfg_factory):
    from nondet_hpc.rundir import group_key, run_id
    a, b = cfg_factory("source=init", "seed=1"), cfg_factory("source=init", "seed=2")
    c = cfg_factory("source=init", "seed=1", "train.epochs=3")
    assert group_key(a) == group_key(b) != group_key(c)
    assert len({run_id(a), run_id(b), run_id(c)}) == 3
    assert run_id(a) == run_id(cfg_factory("source=init", "seed=1", "eval.views=[flip]", out="elsewhere"))


def test_a_done_run_is_skipped_and_force_keeps_the_old_result(cfg_factory):
    cfg = cfg_factory("source=init", "seed=1")
    task.run(cfg)
    rd = run_dir(cfg)
    stamp = (rd / "logits" / "plain.npy").stat().st_mtime_ns
    again = task.run(cfg)
    assert again["state"].startswith("skipped") and (rd / "logits" / "plain.npy").stat().st_mtime_ns == stamp
    cfg.force = True
    task.run(cfg)
    kept = list((rd.parent / ".replaced").iterdir())
    assert len(kept) == 1 and (kept[0] / "DONE").exists()
    assert np.array_equal(np.load(kept[0] / "logits" / "plain.npy"), np.load(rd / "logits" / "plain.npy"))


def test_snapshot_ensembling_writes_one_logits_file_per_cycle(cfg_factory):
    cfg = cfg_factory("source=init", "train.epochs=4", "train.snapshots=2", "eval.views=[plain,flip]")
    task.run(cfg)
    rd = run_dir(cfg)
    files = sorted(p.name for p in (rd / "logits").iterdir())
    assert files == ["flip.npy", "plain.npy", "snapshot-1.npy", "snapshot-1_flip.npy",
                     "snapshot-2.npy", "snapshot-2_flip.npy"]
    # the last cycle ends with the final model
    assert np.array_equal(np.load(rd / "logits" / "snapshot-2.npy"), np.load(rd / "logits" / "plain.npy"))
    assert not np.array_equal(np.load(rd / "logits" / "snapshot-1.npy"), np.load(rd / "logits" / "plain.npy"))


@pytest.mark.parametrize("override,match", [
    ("seed=0", "seed=0 is invalid"),
    ("train.epochs=0", "train.epochs=0 is invalid"),
    ("train.snapshots=3", "must be >= 1 and divide train.epochs"),
    ("eval.views=[plain,crop99]", r"unknown view\(s\) \['crop99'\]"),
    ("eval.batch_size=0", "eval.batch_size=0 is invalid"),
    ("source=[]", r"no source chosen \(an empty list such as source=\[\] selects none\); choose one of all, "),
    ("train.threads=-1", "train.threads=-1 is invalid"),
    ("data.test_subset=0", "data.test_subset=0 is invalid"),
    ("data.train_subset=-5", "data.train_subset=-5 is invalid"),
    ("data.test_size=5", "data.test_size=5 is out of range for digits.*10..1787"),
    ("data.test_size=1790", "data.test_size=1790 is out of range"),
    ("train.device=cuda" if not torch.cuda.is_available() else "train.device=tpu", "train.device"),
])
def test_bad_input_is_refused_before_anything_is_written(cfg_factory, tmp_path, override, match):
    cfg = cfg_factory(override)
    with pytest.raises(ConfigError, match=match):
        task.run(cfg)
    # nothing of the run exists: no run folder (of any id), so no run.json, no config.yaml, no DONE
    assert not list((tmp_path / "sweep").glob("runs/*"))


def test_unwritable_output_folder(cfg_factory, tmp_path):
    (tmp_path / "afile").write_text("")
    cfg = cfg_factory(out="afile/sub")
    with pytest.raises(ConfigError, match="out_dir=.*not writable.*out_dir=PATH"):
        task.run(cfg)


def test_missing_data_is_refused_before_anything_is_written(cfg_factory, tmp_path):
    cfg = cfg_factory("data=cifar10", f"data.root={tmp_path}/none", fast=False)
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        task.run(cfg)
    assert not list((tmp_path / "sweep").glob("runs/*"))


def test_failure_is_recorded_in_run_json(cfg_factory, monkeypatch):
    from nondet_hpc.run import train

    def fail(self):
        raise RuntimeError("the loss became a cat")

    monkeypatch.setattr(train.Trainer, "fit", fail)
    cfg = cfg_factory()
    with pytest.raises(RuntimeError, match="cat"):
        task.run(cfg)
    rec = json.load(open(run_dir(cfg) / "run.json"))
    assert rec["state"] == "failed" and "the loss became a cat" in rec["error"]["message"]


def test_thread_count_changes_cpu_results_and_is_recorded(cfg_factory):
    one = task.run(cfg_factory("source=none", "seed=1", "train.threads=1", "data.train_subset=null"))
    two = task.run(cfg_factory("source=none", "seed=1", "train.threads=2", "data.train_subset=null"))
    assert not np.array_equal(_logits(one), _logits(two))
    assert [json.load(open(os.path.join(o["run_dir"], "run.json")))["threads"] for o in (one, two)] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU paths are covered above)")
def test_gpu_deterministic_kernels_give_bit_identical_replicates(cfg_factory):
    # Would abort if any op of the training step lacked a deterministic CUDA kernel.
    a = task.run(cfg_factory("source=none", "seed=1", "train.device=cuda"))
    b = task.run(cfg_factory("source=none", "seed=2", "train.device=cuda"))
    assert np.array_equal(_logits(a), _logits(b))
    rec = json.load(open(os.path.join(a["run_dir"], "run.json")))
    assert rec["kernels"]["use_deterministic_algorithms"] and rec["channels_last"] is False  # fp32: NCHW (auto)


def test_a_done_run_asked_for_more_views_names_them_and_the_evaluate_command(cfg_factory, capsys):
    cfg = cfg_factory("source=init", "seed=2")
    task.run(cfg)
    more = cfg_factory("source=init", "seed=2", "eval.views=[plain,flip,crop25]")
    assert run_dir(more) == run_dir(cfg)  # views are not part of the identity: same run
    out = task.run(more)
    assert out["state"] == "skipped (DONE)" and out["missing_views"] == ["flip", "crop25"]
    said = capsys.readouterr().out
    assert f"python -m nondet_hpc.evaluate {run_dir(cfg)} --views flip crop25" in said
    assert not (run_dir(cfg) / "logits" / "flip.npy").exists()  # nothing retrained or written


class _Payload:
    """Unpickling this runs a shell command: what a planted checkpoint.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_does_not_run_its_payload(cfg_factory, monkeypatch, tmp_path):
    import pickle
    cfg = cfg_factory("source=init", "seed=5")
    interrupt_run(cfg, monkeypatch, 3)
    ckpt = run_dir(cfg) / "checkpoint.pt"
    marker = tmp_path / "payload-ran"
    ckpt.write_bytes(pickle.dumps({"run_id": run_dir(cfg).name, "model": _Payload(marker)}))
    planted = ckpt.read_bytes()
    with pytest.raises(ConfigError, match=r"checkpoint.pt was refused: it is not a checkpoint this package wrote"):
        task.run(cfg)
    assert not marker.exists() and ckpt.read_bytes() == planted  # nothing ran, nothing overwritten
    assert not (run_dir(cfg) / "DONE").exists()


def test_a_checkpoint_of_another_run_is_refused(cfg_factory, monkeypatch):
    a, b = cfg_factory("source=init", "seed=1"), cfg_factory("source=init", "seed=2")
    interrupt_run(a, monkeypatch, 3)
    interrupt_run(b, monkeypatch, 3)
    foreign = (run_dir(a) / "checkpoint.pt").read_bytes()
    (run_dir(b) / "checkpoint.pt").write_bytes(foreign)
    with pytest.raises(ConfigError, match=rf"belongs to run {run_dir(a).name}, not to {run_dir(b).name}"):
        task.run(b)
    assert (run_dir(b) / "checkpoint.pt").read_bytes() == foreign and not (run_dir(b) / "DONE").exists()
    # its own checkpoint resumes as before
    assert task.run(a)["state"] == "done"
