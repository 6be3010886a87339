"""Full disks and killed writers: one clear message, the previous file intact, no temp litter."""

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from nondet_hpc import rundir
from nondet_hpc.config import ConfigError
from nondet_hpc.run import task, train
from nondet_hpc.rundir import DiskFullError, run_dir


def test_enospc_while_checkpointing_keeps_the_previous_checkpoint(cfg_factory, monkeypatch):
    cfg = cfg_factory("source=init", "seed=3", "train.epochs=3", "train.checkpoint_every=1")
    real_write, saves = train.atomic_write, []

    def write(path, writer, **kw):  # the second checkpoint file hits a full disk half-way through its bytes
        if Path(path).name != "checkpoint.pt":
            return real_write(path, writer, **kw)
        saves.append(1)

        def half(f):
            if len(saves) == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            writer(f)
        return real_write(path, half, **kw)
    monkeypatch.setattr(train, "atomic_write", write)
    with pytest.raises(DiskFullError) as e:
        task.run(cfg)
    rd = run_dir(cfg)
    msg = str(e.value)
    assert msg.startswith(f"no space left to write {rd / 'checkpoint.pt'}") and "MiB free in" in msg
    assert "the previous version of the file is intact" in msg and "out_dir=PATH" in msg
    # the first checkpoint is whole (it loads) and no temp file is left
    state = train.load_checkpoint_file(rd / "checkpoint.pt", rd.name)
    assert state["progress"]["epoch"] == 1
    assert not [p for p in rd.iterdir() if p.name.endswith(".tmp")] and not (rd / "DONE").exists()
    monkeypatch.setattr(train, "atomic_write", real_write)
    assert task.run(cfg)["state"] == "done"  # space back: the same command finishes the run


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "run.json"
    rundir.write_json(target, {"a": 1})
    stale = tmp_path / ".run.json.ab12cd_3.tmp"  # the name mkstemp gives a writer of run.json
    stale.write_bytes(b'{"half')
    other = tmp_path / ".run.json.bak.ab12cd_3.tmp"  # another file's temp: not ours to remove
    other.write_bytes(b"x")
    rundir.write_json(target, {"a": 2})
    assert not stale.exists() and other.exists()
    assert rundir.read_run_json(tmp_path)[0] == {"a": 2}


def _small_tmpfs(path, size: str):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"nondet-{uuid.uuid4().hex[:6]}",
                        str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")


def test_a_full_out_dir_is_refused_before_training(cfg_factory, tmp_path):
    mnt = tmp_path / "full"
    _small_tmpfs(mnt, "512k")  # smaller than the probe's 1 MiB of real bytes
    try:
        cfg = cfg_factory(out="full/sweep")
        with pytest.raises(ConfigError, match=r"out_dir=.*is not writable \(No space left on device"):
            task.run(cfg)
        assert not list((mnt / "sweep" / "runs").iterdir())  # probe removed, no run folder
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert os.path.isdir(tmp_path)
